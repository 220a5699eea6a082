"""The comparison's report: machine facts, the JSON file, the Markdown table and its "Goals" ratios.

Works on plain result rows (metrics.row) and never runs anything. A row's labels are `system`
(hf, assisted, local, ray, grpc), `setting` (decoding, assisted draft length or mode), `prompts`
(the set) and `concurrency`."""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
from pathlib import Path

COLUMNS = [  # (header, row path, format)
    ("system", ("system",), "{}"), ("setting", ("setting",), "{}"), ("prompts", ("prompts",), "{}"),
    ("conc", ("concurrency",), "{}"), ("tok/s", ("output_tokens_per_s",), "{:.1f}"),
    ("req/s", ("requests_per_s",), "{:.2f}"), ("TTFT p50", ("ttft_ms", "p50"), "{:.1f}"),
    ("TTFT p99", ("ttft_ms", "p99"), "{:.1f}"), ("TPOT p50", ("tpot_ms", "p50"), "{:.2f}"),
    ("TPOT p99", ("tpot_ms", "p99"), "{:.2f}"), ("ITL p50", ("itl_ms", "p50"), "{:.2f}"),
    ("ITL p99", ("itl_ms", "p99"), "{:.2f}"), ("E2E p50", ("e2e_ms", "p50"), "{:.0f}"),
    ("E2E p90", ("e2e_ms", "p90"), "{:.0f}"), ("E2E p99", ("e2e_ms", "p99"), "{:.0f}"),
    ("α", ("acceptance_rate",), "{:.3f}"), ("τ", ("mean_acceptance_length",), "{:.2f}"),
    ("hit", ("cache_hit_rate",), "{:.3f}"), ("round ms", ("round_ms",), "{:.2f}"),
    ("draft ms", ("draft_ms",), "{:.2f}"), ("verify ms", ("verify_ms",), "{:.2f}"),
    ("other ms", ("other_ms",), "{:.2f}"), ("exact", ("identical",), "{}/{requests}"), ("errors", ("errors",), "{}"),
]

LEGEND = ("Latencies in ms (specray/bench/metrics.py): TPOT = (E2E - TTFT) / (tokens - 1) per request; ITL = gap "
          "between consecutive streamed chunks (vLLM's; with speculation a chunk is a verified block of τ tokens). "
          "round / draft / verify / other ms: per verification round, the wall time, the draft's and the target's "
          "compute, and the rest (prefill included). "
          "`exact`: how many greedy outputs equal transformers' target-only greedy output token for token, of all "
          "(the `hf greedy` rows are that reference). In float32 every row must be exact; in bfloat16 or float16 "
          "the rounding of a matmul depends on its shape (batch, tokens per call, kernel), so where the target's "
          "two best logits are within a rounding step of each other any system, transformers' own assisted "
          "generation included, may take the other token and diverge from there.")


def machine_info() -> dict:
    import ray
    import torch
    import transformers
    cpu = platform.processor()
    if Path("/proc/cpuinfo").is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "ray": ray.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _get(row: dict, path: tuple[str, ...]):
    for key in path:
        row = row.get(key) if isinstance(row, dict) else None
    return row


def _cell(value, fmt: str, row: dict) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value, **row)


def table(rows: list[dict]) -> str:
    head = "| " + " | ".join(h for h, _, _ in COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "\n".join("| " + " | ".join(_cell(_get(r, p), f, r) for _, p, f in COLUMNS) + " |" for r in rows)


def _pick(rows: list[dict], **labels) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in labels.items())]


def _best(rows: list[dict]) -> dict | None:
    return max(rows, key=lambda r: r["output_tokens_per_s"], default=None)


def goals(rows: list[dict], baseline_setting: str) -> list[str]:
    """The ratios the issue asks for, one line each (settings that were not run are left out): each
    engine's best mode (local, ray; by tokens/s) against transformers target-only (baseline_setting)
    and assisted, per prompt set; SSD round time over verification time; gRPC TTFT at concurrency 1
    against the in-process engine's."""
    lines = []
    for prompts in dict.fromkeys(r["prompts"] for r in rows):
        bases = (("transformers target-only", _pick(rows, system="hf", setting=baseline_setting, prompts=prompts)),
                 ("transformers assisted", _pick(rows, system="assisted", prompts=prompts)))
        for ours in filter(None, (_best(_pick(rows, system=kind, prompts=prompts)) for kind in ("local", "ray"))):
            for name, base in bases:
                if base:
                    b = base[0]
                    lines.append(f"{prompts}: specray {ours['system']} {ours['setting']} "
                                 f"{ours['output_tokens_per_s']:.1f} tok/s = "
                                 f"{ours['output_tokens_per_s'] / b['output_tokens_per_s']:.2f}x {name} "
                                 f"{b['setting']} ({b['output_tokens_per_s']:.1f} tok/s)")
    for r in (r for r in rows if r["setting"].partition(":")[0] == "async"):  # async and async:K
        if r.get("verify_ms"):
            lines.append(f"{r['prompts']}: SSD round through {r['system']} = {r['round_ms']:.2f} ms = "
                         f"{r['round_ms'] / r['verify_ms']:.2f}x verification ({r['verify_ms']:.2f} ms)")
    for g in _pick(rows, system="grpc", concurrency=1):
        local = _pick(rows, system="local", setting=g["setting"], prompts=g["prompts"])
        if local:
            a, b = g["ttft_ms"]["p50"], local[0]["ttft_ms"]["p50"]
            lines.append(f"{g['prompts']}: gRPC TTFT p50 at concurrency 1, {g['setting']}: {a:.1f} ms vs "
                         f"{b:.1f} ms in process: {a - b:+.1f} ms ({a / b:.2f}x)")
    return lines


def markdown(results: dict) -> str:
    s, m = results["settings"], results["machine"]
    out = [f"# specray bench, {m['date']}", "",
           f"{m['cpu']}, {m['cores']} cores; torch {m['torch']}, transformers {m['transformers']}, ray {m['ray']}",
           (f"target `{s['target']}`, draft `{s['draft']}`, {s['dtype']}; prompts {s['num_prompts_run']}; "
            f"max_tokens {s['max_tokens']}; temperature {s['temperature']}; seed {s['seed']}."),
           LEGEND, "",
           table(results["rows"])]
    if results.get("calibration"):
        won = (f"Assisted generation, calibration ({s['calibration_prompts']} prompts per set): "
               f"**{results['assisted_best']}** won.")
        out += ["", won, "", table(results["calibration"])]
    out += ["", "## Goals", ""] + [f"- {line}" for line in results["goals"]]
    return "\n".join(out) + "\n"


def _finite(value):
    """value with NaN floats as None, at any depth (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write(results: dict, out: Path) -> str:
    """results.json and report.md under out; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_finite(results), indent=1, default=str) + "\n")
    md = markdown(results)
    (out / "report.md").write_text(md)
    return md
