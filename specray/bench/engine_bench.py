"""`specray bench engine`: every mode on one model pair, in process and through Ray actors.

For each engine kind, mode and batch size it runs a fixed set of code prompts with batch-size
requests in flight and prints output tokens/s, acceptance rate α, mean acceptance length τ, the
SSD cache hit rate, and the per-round time split: draft compute, verification compute (all target
stages), and the rest (waiting, transport, scheduling). Run side by side in one process, so the
ratios compare like with like on a noisy machine."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, replace

from specray.bench.prompts import CODE_PROMPTS
from specray.core.sampling import SamplingParams
from specray.core.sequence import SpecStats
from specray.core.speculation import SpeculationConfig
from specray.engine import EngineConfig, EngineRequest, build_engine

MODES = {
    "off": SpeculationConfig("off"),
    "chain": SpeculationConfig("chain", 4),
    "tree": SpeculationConfig("tree", 3, (2, 2, 1)),
    "async": SpeculationConfig("async", 4),
}


@dataclass
class Row:
    engine: str
    mode: str
    batch: int
    output_tokens: int
    seconds: float
    rounds: int
    stats: SpecStats
    draft_s: float
    verify_s: float

    def as_dict(self) -> dict:
        """Per-round figures. Off the critical path is the draft only when Ray overlaps it (async);
        whatever the round took beyond its critical-path compute is waiting, transport, scheduling."""
        per = 1000 / max(self.rounds, 1)
        overlapped = self.engine == "ray" and self.mode == "async"
        critical = self.verify_s + (0.0 if overlapped else self.draft_s)
        return {
            "engine": self.engine, "mode": self.mode, "batch": self.batch,
            "output_tokens_per_s": self.output_tokens / self.seconds,
            "acceptance_rate": self.stats.acceptance_rate,
            "mean_acceptance_length": self.stats.mean_acceptance_length,
            "cache_hit_rate": self.stats.cache_hit_rate if self.stats.cache_lookups else None,
            "round_ms": self.seconds * per, "draft_ms": self.draft_s * per, "verify_ms": self.verify_s * per,
            "other_ms": (self.seconds - critical) * per,
            "rounds": self.rounds, "output_tokens": self.output_tokens, "seconds": self.seconds,
        }


async def _run(engine, mode: str, batch: int, requests: int, max_tokens: int, temperature: float):
    spec = MODES[mode]
    prompts = [engine.tokenizer.encode(p, add_special_tokens=False) for p in CODE_PROMPTS][:requests]
    sem = asyncio.Semaphore(batch)
    stats, tokens = SpecStats(), 0

    async def one(i: int, prompt: list[int]):
        nonlocal tokens
        async with sem:
            req = EngineRequest(f"{mode}-{batch}-{i}", tuple(prompt), SamplingParams(temperature, seed=i), spec,
                                max_tokens, ignore_eos=True)
            async for delta in engine.generate(req):
                tokens += len(delta.token_ids)
                if delta.stats is not None:
                    stats.merge(delta.stats)

    before = await engine.timings()
    start = time.perf_counter()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    seconds = time.perf_counter() - start
    after = await engine.timings()
    return tokens, seconds, stats, {k: after[k] - before[k] for k in after}


async def bench(config: EngineConfig, modes: list[str], batches: list[int], engines: list[str], requests: int,
                max_tokens: int, temperature: float, progress=print) -> list[dict]:
    rows = []
    for kind in engines:
        for batch in batches:
            engine = build_engine(replace(config, kind=kind, max_batch=batch))
            try:
                await _run(engine, "chain", batch, batch, 8, temperature)  # warm-up
                for mode in modes:
                    tokens, seconds, stats, t = await _run(engine, mode, batch, requests,
                                                           max_tokens, temperature)
                    row = Row(kind, mode, batch, tokens, seconds, t["rounds"], stats, t["draft_s"], t["verify_s"])
                    rows.append(row.as_dict())
                    progress(format_row(rows[-1]))
            finally:
                await engine.shutdown()
    return rows


COLUMNS = [("engine", "{}"), ("mode", "{}"), ("batch", "{}"), ("output_tokens_per_s", "{:.1f}"),
           ("acceptance_rate", "{:.3f}"), ("mean_acceptance_length", "{:.2f}"), ("cache_hit_rate", "{:.3f}"),
           ("round_ms", "{:.2f}"), ("draft_ms", "{:.2f}"), ("verify_ms", "{:.2f}"), ("other_ms", "{:.2f}")]


def format_row(row: dict) -> str:
    return " | ".join("-" if row[k] is None else fmt.format(row[k]) for k, fmt in COLUMNS)


def markdown(rows: list[dict]) -> str:
    head = "| " + " | ".join(k for k, _ in COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "\n".join("| " + format_row(r) + " |" for r in rows)


def dump(rows: list[dict], path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
