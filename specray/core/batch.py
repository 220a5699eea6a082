"""Pack per-sequence rows into one padded model call.

Every forward (prefill, drafting one tree depth, verification) is described per sequence by the
new tokens, their positions, the committed length `base`, and which rows after base each new
token sees. `pack` pads these into the tensors `Shard.forward` takes."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Rows:
    """New rows for one sequence: tokens [n], positions [n], base, window [n, W] bool (numpy, or a
    CPU tensor such as Tree.mask)."""
    tokens: list[int]
    positions: list[int]
    base: int
    window: np.ndarray | torch.Tensor


@dataclass
class Packed:
    """Host arrays (numpy: building and reading them launches nothing on a device)."""
    x: np.ndarray          # [B, n] int64 token ids (padding 0)
    positions: np.ndarray  # [B, n] int64
    base: np.ndarray       # [B] int64
    window: np.ndarray     # [B, n, W] bool
    num_valid: np.ndarray  # [B] int64


def causal_rows(tokens: list[int], start: int) -> Rows:
    """Plain causal rows appended at a committed length `start` (prefill, pending tokens)."""
    n = len(tokens)
    return Rows(tokens, list(range(start, start + n)), start, np.tri(n, dtype=bool))


def pack(rows: list[Rows]) -> Packed:
    """Right-pad every sequence's rows to the longest: padding tokens are id 0 at the last position
    (or base) and see nothing in the window (the cache lets each see itself)."""
    b, n = len(rows), max(len(r.tokens) for r in rows)
    x, positions = np.zeros((b, n), np.int64), np.zeros((b, n), np.int64)
    window = np.zeros((b, n, max(r.window.shape[1] for r in rows)), bool)
    for i, r in enumerate(rows):
        m = len(r.tokens)
        x[i, :m], positions[i, :m] = r.tokens, r.positions
        positions[i, m:] = r.positions[-1] if m else r.base
        window[i, :m, :r.window.shape[1]] = np.asarray(r.window)
    base = np.array([r.base for r in rows], np.int64)
    num_valid = np.array([len(r.tokens) for r in rows], np.int64)
    return Packed(x, positions, base, window, num_valid)
