"""Benchmark metrics from client-side timestamps and speculation counters. Pure: no models, no clocks.

A `Trace` is one request as its client saw it: when it was sent, and for every streamed chunk that
carried tokens, when it arrived and which token ids it carried. With speculation one chunk carries
a round's committed block (τ tokens on average); target-only decoding streams one token per chunk.
Definitions follow vLLM's benchmark_serving (times in ms):

- TTFT: first chunk's arrival - send time.
- E2E latency: last chunk's arrival - send time.
- TPOT: (E2E - TTFT) / (output tokens - 1), per request (requests with one token have none); the
  per-token figure to compare across modes.
- ITL: the gap between consecutive chunks of a request, pooled over all requests (vLLM's `itl`:
  per chunk, not divided by the chunk's tokens). A chunk holds `tokens_per_chunk` tokens on average,
  so with speculation ITL ≈ tokens_per_chunk × TPOT.
- output tokens/s and requests/s: totals over the wall time of the whole setting (first send to
  last arrival), as vLLM's output and request throughput.
- Each latency is summarised as mean, p50, p90, p99; percentiles interpolate linearly between the
  closest ranks (numpy's default).
- α = accepted / drafted, τ = 1 + accepted / rounds, accepted per position (counts, and as a rate
  per round), SSD cache hit rate = hits / lookups (None without lookups).
- Round split (engines whose workers report busy time): wall ms per round, draft and verification
  compute ms per round (prefill included, spread over a request's rounds), and `other` = the rest
  (waiting, transport, scheduling, the engine's own work); when the draft's preparation runs off the
  critical path (SSD) the draft is not subtracted."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from specray.core.sequence import SpecStats

QUANTILES = (50, 90, 99)


@dataclass
class Trace:
    start: float                                     # send time, seconds
    arrivals: list[float] = field(default_factory=list)  # one per chunk with tokens, seconds
    sizes: list[int] = field(default_factory=list)       # tokens in each chunk
    token_ids: list[int] = field(default_factory=list)   # the whole output
    error: str | None = None                             # the request failed (excluded from latencies)

    def add(self, when: float, token_ids: list[int]) -> None:
        """Record one streamed chunk; chunks without tokens are not chunks."""
        if token_ids:
            self.arrivals.append(when)
            self.sizes.append(len(token_ids))
            self.token_ids += token_ids

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.start

    @property
    def e2e(self) -> float:
        return self.arrivals[-1] - self.start

    @property
    def tpot(self) -> float | None:
        n = len(self.token_ids)
        return (self.e2e - self.ttft) / (n - 1) if n > 1 else None

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks; NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary_ms(seconds: list[float]) -> dict:
    """{"mean", "p50", "p90", "p99"} in milliseconds of durations given in seconds (NaN when empty)."""
    ms = [1000 * s for s in seconds]
    out = {"mean": sum(ms) / len(ms) if ms else math.nan}
    out.update({f"p{q}": percentile(ms, q) for q in QUANTILES})
    return out


def latency_metrics(traces: list[Trace], wall_s: float) -> dict:
    """TTFT, TPOT, ITL, E2E summaries and throughputs of one setting's requests."""
    ok = [t for t in traces if t.error is None and t.arrivals]
    tokens = sum(len(t.token_ids) for t in ok)
    chunks = sum(len(t.arrivals) for t in ok)
    return {
        "requests": len(traces), "errors": len(traces) - len(ok), "output_tokens": tokens, "wall_s": wall_s,
        "output_tokens_per_s": tokens / wall_s if wall_s > 0 else math.nan,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else math.nan,
        "tokens_per_chunk": tokens / chunks if chunks else math.nan,
        "ttft_ms": summary_ms([t.ttft for t in ok]),
        "tpot_ms": summary_ms([t.tpot for t in ok if t.tpot is not None]),
        "itl_ms": summary_ms([gap for t in ok for gap in t.itls]),
        "e2e_ms": summary_ms([t.e2e for t in ok]),
    }


def speculation_metrics(stats: SpecStats) -> dict:
    """α, τ, accepted per position (counts and per-round rates) and the SSD cache hit rate."""
    steps = stats.num_steps
    return {
        "acceptance_rate": stats.acceptance_rate if stats.num_draft_tokens else None,
        "mean_acceptance_length": stats.mean_acceptance_length if steps else None,
        "accepted_per_position": list(stats.accepted_per_position),
        "acceptance_by_position": [n / steps for n in stats.accepted_per_position] if steps else [],
        "cache_hit_rate": stats.cache_hit_rate if stats.cache_lookups else None,
    }


def round_split(seconds: float, rounds: int, draft_s: float, verify_s: float, draft_overlapped: bool) -> dict:
    """Per-round wall, draft, verification and other ms; draft_overlapped: the draft ran off the
    critical path (SSD), so it is not part of the round's critical compute."""
    per = 1000 / max(rounds, 1)
    critical = verify_s + (0.0 if draft_overlapped else draft_s)
    return {"rounds": rounds, "round_ms": seconds * per, "draft_ms": draft_s * per, "verify_ms": verify_s * per,
            "other_ms": (seconds - critical) * per}


def identical(outputs: list[list[int]], reference: list[list[int]]) -> int:
    """How many outputs equal their reference token for token (the lossless check for greedy runs)."""
    if len(outputs) != len(reference):
        raise ValueError(f"{len(outputs)} outputs for {len(reference)} references")
    return sum(list(a) == list(b) for a, b in zip(outputs, reference))


@dataclass
class Measurement:
    """One setting's run: its requests' traces (in request order), the wall time from first send to last
    arrival, the merged speculation counters and the round split (None where a system reports none)."""
    traces: list[Trace]
    wall_s: float
    stats: SpecStats | None = None
    split: dict | None = None


def row(labels: dict, m: Measurement, reference: list[list[int]] | None = None) -> dict:
    """One result row: labels + latency + speculation metrics + round split + `identical` (None: no
    reference, i.e. sampled; else how many outputs equal their reference: exact when it is `requests`)."""
    out = {**labels, **latency_metrics(m.traces, m.wall_s)}
    out.update(speculation_metrics(m.stats if m.stats is not None else SpecStats()))
    out.update(m.split or dict.fromkeys(("rounds", "round_ms", "draft_ms", "verify_ms", "other_ms")))
    out["identical"] = None if reference is None else identical([t.token_ids for t in m.traces], reference)
    return out
