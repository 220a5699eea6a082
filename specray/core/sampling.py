"""Sampling: per-request settings, the target's processed distribution and the draft's compact law.

Every distribution here is fp32 and already processed: temperature, then top-k, then top-p on the
top-k-renormalised distribution (the Hugging Face / vLLM order), renormalised. Greedy
(temperature 0) is a one-hot on the argmax. Ties in logits rank the lower token id first, in
both the target's and the draft's law.

The draft ships its law compactly, as N (id, probability) pairs instead of a V-wide row: its N
highest-logit ids and their processed probabilities renormalised over those N. Candidates drawn from that law are exact
inputs for verification. Knows nothing of models, trees or how verification uses q.
"""
from __future__ import annotations

import hashlib
import math
import numbers
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings. temperature 0 is greedy; top_k 0 and top_p 1 are off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (isinstance(self.temperature, numbers.Real) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.top_p, numbers.Real) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def law_key(self) -> tuple:
        """Settings that shape the distribution (rows with equal keys are processed together)."""
        return ("greedy",) if self.greedy else (float(self.temperature), int(self.top_k), float(self.top_p))


def _descending(logits: torch.Tensor) -> torch.Tensor:
    """logits # [M, V] -> token ids by descending logit, ties by lower id # [M, V] int64."""
    return torch.sort(logits, dim=-1, descending=True, stable=True).indices


def _top_ids(logits: torch.Tensor, n: int) -> torch.Tensor:
    """logits # [M, V] -> the first n ids of _descending's order # [M, n], without sorting all V: a
    top-k, then its n winners re-sorted stably (ids ascending, then logits descending). Falls back to
    the full sort when a tie straddles the n-th place (top-k may pick either of the tied ids). The check
    syncs with the device once; the draft's law goes to the host right after anyway."""
    values, ids = logits.topk(n, dim=-1)  # [M, n]
    if bool(((logits >= values[:, -1:]).sum(-1) > n).any()):
        return _descending(logits)[:, :n]
    ids = ids.sort(dim=-1).values
    return ids.gather(-1, logits.gather(-1, ids).sort(dim=-1, descending=True, stable=True).indices)


def _process(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Processed distribution of rows sharing `params`.

    logits # [M, V] fp32. Returns # [M, V] fp32, rows summing to 1."""
    if params.greedy:  # argmax returns the first maximal id: ties go to the lower id
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_k == 0 and params.top_p >= 1:
        return probs
    order = _descending(logits)
    ranked = probs.gather(-1, order)  # [M, V] descending
    if params.top_k:
        ranked[:, params.top_k:] = 0
    if params.top_p < 1:
        above = F.pad(torch.cumsum(ranked, -1)[:, :-1], (1, 0))  # [M, V] mass ranked strictly above
        ranked = torch.where(above < params.top_p * ranked.sum(-1, keepdim=True), ranked, 0)
    out = torch.zeros_like(probs).scatter_(-1, order, ranked)
    return out / out.sum(-1, keepdim=True)


def _groups(params: list[SamplingParams], batch: int) -> dict[tuple, list[int]]:
    """Batch rows grouped by law_key, so each group is processed in one vectorised call."""
    if len(params) != batch:
        raise ValueError(f"need one SamplingParams per sequence: got {len(params)} for a batch of {batch}")
    groups: dict[tuple, list[int]] = {}
    for b, sp in enumerate(params):
        groups.setdefault(sp.law_key, []).append(b)
    return groups


def target_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits # [B, n, V] -> processed target distributions # [B, n, V] fp32 (params: one per b)."""
    B, n, V = logits.shape
    out = torch.empty(B, n, V, dtype=torch.float32, device=logits.device)
    for rows in _groups(params, B).values():
        idx = torch.tensor(rows, device=logits.device)
        out[idx] = _process(logits[idx].float().reshape(-1, V), params[rows[0]]).reshape(len(rows), n, V)
    return out


def draft_law(logits: torch.Tensor, params: list[SamplingParams], top_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The draft's compact proposal law.

    logits # [B, n, V]. Returns ids # [B, n, N] int64, the N = top_n highest-logit tokens in
    descending order, and probs # [B, n, N] fp32: the request's processed distribution (as
    target_probs) restricted to ids and renormalised. Greedy rows get probs [1, 0, ..., 0]."""
    B, n, V = logits.shape
    if not 1 <= top_n <= V:
        raise ValueError(f"top_n must be in [1, vocab size {V}], got {top_n}")
    flat = logits.float().reshape(B * n, V)
    ids = _top_ids(flat, top_n)  # [B*n, N]
    probs = torch.empty(B * n, top_n, dtype=torch.float32, device=logits.device)
    for b_rows in _groups(params, B).values():
        rows = torch.tensor([b * n + i for b in b_rows for i in range(n)], device=logits.device)
        kept = _process(flat[rows], params[b_rows[0]]).gather(-1, ids[rows])  # [M, N]
        probs[rows] = kept / kept.sum(-1, keepdim=True)  # the top id is always kept: mass > 0
    return ids.reshape(B, n, top_n), probs.reshape(B, n, top_n)


def draw_children(ids: torch.Tensor, probs: torch.Tensor, k: int, with_replacement: bool,
                  generator: torch.Generator | None) -> list[int]:
    """Draw k children tokens for one node, in draw order.

    ids, probs # [N]: the node's draft law (a draft_law row). With replacement: k i.i.d. draws.
    Without: sequential draws, each from probs with earlier draws removed and renormalised; once
    the remaining mass is 0 (e.g. greedy, top-p) the rest are the next ids in `ids` order not yet
    drawn -- deterministic candidates, whose law is a point mass."""
    N = ids.numel()
    if not 0 <= k <= N:
        raise ValueError(f"cannot draw {k} children from a draft law over {N} tokens (need 0 <= k <= N)")
    if with_replacement:
        picks = torch.multinomial(probs, k, replacement=True, generator=generator).tolist() if k else []
    else:
        m = min(k, int((probs > 0).sum()))
        picks = torch.multinomial(probs, m, replacement=False, generator=generator).tolist() if m else []
        if m < k:  # support exhausted: deterministic candidates
            picks += [i for i in range(N) if i not in picks][: k - m]
    return [int(ids[i]) for i in picks]


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from probs # [V]."""
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int | None, stream: str) -> torch.Generator:
    """A CPU generator seeded from (seed, stream), so e.g. the draft and target streams of one request
    differ but replay identically; seed None draws a fresh seed from os.urandom."""
    if seed is None:
        value = int.from_bytes(os.urandom(8), "little") >> 1
    else:
        digest = hashlib.sha256(f"{seed}\x00{stream}".encode()).digest()
        value = int.from_bytes(digest[:8], "little") >> 1
    return torch.Generator().manual_seed(value)
