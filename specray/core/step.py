"""One step of the workers, written once.

A step is everything the draft and the target stages do between two looks by the engine. Every
worker first applies the step's `Work` -- commit the previous round's outcomes, forget removed
sequences, admit (prefill) new ones -- then takes its part in one verification round:

    specs   = draft.propose(work)                 # apply, then one speculation per sequence; SSD
                                                  # drafts the next round meanwhile (draft worker)
    up      = stage_i.forward(work, specs, up)    # every stage but the last: hidden states on
    results = last.verify(work, specs, up)        # forward, then accept or reject

The last round's outcomes ride along in the next step's `Work` (the deferred commit): the engine
learns them from `results` anyway, so committing costs no extra message, and each worker commits
exactly between the round that produced the outcomes and its next use of the sequences.

`run_step` is that data flow, and the only place it is written. Its `call(worker, method, *args)`
decides what a call means: a direct call in process (`direct`), a Ray actor call, or a node of a
compiled Ray graph; the values passed along are then results, object refs or graph nodes.
Knows nothing of Ray."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from specray.core.sampling import SamplingParams
from specray.core.speculation import SpeculationConfig
from specray.core.verify import Outcome


@dataclass(frozen=True)
class Admission:
    """A sequence to register and prefill (all but its last prompt token)."""
    rid: str
    prompt: tuple[int, ...]
    params: SamplingParams
    spec: SpeculationConfig


@dataclass(frozen=True)
class Work:
    """One step's orders, the same for every worker, applied in this order before the round."""
    outcomes: dict[str, Outcome] = field(default_factory=dict)  # the last round's, not yet committed
    remove: tuple[str, ...] = ()       # sequences to forget (unknown ids are ignored)
    add: tuple[Admission, ...] = ()    # sequences to admit
    rids: tuple[str, ...] = ()         # sequences to run one round for (may be empty)


@dataclass(frozen=True)
class RoundResult:
    """What the engine learns from one round of one sequence: no logits, no hidden states."""
    outcome: Outcome         # accepted node ids and the correction or bonus token (committed next step)
    tokens: tuple[int, ...]  # accepted draft tokens, then the correction or bonus token
    depth: int               # draft positions verified (the tree depth; 0 in off mode)
    stats: dict = field(default_factory=dict)  # draft-side bookkeeping, e.g. cache_lookups, cache_hits

    @property
    def num_accepted(self) -> int:
        return self.outcome.num_accepted


Call = Callable[..., Any]


def direct(worker, method: str, *args):
    """`call` for workers in this process."""
    return getattr(worker, method)(*args)


def run_step(call: Call, draft, stages: list, work):
    """One step over the draft and the target stages (in layer order): {rid: RoundResult} from the
    last stage."""
    specs = call(draft, "propose", work)
    up = None
    for stage in stages[:-1]:
        up = call(stage, "forward", work, specs, up)
    return call(stages[-1], "verify", work, specs, up)
