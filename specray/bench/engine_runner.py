"""Drive an in-process `Engine` (local workers or Ray actors) and measure it: shared by `specray bench`
and `specray bench engine`.

`drive` sends requests with at most `concurrency` in flight and records each request's streamed
deltas with their arrival times, the merged speculation statistics, and the per-round time split
from `Engine.timings()` (the workers' busy seconds) over the run, with the KiB of speculations and
hidden states the workers sent each other per round."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace

from specray.bench.metrics import Measurement, Trace, round_split
from specray.core.sampling import SamplingParams
from specray.core.sequence import SpecStats
from specray.core.speculation import SpeculationConfig
from specray.engine import Engine, EngineRequest

MODES = {
    "off": SpeculationConfig("off"),
    "chain": SpeculationConfig("chain", 4),
    "tree": SpeculationConfig("tree", 3, (2, 2, 1)),
    "async": SpeculationConfig("async", 4),
}


def mode_spec(name: str) -> SpeculationConfig:
    """A bench mode: a MODES name; `chain:K` / `async:K` for another draft length K; `async:c=C` (or
    `async:K:c=C`) for SSD with Saguaro weight C."""
    mode, *options = name.split(":")
    if mode not in MODES or (options and mode not in ("chain", "async")):
        raise ValueError(f"unknown mode {name!r}; choose from {list(MODES)}, or chain:K / async:K / async:c=C / "
                         "async:K:c=C")
    ks = [o for o in options if not o.startswith("c=")]
    cs = [o[2:] for o in options if o.startswith("c=")]
    if len(ks) > 1 or len(cs) > 1 or (cs and mode != "async") or any(not k.isdigit() or int(k) < 1 for k in ks) \
            or any(not c.replace(".", "", 1).isdigit() for c in cs):
        raise ValueError(f"mode {name!r}: K must be an integer >= 1 and c=C (async only) a number in (0, 1]")
    given = {"num_speculative_tokens": int(ks[0])} if ks else {}
    return replace(MODES[mode], **given, **({"saguaro_c": float(cs[0])} if cs else {}))


def engine_requests(tag: str, prompts: list[list[int]], mode: str, max_tokens: int, temperature: float,
                    seed: int = 0) -> list[EngineRequest]:
    """One request per prompt in `mode`, exactly max_tokens long (EOS ignored), seeded seed + i."""
    return [EngineRequest(f"{tag}-{i}", tuple(p), SamplingParams(temperature, seed=seed + i), mode_spec(mode),
                          max_tokens, ignore_eos=True) for i, p in enumerate(prompts)]


async def drive(engine: Engine, requests: list[EngineRequest], concurrency: int,
                on_done: Callable[[], None] | None = None) -> Measurement:
    """Run `requests` with at most `concurrency` in flight; on_done is called as each one finishes."""
    sem = asyncio.Semaphore(concurrency)
    traces: list[Trace] = [Trace(0.0)] * len(requests)
    stats = SpecStats()

    async def one(i: int, req: EngineRequest) -> None:
        async with sem:
            trace = traces[i] = Trace(time.perf_counter())
            async for delta in engine.generate(req):
                trace.add(time.perf_counter(), list(delta.token_ids))
                if delta.stats is not None:
                    stats.merge(delta.stats)
            if on_done is not None:
                on_done()

    before = await engine.timings()
    start = time.perf_counter()
    await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
    wall = time.perf_counter() - start
    after = await engine.timings()
    spent = {k: after[k] - before[k] for k in after}
    overlapped = all(r.spec.mode == "async" for r in requests)
    split = round_split(wall, spent["rounds"], spent["draft_s"], spent["verify_s"], overlapped)
    split["wire_kb"] = spent["wire_bytes"] / max(spent["rounds"], 1) / 1024  # sent between workers, per round
    return Measurement(traces, wall, stats, split)
