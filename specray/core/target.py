"""One target stage: a layer range of the target model with its KV slots.

Every stage applies a step's work (core.step: commit, remove, admit with prefill), then runs the
verification forward over [t0] + the speculation's tree for each sequence; the last stage also
turns its rows into target probabilities, recomputes the draft's law from the draft's hidden states
with its own copy of the draft's LM head, and verifies, so no V-wide tensor crosses an actor
boundary. `commit` keeps t0 and the accepted path in this stage's cache. Knows nothing of Ray."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from specray.core.batch import Rows, causal_rows, pack
from specray.core.model import Shard, head_logits
from specray.core.sampling import SamplingParams, draft_law, make_generator, target_probs
from specray.core.speculation import Speculation
from specray.core.step import RoundResult, Work
from specray.core.verify import Outcome, TorchRng, chain_outcomes, verify_chains, verify_greedy, verify_tree

Prefilled = dict[str, torch.Tensor]  # rid -> hidden [1, n, H] of its prompt (to the next stage)
Upstream = tuple[Prefilled, torch.Tensor | None] | None  # a stage's output: prefill and round hidden states


@dataclass
class TargetSeq:
    slot: int
    params: SamplingParams
    rng: TorchRng
    base: int = 0  # committed length when the last speculation was verified


class TargetStage:
    def __init__(self, shard: Shard, num_slots: int, max_len: int, prefill_chunk: int = 512,
                 draft_head: torch.nn.Linear | None = None):
        """draft_head: the draft's LM head (last stage; needed to verify sampled speculations)."""
        self.shard = shard
        self.draft_head = draft_head
        self.cache = shard.new_cache(num_slots, max_len)
        self.prefill_chunk = prefill_chunk
        self.seqs: dict[str, TargetSeq] = {}

    @property
    def num_free(self) -> int:
        return self.cache.num_free

    def add(self, rid: str, params: SamplingParams) -> None:
        self.seqs[rid] = TargetSeq(self.cache.allocate(), params, TorchRng(make_generator(params.seed, "target")))

    def remove(self, rid: str) -> None:
        self.cache.release(self.seqs.pop(rid).slot)

    def prefill(self, rid: str, x: list[int] | torch.Tensor) -> torch.Tensor | None:
        """Feed all but the last prompt token: ids (first stage) or hidden [1, n, H]. Returns hidden."""
        slot = torch.tensor([self.seqs[rid].slot])
        n = len(x) if isinstance(x, list) else x.shape[1]
        outs = []
        for i in range(0, n, self.prefill_chunk):
            j = min(i + self.prefill_chunk, n)
            rows = pack([causal_rows(list(range(j - i)), i)])
            chunk = torch.tensor([x[i:j]]) if isinstance(x, list) else x[:, i:j]
            outs.append(self.shard(chunk, self.cache, slot, rows.positions, rows.base, rows.window))
        return torch.cat(outs, dim=1) if outs else None

    def apply(self, work: Work, prefilled: Prefilled | None) -> Prefilled:
        """A step's bookkeeping: commit the last outcomes, forget removed sequences, admit and prefill
        new ones (prompt ids on the first stage, else the previous stage's `prefilled` hidden states).
        Returns this stage's prefill hidden states per admitted sequence."""
        self.commit(work.outcomes)
        for rid in work.remove:
            if rid in self.seqs:
                self.remove(rid)
        out = {}
        for a in work.add:
            self.add(a.rid, a.params)
            x = list(a.prompt[:-1]) if self.shard.is_first else (prefilled or {}).get(a.rid)
            if x is not None and len(x):
                out[a.rid] = self.prefill(a.rid, x)
        return out

    def forward(self, work: Work, specs: list[Speculation], up: Upstream = None) -> Upstream:
        """A stage's part of a step: apply the work, then the verification forward of `specs` (the
        sequences of work.rids). up: the previous stage's output (None on the first stage).
        Returns (prefill hidden states, hidden [B, n, H] or None without specs): row 0 of each
        sequence is t0, row 1+j is tree node j."""
        prefilled, x = up if up is not None else (None, None)
        prefilled = self.apply(work, prefilled)
        return prefilled, self._forward(specs, x) if specs else None

    def verify(self, work: Work, specs: list[Speculation], up: Upstream = None) -> dict[str, RoundResult]:
        """Last stage: apply the work, forward, then accept or reject every speculation. The outcomes
        are committed with the next step's work, like every other worker's."""
        _, hidden = self.forward(work, specs, up)
        if not specs:
            return {}
        outcomes = self._verify(specs, hidden)
        results = {}
        for s in specs:
            o = outcomes[s.rid]
            results[s.rid] = RoundResult(o, tuple(s.tokens[j] for j in o.accepted) + (o.token,), s.tree.depth,
                                         dict(s.stats))
        return results

    def _forward(self, specs: list[Speculation], x: torch.Tensor | None = None) -> torch.Tensor:
        """x: hidden [B, n, H] from the previous stage (None on the first). Returns hidden [B, n, H]."""
        rows = []
        for spec in specs:
            seq = self.seqs[spec.rid]
            seq.base = int(self.cache.lengths[seq.slot])
            positions = [seq.base] + [seq.base + d for d in spec.tree.depths]
            rows.append(Rows([spec.root] + spec.tokens, positions, seq.base, spec.tree.mask))
        p = pack(rows)
        slots = np.array([self.seqs[s.rid].slot for s in specs])
        return self.shard(p.x if x is None else x, self.cache, slots, p.positions, p.base, p.window, p.num_valid)

    def _verify(self, specs: list[Speculation], hidden: torch.Tensor) -> dict[str, Outcome]:
        """Accept or reject every speculation. hidden: [B, n, H] from this (the last) stage. Greedy
        requests need only the target's argmax per row. Sampled chains are verified on this stage's
        device, all at once (verify_chains); sampled trees walk their laws on the host (verify_tree)."""
        sizes = [1 + s.tree.num_nodes for s in specs]
        logits = self.shard.logits(torch.cat([hidden[b, :m] for b, m in enumerate(sizes)])).split(sizes)
        greedy = [self.seqs[s.rid].params.greedy for s in specs]
        choices = iter(self._choices([x for x, g in zip(logits, greedy) if g]))  # [1+N] each
        out = {s.rid: verify_greedy(s.tree, s.tokens, next(choices)) for s, g in zip(specs, greedy) if g}
        sampled = [s for s, g in zip(specs, greedy) if not g]
        p = self._target_laws(sampled, [x for x, g in zip(logits, greedy) if not g])
        q = self._draft_laws(sampled)
        chains = [s for s in sampled if s.tree.depth == s.tree.num_nodes and s.rid in q]
        out.update(self._verify_chains(chains, p, q))
        trees = [s for s in sampled if s.rid not in out]
        p, q = _to_host(p, trees), _to_host(q, trees)
        for s in trees:
            out[s.rid] = verify_tree(s.tree, torch.tensor(s.tokens), p[s.rid], q.get(s.rid), s.with_replacement,
                                     self.seqs[s.rid].rng)
        return out

    def _verify_chains(self, specs: list[Speculation], p: dict[str, torch.Tensor],
                       q: dict[str, torch.Tensor]) -> dict[str, Outcome]:
        """Sampled chains grouped by length K, each group verified on the device in one call: K + 1
        uniforms per request from its own generator (so a seeded request replays whatever its batch),
        then one [G, 3] copy back (accepted count, emitted token, finite) per group."""
        groups: dict[int, list[Speculation]] = {}
        for s in specs:
            groups.setdefault(s.tree.num_nodes, []).append(s)
        out = {}
        for k, group in groups.items():
            device = p[group[0].rid].device
            tokens = torch.tensor([s.tokens for s in group], dtype=torch.long).view(len(group), k).to(device)
            u = torch.stack([torch.rand(k + 1, generator=self.seqs[s.rid].rng.generator, dtype=torch.float64)
                             for s in group]).to(device)  # [G, K+1]
            answer = verify_chains(tokens, torch.stack([p[s.rid] for s in group]),
                                   torch.stack([q[s.rid] for s in group]), u).tolist()
            out.update(zip((s.rid for s in group), chain_outcomes(answer)))
        return out

    @staticmethod
    def _choices(logits: list[torch.Tensor]) -> list[torch.Tensor]:
        """The target's argmax at every row # [1+N] of each greedy speculation's logits # [1+N, V]: one
        small device-to-host copy."""
        if not logits:
            return []
        return list(torch.cat(logits).argmax(-1).cpu().split([len(x) for x in logits]))

    def _target_laws(self, specs: list[Speculation], logits: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The target's processed law at every row of each sampled speculation # {rid: [1+N, V]}, on
        this stage's device."""
        if not specs:
            return {}
        params = [self.seqs[s.rid].params for s, rows in zip(specs, logits) for _ in range(len(rows))]
        probs = target_probs(torch.cat(logits)[:, None], params)[:, 0]  # [R, V]
        return dict(zip((s.rid for s in specs), probs.split([len(rows) for rows in logits])))

    def _draft_laws(self, specs: list[Speculation]) -> dict[str, torch.Tensor]:
        """The law each sampled speculation's nodes drew their children from # {rid: [1+N, V]},
        recomputed from the draft's hidden states by the function the draft used (greedy ones ship
        none: their children are point masses), on this stage's device."""
        shipped = [s for s in specs if s.hidden is not None]
        if not shipped:
            return {}
        if self.draft_head is None:
            raise RuntimeError("sampled speculations need the draft's LM head on the last target stage")
        device = self.draft_head.weight.device
        hidden = torch.cat([s.hidden for s in shipped]).to(device)  # [R, H_draft]
        params = [self.seqs[s.rid].params for s in shipped for _ in range(len(s.hidden))]
        cs = [s.saguaro_c for s in shipped for _ in range(len(s.hidden))]
        fans = [f for s in shipped for f in s.row_fans()]
        q = draft_law(head_logits(self.draft_head, hidden), params, fans, cs)  # [R, V]
        return dict(zip((s.rid for s in shipped), q.split([len(s.hidden) for s in shipped])))

    def commit(self, outcomes: dict[str, Outcome]) -> None:
        """Keep t0 and the accepted path's rows contiguously after the committed prefix."""
        for rid, out in outcomes.items():
            seq = self.seqs[rid]
            self.cache.compact(seq.slot, seq.base, [0] + [1 + j for j in out.accepted])


def _to_host(laws: dict[str, torch.Tensor], specs: list[Speculation]) -> dict[str, torch.Tensor]:
    """The laws of `specs` (those present) on the host, in one device-to-host copy."""
    rids = [s.rid for s in specs if s.rid in laws]
    if not rids:
        return {}
    return dict(zip(rids, torch.cat([laws[r] for r in rids]).cpu().split([len(laws[r]) for r in rids])))
