"""Pack per-sequence rows into one padded model call.

Every forward (prefill, drafting one tree depth, verification) is described per sequence by the
new tokens, their positions, the committed length `base`, and which rows after base each new
token sees. `pack` pads these into the tensors `Shard.forward` takes."""
from __future__ import annotations

from dataclasses import dataclass

import torch


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
    b = len(rows)
    n = max(len(r.tokens) for r in rows)
    w = max(r.window.shape[1] for r in rows)
    x = torch.zeros(b, n, dtype=torch.long)
    positions = torch.zeros(b, n, dtype=torch.long)
    window = torch.zeros(b, n, w, dtype=torch.bool)
    for i, r in enumerate(rows):
        m = len(r.tokens)
        x[i, :m] = torch.tensor(r.tokens, dtype=torch.long)
        positions[i, :m] = torch.tensor(r.positions, dtype=torch.long)
        positions[i, m:] = r.positions[-1] if m else r.base
        window[i, :m, :r.window.shape[1]] = r.window
    base = torch.tensor([r.base for r in rows], dtype=torch.long)
    num_valid = torch.tensor([len(r.tokens) for r in rows], dtype=torch.long)
    return Packed(x, positions, base, window, num_valid)
