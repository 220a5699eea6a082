"""Exact verification of a draft's token tree; a chain is branching (1,)*K.

Terminology (as in vLLM's rejection sampler):
- accepted tokens: the draft tokens the target keeps, a path down from the root;
- correction token: emitted when every child of the current node is rejected, drawn from the
  residual target distribution left by those rejections (vLLM calls it "recovered");
- bonus token: emitted when the walk reaches a leaf, drawn from the target's distribution there.
A round emits accepted + 1 tokens, and the emitted text has exactly the target's law provided q
is the law each candidate was really drawn from.

The walk, at a node with target p and children c_1..c_k in draw order: child i's law q_i is the
draft's q (with replacement) or q with c_1..c_{i-1} removed and renormalised (without). Where
q_i(c_i) = 0 (support exhausted: greedy, top-p, top-k) c_i is a deterministic candidate and
q_i = δ(c_i); a greedy draft ships no q at all, since every child is then one. Accept c_i if U < p(c_i) / q_i(c_i) and descend; else p = norm(max(0, p - q_i)).

Randomness is injected (an `Rng`), so tests can enumerate every branch exactly. Knows nothing of
models or KV caches; tensors may live on any device, but CPU tensors avoid a sync per decision.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from specray.core.sampling import sample
from specray.core.tree import Tree

RESIDUAL_EPS = 1e-12  # a residual with no more mass than this is treated as empty: keep p
NON_FINITE = "verification got a non-finite target or draft probability; nothing was accepted"


class Rng(Protocol):
    def accept(self, prob: float) -> bool:
        """True with probability prob."""

    def sample(self, probs: torch.Tensor) -> int:
        """One token from probs # [V]."""


class TorchRng:
    """The Rng used in serving: a torch.Generator (e.g. sampling.make_generator(seed, "target"))."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def accept(self, prob: float) -> bool:
        return torch.rand(1, generator=self.generator, device=self.generator.device).item() < prob

    def sample(self, probs: torch.Tensor) -> int:
        return sample(probs, self.generator)


@dataclass(frozen=True)
class Outcome:
    """One round's result: accepted node ids (the root's child first) and the correction token
    (after a rejection) or bonus token (after reaching a leaf)."""

    accepted: tuple[int, ...]
    token: int

    @property
    def num_accepted(self) -> int:
        return len(self.accepted)


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)), or p itself when that has ~no mass (p == q in fp; never NaN).

    p, q # [V] fp32."""
    r = (p - q).clamp_min(0)
    mass = float(r.sum())
    return r / mass if mass > RESIDUAL_EPS else p


def _without(q: torch.Tensor, token: int) -> torch.Tensor:
    """The law of the next draw without replacement: q with token removed, renormalised (all-zero
    once the support is exhausted). q # [V] fp32."""
    q = q.clone()
    q[token] = 0
    mass = float(q.sum())
    return q / mass if mass > 0 else q


def _verify_children(children: tuple[int, ...], tokens: torch.Tensor, p: torch.Tensor, q: torch.Tensor,
                     with_replacement: bool, rng: Rng) -> tuple[int | None, torch.Tensor]:
    """Try children in draw order. tokens # [N]; p, q # [V] fp32 at their parent.

    Returns (the accepted child, None if all rejected) and the residual target distribution."""
    for child in children:
        token = int(tokens[child])
        law = q
        if float(q[token]) == 0:  # deterministic candidate: point mass
            law = torch.zeros_like(q)
            law[token] = 1
        if rng.accept(min(1.0, float(p[token]) / float(law[token]))):
            return child, p
        p = _residual(p, law)
        if not with_replacement:
            q = _without(q, token)
    return None, p


def verify_tree(tree: Tree, tokens: torch.Tensor, p: torch.Tensor, q: torch.Tensor | None,
                with_replacement: bool, rng: Rng) -> Outcome:
    """Verify one sequence's tree.

    tokens # [N] node tokens; p # [1+N, V] fp32 target distributions (target_probs): row 0 at the
    root, row 1+j for the children of node j; q # [1+N, V] fp32 the draft's law (draft_law) at the
    same rows, leaf rows unused, or None when every child is a point mass (a greedy draft). Extra
    trailing rows (padding) are ignored. A non-finite p or q row raises ValueError: min(1, p / q) would
    accept a NaN and emit text of no known law."""
    rows = 1 + tree.num_nodes
    if not bool(torch.isfinite(p[:rows]).all()) or q is not None and not bool(torch.isfinite(q[:rows]).all()):
        raise ValueError(NON_FINITE)
    accepted: list[int] = []
    node = -1
    while True:
        target = p[node + 1].float()  # [V]
        children = tree.children(node)
        if not children:
            return Outcome(tuple(accepted), rng.sample(target))  # bonus
        law = q[node + 1].float() if q is not None else torch.zeros_like(target)  # [V]
        child, target = _verify_children(children, tokens, target, law, with_replacement, rng)
        if child is None:
            return Outcome(tuple(accepted), rng.sample(target))  # correction
        accepted.append(child)
        node = child


def verify_greedy(tree: Tree, tokens: Sequence[int] | torch.Tensor, best: torch.Tensor) -> Outcome:
    """verify_tree for a greedy request, from the target's choices alone: best # [1+N] the target's
    argmax at the root (row 0) and at node j (row 1+j). p is then one-hot, so the first child in draw
    order that is the argmax is accepted (p / q >= 1) and every other rejected (p = 0); once all are,
    the correction is the argmax (max(0, p - q) keeps p's whole mass there). No V-wide row, no draw."""
    best, tokens = best.tolist(), [int(t) for t in tokens]
    accepted: list[int] = []
    node = -1
    while True:
        choice = best[node + 1]
        child = next((c for c in tree.children(node) if tokens[c] == choice), None)
        if child is None:
            return Outcome(tuple(accepted), choice)  # correction, or bonus at a leaf
        accepted.append(child)
        node = child


def verify_chains(tokens: torch.Tensor, p: torch.Tensor, q: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """verify_tree for G chains of K drafted tokens at once, on the tensors' device (vectorised over
    the batch and the chain; only the [G, 2] answer need leave it). The same rule with the same
    uniforms: given u, the outcome equals verify_tree's with an Rng whose i-th accept() compares u[i]
    and whose sample() draws with u[K] (tested).

    tokens # [G, K] int64 drafted tokens; p # [G, K+1, V] fp32 target laws; q # [G, K+1, V] fp32
    draft laws (row K unused); u # [G, K+1] fp64 uniforms in [0, 1): u[:, i] decides token i, u[:, K]
    draws the correction or bonus. Returns # [G, 3] int64: tokens accepted, the emitted token, and 1
    where every law the row used is finite (chain_outcomes turns it into Outcomes, or raises)."""
    g, k = tokens.shape
    x = tokens[..., None]  # [G, K, 1]
    p_x = p[:, :k].gather(-1, x)[..., 0]  # [G, K]
    q_x = q[:, :k].gather(-1, x)[..., 0]
    point = q_x == 0  # a deterministic candidate: its law is a point mass on it
    ratio = p_x.double() / torch.where(point, 1.0, q_x).double()
    accepted = (u[:, :k] < ratio).long().cumprod(-1).sum(-1)  # [G] leading accepts
    rows = torch.arange(g, device=p.device)
    target = p[rows, accepted]  # [G, V] the law at the first rejection, or after x_K
    stop = accepted.clamp(max=max(k - 1, 0))
    law = q[rows, stop]  # [G, V] the law the rejected token was drawn from (unused after x_K)
    if k:
        law = torch.where(point[rows, stop, None], F.one_hot(tokens[rows, stop], p.shape[-1]).to(law.dtype), law)
    residual = (target - law).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)  # [G, 1]
    corrected = torch.where(mass > RESIDUAL_EPS, residual / mass, target)
    target = torch.where((accepted == k)[:, None], target, corrected)  # the bonus draws from p itself
    cdf = target.double().cumsum(-1)  # [G, V]
    token = torch.searchsorted(cdf, (u[:, k] * cdf[:, -1])[:, None], right=True)[:, 0]
    finite = torch.isfinite(p).all((1, 2)) & torch.isfinite(q[:, :k]).all((1, 2))  # [G]
    return torch.stack((accepted, token, finite.long()), dim=1)


def chain_outcomes(answer: list[list[int]]) -> list[Outcome]:
    """verify_chains' answer, copied to the host, as Outcomes; a non-finite law raises ValueError, as
    verify_tree does (a NaN ratio must never pass for an accept or a draw)."""
    if not all(finite for _, _, finite in answer):
        raise ValueError(NON_FINITE)
    return [Outcome(tuple(range(n)), token) for n, token, _ in answer]


def verify_batch(trees: Sequence[Tree], tokens: Sequence[torch.Tensor] | torch.Tensor,
                 p: Sequence[torch.Tensor] | torch.Tensor, q: Sequence[torch.Tensor | None] | torch.Tensor,
                 with_replacement: bool, rngs: Sequence[Rng]) -> list[Outcome]:
    """verify_tree for each sequence b; every argument is indexed by b.

    Lists of per-sequence tensors or padded tensors: tokens # [B, N_max], p, q # [B, 1+N_max, V];
    sequence b reads only the rows of its own tree."""
    if not len(trees) == len(tokens) == len(p) == len(q) == len(rngs):
        raise ValueError("verify_batch needs one tree, token row, p, q and rng per sequence")
    return [verify_tree(trees[b], tokens[b], p[b], q[b], with_replacement, rngs[b]) for b in range(len(trees))]


def accepted_per_position(outcomes: Sequence[Outcome], depth: int) -> list[int]:
    """Accepted tokens counted by draft position: entry d-1 counts outcomes that accepted a token
    at depth d."""
    counts = [0] * depth
    for outcome in outcomes:
        if outcome.num_accepted > depth:
            raise ValueError(f"an outcome accepted {outcome.num_accepted} tokens, more than depth {depth}")
        for d in range(outcome.num_accepted):
            counts[d] += 1
    return counts
