"""The draft side of speculation: the draft model, its KV slots and each sequence's tokens.

`propose` drafts one token tree per sequence, one batched forward per tree depth (all sequences
and all nodes of a depth together), and records the exact law each node's children were drawn
from. `commit` keeps the accepted path in the draft's cache. The deepest nodes are never fed to
the draft, so after a full accept the draft has one token more to feed next round; every round
simply feeds whatever committed tokens its cache lacks.

Async (SSD) sequences add a speculation cache: `prepare`, called while the target verifies,
drafts the next round for the likely outcomes; `commit` looks the real outcome up, and `propose`
serves a hit at once or falls back to a backup. Knows nothing of Ray."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from specray.core.batch import Rows, causal_rows, pack
from specray.core.model import Shard
from specray.core.sampling import SamplingParams, draft_law, draw_children, draw_rows, make_generator, top_ids
from specray.core.speculation import Speculation, SpeculationConfig
from specray.core.ssd import SpeculationCache, geometric_fan_out, likely_outcomes, outcome_law
from specray.core.step import Work
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
    base: int = 0      # committed cache rows when `last` was drafted
    pending: int = 0   # committed tokens fed at depth 0 of `last`
    cache: SpeculationCache | None = None  # SSD: built while `last` is verified
    ready: Speculation | None = None       # SSD hit: the next speculation, already drafted
    lookup: str | None = None              # SSD: "hit" / "miss" for the last outcome, None if no cache
    accepted: int = 0
    drafted: int = 0
    reached: list[int] = field(default_factory=list)  # SSD: per draft position, rounds that reached it
    passed: list[int] = field(default_factory=list)   # ... and accepted its token (ssd.outcome_law)


class Drafter:
    def __init__(self, shard: Shard, num_slots: int, max_len: int, prefill_chunk: int = 512,
                 auto_backup_batch: int = 2):
        self.shard = shard
        self.cache = shard.new_cache(num_slots, max_len)
        self.vocab = shard.cfg.vocab_size
        self.dtype = next(shard.parameters()).dtype  # of the hidden states shipped for verification
        self.prefill_chunk = prefill_chunk
        self.auto_backup_batch = auto_backup_batch  # b*: fast SSD backup from this many running sequences
        self.seqs: dict[str, DraftSeq] = {}

    def add(self, rid: str, prompt: list[int], params: SamplingParams, spec: SpeculationConfig) -> None:
        """Register a sequence and prefill all but its last prompt token (off mode: no draft slot)."""
        if max(spec.branching, default=1) > self.vocab:
            raise ValueError(f"branching {list(spec.branching)} is wider than the vocabulary ({self.vocab})")
        slot = self.cache.allocate() if spec.mode != "off" else None
        k = spec.num_speculative_tokens if spec.mode == "async" else 0
        self.seqs[rid] = DraftSeq(list(prompt), params, spec, make_generator(params.seed, "draft"), slot,
                                  reached=[0] * k, passed=[0] * k)
        if slot is not None:
            for i in range(0, len(prompt) - 1, self.prefill_chunk):
                self._forward([slot], [causal_rows(prompt[i:min(i + self.prefill_chunk, len(prompt) - 1)], i)])

    def remove(self, rid: str) -> None:
        seq = self.seqs.pop(rid)
        if seq.slot is not None:
            self.cache.release(seq.slot)

    def _forward(self, slots: list[int], rows: list[Rows]) -> torch.Tensor:
        p = pack(rows)
        return self.shard(p.x, self.cache, np.array(slots), p.positions, p.base, p.window, p.num_valid)

    def _draw_rows(self, hidden: torch.Tensor, seqs: list[DraftSeq], fans: list[int], width: int,
                   counts: list[int]) -> Drawn:
        """hidden [R, H] (row r of seqs[r], weighted for fans[r]) -> counts[r] children drawn from row
        r's draft law, its `width` highest-logit ids and their probabilities, and the hidden rows, on
        the host. Greedy rows take their first ranked ids (draw_children's answer on a point mass). A
        sampled row drawing one child (chains, SSD branches) is drawn where its law is (draw_rows: the
        same inverse-CDF draw as on the host, from the sequence's generator), so no V-wide row leaves
        the device; rows drawing several children (trees) bring their laws to the host for
        draw_children."""
        logits = self.shard.logits(hidden)  # [R, V]
        ranked = logits.argmax(-1, keepdim=True) if width == 1 else top_ids(logits, width)  # [R, W]
        if all(s.params.greedy for s in seqs):
            ranked = ranked.cpu()
            return Drawn([ranked[r, :k].tolist() for r, k in enumerate(counts)], ranked, None, None)
        probs = draft_law(logits, [s.params for s in seqs], fans, [s.spec.saguaro_c for s in seqs])  # [R, V]
        single = [r for r, (s, k) in enumerate(zip(seqs, counts)) if not s.params.greedy and k == 1]
        several = [r for r, (s, k) in enumerate(zip(seqs, counts)) if not s.params.greedy and k > 1]
        ones = draw_rows(probs[single], ranked[single, 0], [seqs[r].generator for r in single]).tolist() if single else []
        host = dict(zip(several, probs[several].cpu())) if several else {}
        ranked_probs, ranked = probs.gather(-1, ranked).cpu(), ranked.cpu()
        children = [ranked[r, :k].tolist() for r, k in enumerate(counts)]  # greedy rows, and rows drawing none
        for r, token in zip(single, ones):
            children[r] = [token]
        for r, law in host.items():
            children[r] = draw_children(law, ranked[r], counts[r], seqs[r].spec.with_replacement, seqs[r].generator)
        return Drawn(children, ranked, ranked_probs, hidden.cpu())

    def _new_speculation(self, rid: str, seq: DraftSeq, root: int, tree: Tree) -> Speculation:
        """An empty speculation to draft into: node tokens, hidden states and ranked ids are filled by
        _draw; an async one gets this round's fan-out."""
        ssd = seq.spec.mode == "async" and tree.num_nodes
        fan_out = self._fan_out(seq) if ssd and not self._by_likelihood(seq) else ()
        guesses = seq.spec.branch_budget if ssd and self._by_likelihood(seq) else max(fan_out, default=0)
        widest = max((len(tree.children(j)) for j in range(-1, tree.num_nodes)), default=1)
        rows, width = 1 + tree.num_nodes, min(self.vocab, max(widest, guesses + 1))
        hidden = None if seq.params.greedy else torch.zeros(rows, self.shard.cfg.hidden_size, dtype=self.dtype)
        return Speculation(rid, root, tree, [0] * tree.num_nodes, hidden, seq.spec.with_replacement,
                           seq.spec.saguaro_c, fan_out, ranked=torch.zeros(rows, width, dtype=torch.long),
                           ranked_probs=torch.zeros(rows, width))

    @staticmethod
    def _by_likelihood(seq: DraftSeq) -> bool:
        """SSD guesses the likeliest outcomes across positions (ssd.likely_outcomes) rather than a
        fixed fan-out: sampled, without Saguaro weights or a fan-out of the request's."""
        return not seq.params.greedy and seq.spec.saguaro_c == 1 and not seq.spec.fan_out

    def _fan_out(self, seq: DraftSeq) -> tuple[int, ...]:
        """SSD guesses per outcome position: the request's (capped at the candidates a position has:
        V - 1, V for the bonus), or geometric in its live acceptance rate."""
        k = seq.spec.num_speculative_tokens
        if seq.spec.fan_out:
            return tuple(min(f, self.vocab - (pos < k)) for pos, f in enumerate(seq.spec.fan_out))
        return geometric_fan_out(k, (seq.accepted + 1) / (seq.drafted + 2), seq.spec.branch_budget, self.vocab)

    def apply(self, work: Work) -> None:
        """A step's bookkeeping (core.step): commit the last outcomes, forget removed sequences, admit."""
        self.commit(work.outcomes)
        for rid in work.remove:
            if rid in self.seqs:
                self.remove(rid)
        for a in work.add:
            self.add(a.rid, list(a.prompt), a.params, a.spec)

    def propose(self, work: Work) -> list[Speculation]:
        """Apply the step's work, then one speculation per `work.rids`: an SSD hit, a fast backup, or
        freshly drafted."""
        self.apply(work)
        rids = work.rids
        fast = len(rids) >= self.auto_backup_batch
        specs, fresh = [], []
        for rid in rids:
            seq = self.seqs[rid]
            stats = {} if seq.lookup is None else {"cache_lookups": 1, "cache_hits": int(seq.lookup == "hit")}
            if seq.ready is not None:
                seq.last, seq.ready = seq.ready, None  # base and pending were set when the hit committed
            else:
                backup = seq.lookup == "miss" and (seq.spec.backup == "fast" or seq.spec.backup == "auto" and fast)
                seq.base = 0 if seq.slot is None else int(self.cache.lengths[seq.slot])
                seq.last = self._new_speculation(rid, seq, seq.tokens[-1], Tree(()) if backup else seq.spec.tree)
                seq.pending = len(seq.tokens) - seq.base if seq.last.tree.num_nodes else 0
                if seq.last.tree.num_nodes:
                    fresh.append(seq)
            seq.last.stats = stats
            specs.append(seq.last)
        self._draft(fresh)
        return specs

    def _draft(self, seqs: list[DraftSeq]) -> None:
        """Draft every sequence's tree, one batched forward per depth."""
        for depth in range(max((s.last.tree.depth for s in seqs), default=0)):
            level = [s for s in seqs if s.last.tree.depth > depth]
            rows, parents = zip(*(self._level_rows(s, depth) for s in level))
            hidden = self._forward([s.slot for s in level], list(rows))
            picks = hidden[[i for i, idx in enumerate(parents) for _ in idx], [j for idx in parents for j in idx]]
            owners = [s for s, idx in zip(level, parents) for _ in idx]
            nodes = [node for s in level for node in ((-1,) if depth == 0 else s.last.tree.levels[depth - 1])]
            drawn = self._draw_rows(picks, owners, [self._fan(s.last, depth) for s in owners],
                                    max(s.last.ranked.shape[1] for s in level),
                                    [len(s.last.tree.children(node)) for s, node in zip(owners, nodes)])
            for r, (s, node) in enumerate(zip(owners, nodes)):
                _keep(s.last, node + 1, r, drawn, s.spec.mode == "async")
                for child, token in zip(s.last.tree.children(node), drawn.children[r]):
                    s.last.tokens[child] = token

    @staticmethod
    def _fan(spec: Speculation, position: int) -> int:
        """SSD guesses at this draft position of `spec` (what Saguaro down-weights); 0 outside async mode."""
        return spec.fan_out[position] if spec.fan_out else 0

    def _level_rows(self, seq: DraftSeq, depth: int) -> tuple[Rows, list[int]]:
        """Rows fed at this depth and, per parent node, the row index holding its hidden state."""
        tree, p = seq.last.tree, seq.pending
        if depth == 0:
            return causal_rows(seq.tokens[seq.base:], seq.base), [p - 1]
        nodes = tree.levels[depth - 1]
        window = np.zeros((len(nodes), p + nodes[-1] + 1), bool)
        window[:, :p] = True
        for i, j in enumerate(nodes):
            window[i, [p + a for a in tree.path(j)]] = True
        positions = [seq.base + p - 1 + depth] * len(nodes)
        return Rows([seq.last.tokens[j] for j in nodes], positions, seq.base, window), list(range(len(nodes)))

    def prepare(self, work: Work) -> None:
        """SSD: while the target verifies, draft the next round for each likely outcome (k, b) of the
        sequences `propose(work)` just sent."""
        seqs = [s for s in map(self.seqs.get, work.rids)
                if s.spec.mode == "async" and s.slot is not None and s.last.tree.num_nodes]
        if not seqs:
            return
        last = self._forward([s.slot for s in seqs], [self._last_rows(s) for s in seqs])[:, 0]  # [B, H]
        bonus = self._draw_rows(last, seqs, [0] * len(seqs), max(s.last.ranked.shape[1] for s in seqs), [0] * len(seqs))
        bonus_probs = torch.zeros(bonus.ranked.shape) if bonus.ranked_probs is None else bonus.ranked_probs  # greedy: unread
        for s, ids, probs in zip(seqs, bonus.ranked, bonus_probs):
            s.cache = self._guess(s, ids, probs)
        for j in range(max(s.cache.k for s in seqs)):
            level = [s for s in seqs if s.cache.k > j and s.cache.width]
            if not level:
                break
            hidden = self._forward([s.slot for s in level], [self._branch_rows(s, j) for s in level])
            m = [s.cache.width for s in level]
            picks = torch.cat([hidden[i, :w] for i, w in enumerate(m)])
            owners = [s for s, w in zip(level, m) for _ in range(w)]
            fans = [self._fan(branch, j) for s in level for branch in s.cache.branches]
            drawn = self._draw_rows(picks, owners, fans, max(b.ranked.shape[1] for s in level for b in s.cache.branches),
                                    [1] * len(owners))
            branches = [branch for s in level for branch in s.cache.branches]
            for r, branch in enumerate(branches):
                _keep(branch, j, r, drawn, True)
                branch.tokens[j] = drawn.children[r][0]

    def _last_rows(self, seq: DraftSeq) -> Rows:
        """Feed x_K (never fed by propose) to learn the law after a full accept."""
        k, p = seq.last.tree.num_nodes, seq.pending
        return Rows([seq.last.tokens[-1]], [seq.base + p - 1 + k], seq.base, np.ones((1, p + k), bool))

    def _guess(self, seq: DraftSeq, bonus_ids: torch.Tensor, bonus_probs: torch.Tensor) -> SpeculationCache:
        """The outcomes (k, b) to prepare (see ssd's docstring): per position, the ranked candidates
        without the drafted token (it can never be the correction), the top F_k of each, or the likeliest
        across positions. bonus_ids, bonus_probs # [W]: the draft's law after x_K."""
        last, k = seq.last, seq.last.tree.num_nodes
        candidates = []  # per position: (token, the draft's estimate of P(it is the outcome's b))
        for pos in range(k + 1):
            ids, probs = (last.ranked[pos], last.ranked_probs[pos]) if pos < k else (bonus_ids, bonus_probs)
            drafted = last.tokens[pos] if pos < k else None
            ranked = list(zip(ids.tolist(), probs.tolist()))
            rest = max(1 - sum(w for t, w in ranked if t == drafted), 1e-9)  # renormalise without it
            candidates.append([(t, w / rest) for t, w in ranked if t != drafted])
        if self._by_likelihood(seq):
            outcomes = likely_outcomes(outcome_law(seq.passed, seq.reached), candidates, seq.spec.branch_budget)
        else:  # the fan-out its own laws were weighted for
            outcomes = [(pos, t) for pos, fan in enumerate(last.fan_out) for t, _ in candidates[pos][:fan]]
        keys = {outcome: i for i, outcome in enumerate(outcomes)}
        branches = [self._new_speculation(last.rid, seq, b, Tree.chain(k)) for _, b in outcomes]
        return SpeculationCache(seq.pending, k, keys, branches)

    def _branch_rows(self, seq: DraftSeq, j: int) -> Rows:
        """Step j of every branch: b (j = 0) or y_j, seeing pending, x_1..x_k and its own earlier rows."""
        c = seq.cache
        p, k, m = c.pending, c.k, c.width
        outcomes = sorted(c.keys, key=c.keys.get)
        window = np.zeros((m, p + k + (j + 1) * m), bool)
        window[:, :p] = True
        for i, (accepted, _) in enumerate(outcomes):
            window[i, p:p + accepted] = True
            window[i, [p + k + jj * m + i for jj in range(j + 1)]] = True
        tokens = [b for _, b in outcomes] if j == 0 else [br.tokens[j - 1] for br in c.branches]
        positions = [seq.base + p + accepted + j for accepted, _ in outcomes]
        return Rows(tokens, positions, seq.base, window)

    def commit(self, outcomes: dict[str, Outcome]) -> None:
        """Keep each sequence's accepted path (and, on an SSD hit, the matching branch)."""
        for rid, out in outcomes.items():
            seq = self.seqs[rid]
            tree, a = seq.last.tree, out.num_accepted
            seq.accepted, seq.drafted = seq.accepted + a, seq.drafted + tree.depth
            if tree.depth == len(seq.reached):  # an SSD chain (not a fast backup's empty round)
                for j in range(min(a + 1, tree.depth)):
                    seq.reached[j], seq.passed[j] = seq.reached[j] + 1, seq.passed[j] + (j < a)
            seq.tokens += [seq.last.tokens[j] for j in out.accepted] + [out.token]
            cache, seq.cache = seq.cache, None
            branch = cache.lookup(a, out.token) if cache else None
            seq.lookup = None if cache is None else "miss" if branch is None else "hit"
            if seq.slot is None:
                continue
            if branch is not None:
                self.cache.compact(seq.slot, seq.base, cache.kept_rows(branch, a))
                seq.ready = cache.branches[branch]
                seq.base, seq.pending = seq.base + seq.pending + a + 1, 0
            else:
                fed = [seq.pending + j for j in out.accepted if tree.depths[j] < tree.depth]
                self.cache.compact(seq.slot, seq.base, list(range(seq.pending)) + fed)


@dataclass
class Drawn:
    """One forward's draws (Drafter._draw_rows), on the host: per row its children's tokens, its ranked
    ids # [R, W] and, unless every row is greedy, their probabilities # [R, W] and the hidden rows # [R, H]."""
    children: list[list[int]]
    ranked: torch.Tensor
    ranked_probs: torch.Tensor | None
    hidden: torch.Tensor | None


def _keep(spec: Speculation, row: int, r: int, drawn: Drawn, ssd: bool) -> None:
    """Record row r of `drawn` as law row `row` of `spec`: for SSD its ranked ids and (sampled) their
    probabilities, as many as the speculation keeps (its guesses come from them); unless the request
    is greedy, the hidden state verification recomputes the law from."""
    w = spec.ranked.shape[1]
    if ssd:
        spec.ranked[row] = drawn.ranked[r, :w]
    if spec.hidden is not None:
        spec.hidden[row] = drawn.hidden[r]
        if ssd:
            spec.ranked_probs[row] = drawn.ranked_probs[r, :w]
