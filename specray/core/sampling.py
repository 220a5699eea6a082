"""Sampling: per-request settings, the target's processed distribution and the draft's law.

Every distribution here is fp32 and already processed: temperature, then top-k, then top-p on the
top-k-renormalised distribution (the Hugging Face / vLLM order), renormalised. Greedy
(temperature 0) is a one-hot on the argmax. Ties in logits rank the lower token id first, in
both the target's and the draft's law.

The draft's law is the same processed distribution of the draft's logits, over the whole
vocabulary (a truncated law loses acceptance: over the top 8 tokens, half of it at temperature 1),
with SSD's Saguaro weighting on top. Knows nothing of models, trees or how verification uses q.
"""
from __future__ import annotations

import hashlib
import math
import numbers
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MIN_TEMPERATURE = 0.01  # a positive temperature below this is raised to it (vLLM does the same): logits
#                         divided by ~1e-45 overflow to inf and the law turns NaN


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings. temperature 0 is greedy; a positive one below
    MIN_TEMPERATURE is raised to it; top_k 0 and top_p 1 are off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (isinstance(self.temperature, numbers.Real) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            object.__setattr__(self, "temperature", MIN_TEMPERATURE)
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


def top_ids(logits: torch.Tensor, n: int) -> torch.Tensor:
    """logits # [M, V] -> the first min(n, V) ids of _descending's order # [M, n], without sorting all
    V: a top-k, then its n winners re-sorted stably (ids ascending, then logits descending). Falls back
    to the full sort when a tie straddles the n-th place (top-k may pick either of the tied ids). The
    check syncs with the device once; the draft's law goes to the host right after anyway."""
    n = min(n, logits.shape[-1])
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


def draft_law(logits: torch.Tensor, params: list[SamplingParams], fans: list[int], cs: list[float]) -> torch.Tensor:
    """The law a node's children are drawn from and verification divides by, over the whole vocabulary.

    logits # [R, V] the draft's logits at R nodes; params, fans, cs: one per row. The request's
    processed distribution, exactly as target_probs (top-k and top-p truncate the draft as they do the
    target), then SSD's Saguaro weighting: the row's `fan` highest-logit ids scaled by its c and the
    row renormalised (fan 0 or c 1: unchanged). Returns # [R, V] fp32. The draft draws from it and
    the last target stage recomputes it from the same hidden states, so verification divides by the
    law the candidates were drawn from."""
    probs = target_probs(logits[:, None], params)[:, 0]  # [R, V]
    rows = [r for r, (f, c) in enumerate(zip(fans, cs)) if f > 0 and c < 1 and not params[r].greedy]
    if not rows:
        return probs
    idx = torch.tensor(rows, device=logits.device)
    fan = torch.tensor([fans[r] for r in rows], device=logits.device)[:, None]  # [W, 1]
    c = torch.tensor([cs[r] for r in rows], device=logits.device, dtype=torch.float32)[:, None]  # [W, 1]
    top = top_ids(logits[idx].float(), int(fan.max()))  # [W, F]
    ranks = torch.arange(top.shape[1], device=logits.device)[None, :]  # [1, F]
    scale = torch.ones_like(probs[idx]).scatter_(-1, top, torch.where(ranks < fan, c, 1.0))  # [W, V]
    weighted = probs[idx] * scale
    probs[idx] = weighted / weighted.sum(-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, k: int, generator: torch.Generator | None) -> list[int]:
    """k i.i.d. tokens from probs # [V] on the host (any positive mass, not necessarily 1), by inverse
    CDF: a tenth of torch.multinomial's time on a V-wide row (20 vs 200 us at V = 8192). The CDF is
    summed in fp64, so its rounding is far below any probability that matters; a token with
    probability 0 is never drawn (the first index whose CDF exceeds u has mass)."""
    cdf = probs.double().cumsum(0)  # [V]
    u = torch.rand(k, generator=generator, dtype=torch.float64) * cdf[-1]
    return torch.searchsorted(cdf, u, right=True).tolist()


def draw_rows(probs: torch.Tensor, fallback: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token from each row of probs # [M, V] where it lies (any device), by draw's inverse CDF with
    one uniform from each row's host generator: the token `draw(probs[m], 1, generators[m])` returns,
    without bringing the row to the host. A row with no mass takes fallback # [M] (its best id, as
    draw_children's deterministic candidates do). Returns # [M] int64 on probs' device."""
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators]).to(probs.device)  # [M]
    cdf = probs.double().cumsum(-1)  # [M, V]
    token = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return torch.where(cdf[:, -1] > 0, token, fallback)


def draw_children(probs: torch.Tensor, ranked: torch.Tensor, k: int, with_replacement: bool,
                  generator: torch.Generator | None) -> list[int]:
    """Draw k children tokens for one node, in draw order.

    probs # [V]: the node's draft law (a draft_law row); ranked # [>= k]: its highest-logit ids. With
    replacement: k i.i.d. draws. Without: sequential draws, each from probs with earlier draws removed
    and renormalised; once the remaining mass is 0 (e.g. greedy, top-p) the rest are the next ids of
    `ranked` not yet drawn -- deterministic candidates, whose law is a point mass."""
    if not 0 <= k <= probs.numel():
        raise ValueError(f"cannot draw {k} children from a draft law over {probs.numel()} tokens")
    if with_replacement:
        return draw(probs, k, generator) if k else []
    m = min(k, int((probs > 0).sum()))
    picks = draw(probs, 1, generator) if m else []
    left = probs.clone() if m > 1 else probs
    for _ in range(m - 1):
        left[picks[-1]] = 0
        picks += draw(left, 1, generator)
    return picks + [t for t in ranked.tolist() if t not in picks][: k - m]  # support exhausted: deterministic


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from probs # [V]."""
    return draw(probs, 1, generator)[0]


def make_generator(seed: int | None, stream: str) -> torch.Generator:
    """A CPU generator seeded from (seed, stream), so e.g. the draft and target streams of one request
    differ but replay identically; seed None draws a fresh seed from os.urandom."""
    if seed is None:
        value = int.from_bytes(os.urandom(8), "little") >> 1
    else:
        digest = hashlib.sha256(f"{seed}\x00{stream}".encode()).digest()
        value = int.from_bytes(digest[:8], "little") >> 1
    return torch.Generator().manual_seed(value)
