"""A target stage worker: layers [start, stop) of the target and their KV slots behind a core `TargetStage`.

Speculations arrive and hidden states leave in wire form (numpy; specray.actors.wire). The last
stage verifies and commits in the same call and returns two things: the outcomes (for the draft
and the other stages) and a `RoundResult` per sequence for the engine, so no logits or hidden
states ever reach the engine. Like the draft worker, a call's `outcomes` argument is the previous
round's, committed before anything else. Knows nothing of Serve or gRPC."""
from __future__ import annotations

from dataclasses import dataclass, field

from specray.actors import Busy, node_id, set_threads, worker_device
from specray.actors.wire import HiddenWire, SpecWire, hidden_from_wire, hidden_to_wire, specs_from_wire
from specray.core.loader import load_shard
from specray.core.sampling import SamplingParams
from specray.core.target import TargetStage
from specray.core.verify import Outcome

Outcomes = dict[str, Outcome]


@dataclass(frozen=True)
class RoundResult:
    """What the engine learns from one round of one sequence."""
    tokens: tuple[int, ...]  # accepted draft tokens, then the correction or bonus token
    num_accepted: int
    depth: int               # draft positions verified (the tree depth; 0 in off mode)
    stats: dict = field(default_factory=dict)  # draft-side bookkeeping, e.g. cache_lookups, cache_hits


class TargetStageWorker:
    def __init__(self, path: str, start: int, stop: int, num_slots: int, max_len: int, dtype: str = "float32",
                 device: str = "auto", num_threads: float | None = None):
        set_threads(num_threads)
        self.device = worker_device(device)
        self.stage = TargetStage(load_shard(path, start, stop, dtype, self.device), num_slots, max_len)
        self.busy = Busy()  # in forward, verify and commit

    def node_id(self) -> str | None:
        return node_id()

    def busy_seconds(self) -> float:
        return self.busy.seconds

    def num_free(self) -> int:
        return self.stage.num_free

    def _hidden(self, hidden: HiddenWire | None):
        return None if hidden is None else hidden_from_wire(hidden, self.device)

    def _commit(self, outcomes: Outcomes | None) -> None:
        if outcomes:
            self.stage.commit(outcomes)

    def add(self, reqs: list[tuple[str, list[int], SamplingParams]],
            hidden: dict[str, HiddenWire] | None = None,
            outcomes: Outcomes | None = None) -> dict[str, HiddenWire] | None:
        """Register and prefill each (rid, prompt, params): all but the last prompt token, as ids on the
        first stage, else as the previous stage's hidden states. Returns this stage's hidden states
        (None from the last stage)."""
        self._commit(outcomes)
        out = {}
        for rid, prompt, params in reqs:
            self.stage.add(rid, params)
            if self.stage.shard.is_first:
                x = prompt[:-1] or None
            else:
                x = hidden_from_wire(hidden[rid], self.device) if hidden and rid in hidden else None
            if x is not None:
                out[rid] = hidden_to_wire(self.stage.prefill(rid, x))
        return None if self.stage.shard.is_last else out

    def forward(self, specs: list[SpecWire], hidden: HiddenWire | None = None,
                outcomes: Outcomes | None = None) -> HiddenWire:
        """Verification forward of a stage before the last; hidden: the previous stage's (None first)."""
        with self.busy:
            self._commit(outcomes)
            return hidden_to_wire(self.stage.forward(specs_from_wire(specs), self._hidden(hidden)))

    def verify(self, wire: list[SpecWire], hidden: HiddenWire | None = None,
               outcomes: Outcomes | None = None) -> tuple[Outcomes, dict[str, RoundResult]]:
        """Last stage: forward, verify, commit. Returns (outcomes, {rid: RoundResult})."""
        with self.busy:
            self._commit(outcomes)
            specs = specs_from_wire(wire)
            new = self.stage.verify(specs, self.stage.forward(specs, self._hidden(hidden)))
            self.stage.commit(new)
        return new, {s.rid: RoundResult(tuple(s.tokens[j] for j in new[s.rid].accepted) + (new[s.rid].token,),
                                        new[s.rid].num_accepted, s.tree.depth, dict(s.stats)) for s in specs}

    def commit(self, outcomes: Outcomes) -> None:
        with self.busy:
            self.stage.commit(outcomes)

    def remove(self, rids: list[str], outcomes: Outcomes | None = None) -> None:
        """Free sequences' slots (unknown ids are ignored: a failed admission may have added only some)."""
        self._commit(outcomes)
        for rid in rids:
            if rid in self.stage.seqs:
                self.stage.remove(rid)
