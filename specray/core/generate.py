"""In-process reference generation: draft, target stages and the round loop in one process.

This is the algorithm with nothing around it: the same step (core.step.run_step) over the same
`Drafter` and `TargetStage` objects that the distributed engine runs inside Ray actors, so its
output must equal this one's."""
from __future__ import annotations

from dataclasses import dataclass

from specray.core.drafter import Drafter
from specray.core.model import Shard
from specray.core.sampling import SamplingParams
from specray.core.sequence import Sequence, SpecStats
from specray.core.speculation import SpeculationConfig
from specray.core.step import Admission, Work, direct, run_step
from specray.core.target import TargetStage


class SequentialDraft:
    """The draft side of a step in one thread: SSD's preparation right after the proposal (the
    draft worker runs it beside the verification instead; the draws are the same)."""

    def __init__(self, drafter: Drafter):
        self.drafter = drafter

    def propose(self, work: Work) -> list:
        specs = self.drafter.propose(work)
        self.drafter.prepare(work)
        return specs


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str
    stats: SpecStats


def generate(target: list[Shard], draft: Shard | None, prompts: list[list[int]],
             params: SamplingParams | list[SamplingParams], spec: SpeculationConfig | list[SpeculationConfig],
             max_tokens: int, eos_ids: tuple[int, ...] = ()) -> list[Completion]:
    """Generate for every prompt at once (one batch). `target` is the list of stage shards."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    specs = spec if isinstance(spec, list) else [spec] * len(prompts)
    if draft is None and any(s.mode != "off" for s in specs):
        raise ValueError("a draft model is needed for speculative modes")
    max_len = max(len(p) for p in prompts) + max_tokens + max(s.draft_rows for s in specs)
    slots = len(prompts)
    drafter = Drafter(draft if draft is not None else target[0], slots, max_len)
    head = draft.lm_head if draft is not None else None
    stages = [TargetStage(shard, slots, max_len, draft_head=head if shard.is_last else None) for shard in target]
    seqs, admit = {}, []
    for i, (prompt, p, s) in enumerate(zip(prompts, params, specs)):
        if not prompt:
            raise ValueError("prompt must not be empty")
        seqs[str(i)] = Sequence(str(i), list(prompt), max_tokens, frozenset(eos_ids))
        admit.append(Admission(str(i), tuple(prompt), p, s))
    work, draft_side = Work(add=tuple(admit), rids=tuple(seqs)), SequentialDraft(drafter)
    while work.rids:
        results = run_step(direct, draft_side, stages, work)
        for rid, result in results.items():
            seqs[rid].stats.record(result.depth, result.outcome, result.stats)
            seqs[rid].extend(list(result.tokens))
        done = tuple(rid for rid in work.rids if seqs[rid].finish_reason)
        work = Work({rid: r.outcome for rid, r in results.items()}, done,
                    rids=tuple(r for r in work.rids if r not in done))
    return [Completion(s.output, s.finish_reason, s.stats) for s in seqs.values()]
