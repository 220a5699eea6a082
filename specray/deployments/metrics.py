"""Serving metrics through `ray.util.metrics`, exported by Ray's Prometheus endpoint (prefix `ray_`).

Names follow the serving world's (vLLM's spec-decode metrics): drafted and accepted tokens, accepted per position, verification
steps, SSD cache lookups and hits, TTFT and TPOT histograms, running and waiting requests. Every
series carries the speculation mode of the request it counts."""
from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

from specray.core.sequence import SpecStats

LATENCY_BOUNDS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


class ServeMetrics:
    def __init__(self):
        mode = ("mode",)
        self.requests = Counter("specray_requests_total", "Requests finished, by finish reason",
                                tag_keys=("mode", "finish_reason"))
        self.errors = Counter("specray_request_errors_total", "Requests that failed, by gRPC status",
                              tag_keys=("code",))
        self.output_tokens = Counter("specray_output_tokens_total", "Tokens generated", tag_keys=mode)
        self.steps = Counter("specray_verification_steps_total", "Verification rounds", tag_keys=mode)
        self.drafted = Counter("specray_draft_tokens_total", "Draft positions proposed", tag_keys=mode)
        self.accepted = Counter("specray_accepted_tokens_total", "Draft tokens accepted", tag_keys=mode)
        self.per_position = Counter("specray_accepted_per_position_total", "Draft tokens accepted at each "
                                    "depth (position 1 is the first draft token)", tag_keys=("mode", "position"))
        self.lookups = Counter("specray_cache_lookups_total", "SSD speculation-cache lookups", tag_keys=mode)
        self.hits = Counter("specray_cache_hits_total", "SSD speculation-cache hits", tag_keys=mode)
        self.ttft = Histogram("specray_time_to_first_token_seconds", "Time to first token",
                              boundaries=LATENCY_BOUNDS_S, tag_keys=mode)
        self.tpot = Histogram("specray_time_per_output_token_seconds", "Time per output token after the first",
                              boundaries=LATENCY_BOUNDS_S, tag_keys=mode)
        self.running = Gauge("specray_running_requests", "Requests in the running batch")
        self.waiting = Gauge("specray_waiting_requests", "Requests queued for a slot")

    def first_token(self, mode: str, seconds: float) -> None:
        self.ttft.observe(seconds, tags={"mode": mode})

    def finished(self, mode: str, reason: str, stats: SpecStats, num_tokens: int, decode_s: float) -> None:
        """One request done: its statistics, and the seconds from its first to its last token."""
        tags = {"mode": mode}
        self.requests.inc(1, tags={"mode": mode, "finish_reason": reason})
        self.output_tokens.inc(num_tokens, tags=tags)
        for counter, value in ((self.steps, stats.num_steps), (self.drafted, stats.num_draft_tokens),
                               (self.accepted, stats.num_accepted_tokens), (self.lookups, stats.cache_lookups),
                               (self.hits, stats.cache_hits)):
            if value:
                counter.inc(value, tags=tags)
        for i, n in enumerate(stats.accepted_per_position):
            if n:
                self.per_position.inc(n, tags={"mode": mode, "position": str(i + 1)})
        if num_tokens > 1:
            self.tpot.observe(decode_s / (num_tokens - 1), tags=tags)

    def failed(self, code: str) -> None:
        self.errors.inc(1, tags={"code": code})

    def load(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
