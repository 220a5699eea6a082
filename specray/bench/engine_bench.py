"""`specray bench engine`: every mode on one model pair, in process and through Ray actors.

For each engine (`local`, `ray:graph`, `ray:calls`: engine.workers), mode and batch size it runs the held-out code prompts (workload.py) with batch-size
requests in flight and prints output tokens/s, acceptance rate α, mean acceptance length τ, the
SSD cache hit rate, and the per-round time split: draft compute, verification compute (all target
stages), and the rest (waiting, transport, scheduling). Run side by side in one process, so the
ratios compare like with like on a noisy machine."""
from __future__ import annotations

import json
import statistics
from dataclasses import replace

from specray.bench.engine_runner import drive, engine_requests
from specray.bench.workload import load_set
from specray.engine import EngineConfig, build_engine
from specray.engine.requests import TRANSPORTS

__all__ = ["bench", "dump", "markdown"]


async def _run(engine, mode: str, batch: int, requests: int, max_tokens: int, temperature: float) -> dict:
    """One setting: `requests` code prompts, `batch` in flight; its row (see COLUMNS)."""
    prompts = [engine.tokenizer.encode(p.text, add_special_tokens=False) for p in load_set("code")[:requests]]
    m = await drive(engine, engine_requests(f"{mode}-{batch}", prompts, mode, max_tokens, temperature), batch)
    tokens = sum(len(t.token_ids) for t in m.traces)
    return {"engine": engine_name(engine.config), "mode": mode, "batch": batch, "output_tokens_per_s": tokens / m.wall_s,
            "acceptance_rate": m.stats.acceptance_rate, "mean_acceptance_length": m.stats.mean_acceptance_length,
            "cache_hit_rate": m.stats.cache_hit_rate if m.stats.cache_lookups else None,
            **m.split, "output_tokens": tokens, "seconds": m.wall_s}


def engine_name(config: EngineConfig) -> str:
    return "local" if config.kind == "local" else f"ray:{config.transport}"


def engine_setting(config: EngineConfig, name: str) -> EngineConfig:
    """`local`, `ray` (config's transport) or `ray:TRANSPORT` as an engine configuration."""
    kind, _, transport = name.partition(":")
    if kind not in ("local", "ray") or (transport and (kind != "ray" or transport not in TRANSPORTS)):
        raise ValueError(f"unknown engine {name!r}; choose local, ray, or ray:T with T in {TRANSPORTS}")
    return replace(config, kind=kind, transport=transport or config.transport)


async def bench(config: EngineConfig, modes: list[str], batches: list[int], engines: list[str], requests: int,
                max_tokens: int, temperature: float, repeat: int = 1, progress=print) -> list[dict]:
    """Every (engine, batch, mode) row; with repeat > 1 the whole sweep runs `repeat` times in turn
    (so a slow spell of a shared machine hits every engine alike) and each row is the median."""
    runs: dict[tuple, list[dict]] = {}
    settings = [engine_setting(config, name) for name in engines]
    for _ in range(repeat):
        for setting in settings:
            for batch in batches:
                engine = build_engine(replace(setting, max_batch=batch))
                try:
                    await _run(engine, "chain", batch, batch, 8, temperature)  # warm-up
                    for mode in modes:
                        row = await _run(engine, mode, batch, requests, max_tokens, temperature)
                        runs.setdefault((row["engine"], batch, mode), []).append(row)
                        progress(format_row(row))
                finally:
                    await engine.shutdown()
    return [_median(rows) for rows in runs.values()]


def _median(rows: list[dict]) -> dict:
    """Column-wise median of one setting's repeated rows (numbers), with how many runs it has."""
    out = dict(rows[0], runs=len(rows))
    for key, value in rows[0].items():
        if isinstance(value, float):
            out[key] = statistics.median(r[key] for r in rows)
    return out


COLUMNS = [("engine", "{}"), ("mode", "{}"), ("batch", "{}"), ("output_tokens_per_s", "{:.1f}"),
           ("acceptance_rate", "{:.3f}"), ("mean_acceptance_length", "{:.2f}"), ("cache_hit_rate", "{:.3f}"),
           ("round_ms", "{:.2f}"), ("draft_ms", "{:.2f}"), ("verify_ms", "{:.2f}"), ("other_ms", "{:.2f}"),
           ("wire_kb", "{:.1f}")]


def format_row(row: dict) -> str:
    return " | ".join("-" if row[k] is None else fmt.format(row[k]) for k, fmt in COLUMNS)


def markdown(rows: list[dict]) -> str:
    head = "| " + " | ".join(k for k, _ in COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "\n".join("| " + format_row(r) + " |" for r in rows)


def dump(rows: list[dict], path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
