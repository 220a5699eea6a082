"""In-process reference generation: draft, target stages and the round loop in one process.

This is the algorithm with nothing around it: the distributed engine runs the same `Drafter` and
`TargetStage` objects inside Ray actors, so its output must equal this one's."""
from __future__ import annotations

from dataclasses import dataclass

from specray.core.drafter import Drafter
from specray.core.model import Shard
from specray.core.sampling import SamplingParams
from specray.core.sequence import Sequence, SpecStats
from specray.core.speculation import SpeculationConfig
from specray.core.target import TargetStage


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str
    stats: SpecStats


def run_round(drafter: Drafter, stages: list[TargetStage], rids: list[str]):
    """One verification round for every sequence: propose, verify through the stages, commit."""
    specs = drafter.propose(rids)
    drafter.prepare(rids)  # SSD drafts the next round here; in the Ray engine this overlaps verification
    hidden = None
    for stage in stages:
        hidden = stage.forward(specs, hidden)
    outcomes = stages[-1].verify(specs, hidden)
    for stage in stages:
        stage.commit(outcomes)
    drafter.commit(outcomes)
    return specs, outcomes


def prefill(stages: list[TargetStage], rid: str, prompt: list[int]) -> None:
    """Feed all but the last prompt token through the stages (the last is t0 of the first round)."""
    hidden = prompt[:-1]
    if hidden:
        for stage in stages:
            hidden = stage.prefill(rid, hidden)


def generate(target: list[Shard], draft: Shard | None, prompts: list[list[int]],
             params: SamplingParams | list[SamplingParams], spec: SpeculationConfig | list[SpeculationConfig],
             max_tokens: int, eos_ids: tuple[int, ...] = (), top_n: int = 8) -> list[Completion]:
    """Generate for every prompt at once (one batch). `target` is the list of stage shards."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    specs = spec if isinstance(spec, list) else [spec] * len(prompts)
    if draft is None and any(s.mode != "off" for s in specs):
        raise ValueError("a draft model is needed for speculative modes")
    max_len = max(len(p) for p in prompts) + max_tokens + max(s.draft_rows for s in specs)
    slots = len(prompts)
    drafter = Drafter(draft if draft is not None else target[0], slots, max_len, top_n)
    stages = [TargetStage(shard, slots, max_len) for shard in target]
    seqs = {}
    for i, (prompt, p, s) in enumerate(zip(prompts, params, specs)):
        if not prompt:
            raise ValueError("prompt must not be empty")
        rid = str(i)
        seqs[rid] = Sequence(rid, list(prompt), max_tokens, frozenset(eos_ids))
        drafter.add(rid, prompt, p, s)
        for stage in stages:
            stage.add(rid, p)
        prefill(stages, rid, prompt)
    running = list(seqs)
    while running:
        round_specs, outcomes = run_round(drafter, stages, running)
        for sent in round_specs:
            seq, out = seqs[sent.rid], outcomes[sent.rid]
            seq.stats.record(sent.tree.depth, out, sent.stats)
            seq.extend([sent.tokens[j] for j in out.accepted] + [out.token])
        for rid in [r for r in running if seqs[r].finish_reason]:
            running.remove(rid)
            drafter.remove(rid)
            for stage in stages:
                stage.remove(rid)
    return [Completion(s.output, s.finish_reason, s.stats) for s in seqs.values()]
