"""The draft side of speculation: the draft model, its KV slots and each sequence's tokens.

`propose` drafts one token tree per sequence, one batched forward per tree depth (all sequences
and all nodes of a depth together), and records the exact law each node's children were drawn
from. `commit` keeps the accepted path in the draft's cache. The deepest nodes are never fed to
the draft, so after a full accept the draft has one token more to feed next round; every round
simply feeds whatever committed tokens its cache lacks. Knows nothing of Ray."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from specray.core.batch import Rows, causal_rows, pack
from specray.core.model import Shard
from specray.core.sampling import SamplingParams, draft_law, draw_children, make_generator
from specray.core.speculation import Speculation, SpeculationConfig
from specray.core.tree import Tree
from specray.core.verify import Outcome


@dataclass
class DraftSeq:
    tokens: list[int]
    params: SamplingParams
    spec: SpeculationConfig
    generator: torch.Generator
    slot: int | None
    last: Speculation | None = None
    base: int = 0      # committed cache length when the last speculation was drafted
    pending: int = 0   # committed tokens fed at depth 0 of the last speculation


class Drafter:
    def __init__(self, shard: Shard, num_slots: int, max_len: int, top_n: int = 8, prefill_chunk: int = 512):
        self.shard = shard
        self.top_n = top_n  # width of the compact draft law shipped per tree node
        self.cache = shard.new_cache(num_slots, max_len)
        self.prefill_chunk = prefill_chunk
        self.seqs: dict[str, DraftSeq] = {}

    def add(self, rid: str, prompt: list[int], params: SamplingParams, spec: SpeculationConfig) -> None:
        """Register a sequence and prefill all but its last prompt token (off mode: no draft slot)."""
        if max(spec.branching, default=1) > self.top_n:
            raise ValueError(f"branching {list(spec.branching)} is wider than the draft law width {self.top_n}")
        slot = self.cache.allocate() if spec.mode != "off" else None
        self.seqs[rid] = DraftSeq(list(prompt), params, spec, make_generator(params.seed, "draft"), slot)
        if slot is not None:
            for i in range(0, len(prompt) - 1, self.prefill_chunk):
                self._forward([slot], [causal_rows(prompt[i:min(i + self.prefill_chunk, len(prompt) - 1)], i)])

    def remove(self, rid: str) -> None:
        seq = self.seqs.pop(rid)
        if seq.slot is not None:
            self.cache.release(seq.slot)

    def _forward(self, slots: list[int], rows: list[Rows]) -> torch.Tensor:
        p = pack(rows)
        return self.shard(p.x, self.cache, torch.tensor(slots), p.positions, p.base, p.window, p.num_valid)

    def _laws(self, hidden: torch.Tensor, params: list[SamplingParams]):
        """hidden [R, H] -> draft law ids, probs [R, top_n]."""
        ids, probs = draft_law(self.shard.logits(hidden)[:, None], params, self.top_n)
        return ids[:, 0], probs[:, 0]

    def propose(self, rids: list[str]) -> list[Speculation]:
        specs = []
        for rid in rids:
            seq = self.seqs[rid]
            tree, top_n = seq.spec.tree, self.top_n
            seq.base = 0 if seq.slot is None else int(self.cache.lengths[seq.slot])
            seq.pending = len(seq.tokens) - seq.base
            seq.last = Speculation(rid, seq.tokens[-1], tree, [0] * tree.num_nodes,
                                   torch.zeros(1 + tree.num_nodes, top_n, dtype=torch.long),
                                   torch.zeros(1 + tree.num_nodes, top_n), seq.spec.with_replacement)
            specs.append(seq.last)
        drafting = [self.seqs[rid] for rid in rids if self.seqs[rid].last.tree.num_nodes]
        for depth in range(max((s.last.tree.depth for s in drafting), default=0)):
            level = [s for s in drafting if s.last.tree.depth > depth]
            rows, parents = zip(*(self._level_rows(s, depth) for s in level))
            hidden = self._forward([s.slot for s in level], list(rows))
            picks = torch.cat([hidden[i, torch.tensor(idx)] for i, idx in enumerate(parents)])
            ids, probs = self._laws(picks, [s.params for s, idx in zip(level, parents) for _ in idx])
            r = 0
            for s, idx in zip(level, parents):
                for node in self._parents_at(s.last.tree, depth):
                    self._draw(s, node, ids[r], probs[r])
                    r += 1
        return specs

    @staticmethod
    def _parents_at(tree: Tree, depth: int) -> tuple[int, ...]:
        return (-1,) if depth == 0 else tree.levels[depth - 1]

    def _level_rows(self, seq: DraftSeq, depth: int) -> tuple[Rows, list[int]]:
        """Rows fed at this depth and, per parent node, the row index holding its hidden state."""
        tree, p = seq.last.tree, seq.pending
        if depth == 0:
            return causal_rows(seq.tokens[seq.base:], seq.base), [p - 1]
        nodes = tree.levels[depth - 1]
        window = torch.zeros(len(nodes), p + nodes[-1] + 1, dtype=torch.bool)
        window[:, :p] = True
        for i, j in enumerate(nodes):
            window[i, [p + a for a in tree.path(j)]] = True
        positions = [seq.base + p - 1 + depth] * len(nodes)
        return Rows([seq.last.tokens[j] for j in nodes], positions, seq.base, window), list(range(len(nodes)))

    def _draw(self, seq: DraftSeq, node: int, ids: torch.Tensor, probs: torch.Tensor) -> None:
        spec = seq.last
        children = spec.tree.children(node)
        spec.q_ids[node + 1], spec.q_probs[node + 1] = ids, probs
        drawn = draw_children(ids, probs, len(children), spec.with_replacement, seq.generator)
        for child, token in zip(children, drawn):
            spec.tokens[child] = token

    def commit(self, outcomes: dict[str, Outcome]) -> None:
        """Keep each sequence's accepted path and append its accepted and correction/bonus tokens."""
        for rid, out in outcomes.items():
            seq = self.seqs[rid]
            tree = seq.last.tree
            if seq.slot is not None:
                fed = [seq.pending + j for j in out.accepted if tree.depths[j] < tree.depth]
                self.cache.compact(seq.slot, seq.base, list(range(seq.pending)) + fed)
            seq.tokens += [seq.last.tokens[j] for j in out.accepted] + [out.token]
