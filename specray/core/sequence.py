"""A request's output bookkeeping: committed tokens, finishing rules, speculation statistics.

Metric names follow the serving world's (acceptance rate α = accepted / drafted, mean acceptance
length τ = 1 + accepted / rounds, accepted per position, SSD cache hit rate). For a tree, the
drafted tokens of a round are its draft positions (the tree depth), so the acceptance rate
compares across chain and tree."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from specray.core.verify import Outcome


@dataclass
class SpecStats:
    num_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    cache_lookups: int = 0
    cache_hits: int = 0

    def record(self, depth: int, outcome: Outcome, draft_stats: dict | None = None) -> None:
        """Count one round: its draft depth, its outcome and the draft's SSD cache lookup, if any."""
        self.num_steps += 1
        self.cache_lookups += (draft_stats or {}).get("cache_lookups", 0)
        self.cache_hits += (draft_stats or {}).get("cache_hits", 0)
        self.num_draft_tokens += depth
        self.num_accepted_tokens += outcome.num_accepted
        if len(self.accepted_per_position) < depth:
            self.accepted_per_position += [0] * (depth - len(self.accepted_per_position))
        for i in range(outcome.num_accepted):
            self.accepted_per_position[i] += 1

    def merge(self, other: SpecStats) -> None:
        for name in ("num_steps", "num_draft_tokens", "num_accepted_tokens", "cache_lookups", "cache_hits"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        pp = other.accepted_per_position
        self.accepted_per_position += [0] * (len(pp) - len(self.accepted_per_position))
        for i, v in enumerate(pp):
            self.accepted_per_position[i] += v

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        return 1 + self.num_accepted_tokens / self.num_steps if self.num_steps else 0.0

    @property
    def cache_hit_rate(self) -> float:
        return self.cache_hits / self.cache_lookups if self.cache_lookups else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate,
                "mean_acceptance_length": self.mean_acceptance_length, "cache_hit_rate": self.cache_hit_rate}


@dataclass
class Sequence:
    rid: str
    prompt: list[int]
    max_tokens: int
    eos_ids: frozenset[int] = frozenset()
    output: list[int] = field(default_factory=list)
    stats: SpecStats = field(default_factory=SpecStats)
    finish_reason: str | None = None  # "length" | "eos" | "stop"

    def extend(self, tokens: list[int]) -> list[int]:
        """Append one round's committed tokens, cut at EOS or max_tokens; returns what was kept."""
        kept = []
        for t in tokens:
            kept.append(t)
            if t in self.eos_ids:
                self.finish_reason = "eos"
                break
            if len(self.output) + len(kept) >= self.max_tokens:
                self.finish_reason = "length"
                break
        self.output += kept
        return kept
