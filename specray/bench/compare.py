"""`specray bench`: one run comparing transformers and specray on the same prompts, models and machine.

In order: transformers target-only greedy (also the reference: with a greedy workload every other
system's outputs are checked against it token for token, so it runs even when `hf` is not among
the systems, then without a row of its own) and sampled; assisted generation, calibrated on the
first prompts of each set, the winner run on every prompt; the specray engine in process and over
Ray actors, every mode; the Serve app over gRPC, every mode at every client concurrency. Each
setting becomes a row (metrics.row); results.json, report.md and the plots go to the output folder.
Progress bars (tqdm) and a line per finished setting go to stderr: one bar over settings, one over
the current setting's requests."""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from specray.bench import hf_baselines as hf
from specray.bench.engine_runner import drive, engine_requests, mode_spec
from specray.bench.grpc_load import load, request_fields, serving
from specray.bench.metrics import row
from specray.bench.plots import draw_all
from specray.bench.report import goals, machine_info, write
from specray.bench.settings import BenchConfig
from specray.bench.specray_systems import app_config, engine_config, max_context, ray_session, warm_up
from specray.bench.workload import select
from specray.client import Client
from specray.core.loader import load_tokenizer
from specray.engine import build_engine

Prompts = dict[str, list[list[int]]]  # prompt set -> token ids of its prompts


class Progress:
    def __init__(self, total: int):
        self.bar = tqdm(total=total, desc="bench", unit="setting", position=0)

    @contextmanager
    def setting(self, desc: str, requests: int):
        """A bar over one setting's requests; yields the callable that ticks it."""
        inner = tqdm(total=requests, desc=desc, unit="req", leave=False, position=1)
        try:
            yield inner.update
        finally:
            inner.close()
            self.bar.update()

    def note(self, r: dict) -> None:
        exact = "-" if r["identical"] is None else f"{r['identical']}/{r['requests']}"
        tqdm.write(f"{r['system']} {r['setting']} {r['prompts']} c={r['concurrency']}: "
                   f"{r['output_tokens_per_s']:.1f} tok/s, TTFT p50 {r['ttft_ms']['p50']:.1f} ms, "
                   f"TPOT p50 {r['tpot_ms']['p50']:.2f} ms, exact {exact}", file=sys.stderr)


def _labels(system: str, setting: str, prompts: str, concurrency: int = 1) -> dict:
    return {"system": system, "setting": setting, "prompts": prompts, "concurrency": concurrency}


def num_settings(cfg: BenchConfig) -> int:
    sets, on = len(cfg.prompt_sets), set(cfg.systems)
    n = sets * ((cfg.greedy or "hf" in on) + ("hf" in on))
    n += ("assisted" in on) * (1 + sets)
    n += len({"local", "ray"} & on) * len(cfg.modes) * sets
    return n + ("grpc" in on) * len(cfg.modes) * len(cfg.concurrency) * sets


def _ref(reference: Prompts | None, name: str, which: list[int] | None = None) -> list[list[int]] | None:
    """The reference outputs of prompt set `name` (of its prompts `which`), or None without a reference."""
    if reference is None:
        return None
    return reference[name] if which is None else [reference[name][i] for i in which]


def hf_rows(cfg: BenchConfig, model, ids: Prompts, progress: Progress) -> tuple[list[dict], Prompts | None]:
    """Target-only rows (when `hf` is on) and the greedy reference per set (None for a sampled workload)."""
    on, rows = "hf" in cfg.systems, []
    reference = {} if cfg.greedy else None
    runs = ([("greedy", 0.0)] if cfg.greedy or on else []) \
        + ([(f"sampled T={cfg.hf_sampled_temperature}", cfg.hf_sampled_temperature)] if on else [])
    for name, ps in ids.items():
        for setting, temperature in runs:
            with progress.setting(f"hf {setting} {name}", len(ps)) as tick:
                m = hf.run(model, ps, cfg.max_tokens, temperature, cfg.seed, on_done=tick)
            if temperature == 0 and reference is not None:
                reference[name] = [t.token_ids for t in m.traces]
            if on:
                rows.append(row(_labels("hf", setting, name), m))
                progress.note(rows[-1])
    return rows, reference


def assisted_rows(cfg: BenchConfig, model, ids: Prompts, reference: Prompts | None,
                  progress: Progress) -> tuple[list[dict], list[dict], str]:
    """(rows of the winning setting, calibration rows, the winner's label): every assisted setting on
    the first cfg.calibration_prompts of each set, the fastest then on every prompt."""
    assistant = hf.load_model(cfg.draft, cfg.dtype, cfg.device)
    k = cfg.calibration_prompts
    calib = [p for ps in ids.values() for p in ps[:k]]
    ref = None if reference is None else [t for name in ids for t in reference[name][:k]]
    with progress.setting("assisted calibration", len(calib) * len(cfg.assist)) as tick:
        sweep = hf.calibrate(model, assistant, calib, cfg.assist, cfg.max_tokens, cfg.temperature, cfg.seed, tick)
    calibration = [row(_labels("assisted", s.label, "calibration"), m, ref) for s, m in sweep]
    winner = cfg.assist[max(range(len(sweep)), key=lambda i: calibration[i]["output_tokens_per_s"])]
    rows = []
    for name, ps in ids.items():
        hf.configure_assistant(assistant, winner)
        with progress.setting(f"assisted {winner.label} {name}", len(ps)) as tick:
            m = hf.run(model, ps, cfg.max_tokens, cfg.temperature, cfg.seed, assistant, tick)
        rows.append(row(_labels("assisted", winner.label, name), m, _ref(reference, name)))
        progress.note(rows[-1])
    return rows, calibration, winner.label


async def engine_rows(cfg: BenchConfig, kind: str, ids: Prompts, reference: Prompts | None, context: int,
                      tokenizer, progress: Progress) -> list[dict]:
    """Every mode on every prompt set through one engine (`local` or `ray`), one request at a time."""
    engine = build_engine(engine_config(cfg, kind, context), tokenizer)
    rows = []
    try:
        await warm_up(engine, cfg.modes, next(iter(ids.values()))[0], cfg.temperature)
        for mode in cfg.modes:
            for name, ps in ids.items():
                reqs = engine_requests(f"{mode}-{name}", ps, mode, cfg.max_tokens, cfg.temperature, cfg.seed)
                with progress.setting(f"{kind} {mode} {name}", len(ps)) as tick:
                    m = await drive(engine, reqs, 1, tick)
                rows.append(row(_labels(kind, mode, name), m, _ref(reference, name)))
                progress.note(rows[-1])
    finally:
        await engine.shutdown()
    return rows


def grpc_rows(cfg: BenchConfig, ids: Prompts, reference: Prompts | None, context: int,
              progress: Progress) -> list[dict]:
    """Every mode at every concurrency through the Serve app; a setting sends max(prompts, concurrency)
    requests, cycling through the set's prompts."""
    rows = []
    with serving(app_config(cfg, context)) as address, Client(address) as client:
        for mode in cfg.modes:
            spec = mode_spec(mode)
            load(client, [(next(iter(ids.values()))[0], request_fields(spec, 8, cfg.temperature, cfg.seed))], 1)
            for c in cfg.concurrency:
                for name, ps in ids.items():
                    which = [i % len(ps) for i in range(max(len(ps), c))]
                    reqs = [(ps[i], request_fields(spec, cfg.max_tokens, cfg.temperature, cfg.seed + i))
                            for i in which]
                    with progress.setting(f"grpc {mode} c={c} {name}", len(reqs)) as tick:
                        m = load(client, reqs, c, tick)
                    rows.append(row(_labels("grpc", mode, name, c), m, _ref(reference, name, which)))
                    progress.note(rows[-1])
    return rows


def run(cfg: BenchConfig) -> dict:
    """Run every selected system; the results (settings, machine, rows, calibration, goals)."""
    torch.set_num_threads(cfg.threads)
    prompts = select(cfg.prompt_sets, cfg.num_prompts)
    tokenizer = load_tokenizer(cfg.target)
    ids = {name: [tokenizer.encode(p.text, add_special_tokens=False) for p in ps] for name, ps in prompts.items()}
    context = max_context(cfg, [len(p) for ps in ids.values() for p in ps])
    progress = Progress(num_settings(cfg))
    rows, reference, calibration, best = [], None, [], ""
    if cfg.greedy or {"hf", "assisted"} & set(cfg.systems):
        model = hf.load_model(cfg.target, cfg.dtype, cfg.device)
        hf.run(model, [next(iter(ids.values()))[0]], 4, 0.0)  # warm-up
        rows, reference = hf_rows(cfg, model, ids, progress)
        if "assisted" in cfg.systems:
            assisted, calibration, best = assisted_rows(cfg, model, ids, reference, progress)
            rows += assisted
        del model
    if "local" in cfg.systems:
        rows += asyncio.run(engine_rows(cfg, "local", ids, reference, context, tokenizer, progress))
    if {"ray", "grpc"} & set(cfg.systems):
        with ray_session(cfg.ray_cpus):
            if "ray" in cfg.systems:
                rows += asyncio.run(engine_rows(cfg, "ray", ids, reference, context, tokenizer, progress))
            if "grpc" in cfg.systems:
                rows += grpc_rows(cfg, ids, reference, context, progress)
    progress.bar.close()
    baseline = "greedy" if cfg.greedy else f"sampled T={cfg.hf_sampled_temperature}"
    settings = {**dataclasses.asdict(cfg), "num_prompts_run": {k: len(v) for k, v in ids.items()},
                "prompt_ids": {k: [p.id for p in v] for k, v in prompts.items()}}
    return {"settings": settings, "machine": machine_info(), "rows": rows, "calibration": calibration,
            "assisted_best": best, "goals": goals(rows, baseline)}


def main(cfg: BenchConfig) -> str:
    """Run, then write results.json, report.md and the plots under cfg.out (default
    bench_results/<timestamp>/); returns the Markdown."""
    out = Path(cfg.out or Path("bench_results") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    results = run(cfg)
    results["plots"] = [str(p) for p in draw_all(results["rows"], out)]
    return write(results, out)
