"""Pack per-sequence rows into one padded model call.

Every forward (prefill, drafting one tree depth, verification) is described per sequence by the
new tokens, their positions, the committed length `base`, and which rows after base each new
token sees. `pack` pads these into the tensors `Shard.forward` takes."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Rows:
    """New rows for one sequence: tokens [n], positions [n], base, window [n, W] bool."""
    tokens: list[int]
    positions: list[int]
    base: int
    window: torch.Tensor


@dataclass
class Packed:
    x: torch.Tensor          # [B, n] int64 token ids (padding 0)
    positions: torch.Tensor  # [B, n] int64
    base: torch.Tensor       # [B] int64
    window: torch.Tensor     # [B, n, W] bool
    num_valid: torch.Tensor  # [B] int64


def causal_rows(tokens: list[int], start: int) -> Rows:
    """Plain causal rows appended at a committed length `start` (prefill, pending tokens)."""
    n = len(tokens)
    return Rows(tokens, list(range(start, start + n)), start, torch.ones(n, n, dtype=torch.bool).tril())


def pack(rows: list[Rows]) -> Packed:
    """Right-pad every sequence's rows to the longest: padding tokens are id 0 at the last position
    (or base) and see nothing in the window (the cache lets each see itself)."""
    n = max(len(r.tokens) for r in rows)
    w = max(r.window.shape[1] for r in rows)
    pad = [n - len(r.tokens) for r in rows]
    x = torch.tensor([r.tokens + [0] * k for r, k in zip(rows, pad)], dtype=torch.long)
    positions = torch.tensor([r.positions + [r.positions[-1] if r.positions else r.base] * k
                              for r, k in zip(rows, pad)], dtype=torch.long)
    window = torch.stack([F.pad(r.window, (0, w - r.window.shape[1], 0, k)) for r, k in zip(rows, pad)])
    base = torch.tensor([r.base for r in rows], dtype=torch.long)
    num_valid = torch.tensor([len(r.tokens) for r in rows], dtype=torch.long)
    return Packed(x, positions, base, window, num_valid)
