"""A static KV cache of per-sequence slots, and the attention mask over it.

A slot holds one sequence's K/V rows. `lengths[slot]` rows are written; a forward appends rows
after them. Rows are *tentative* until the caller keeps them: `truncate` rolls a slot back to a
length, `compact` keeps chosen rows (an accepted tree path) contiguously. The cache knows nothing
of tokens, trees or sampling."""
from __future__ import annotations

import numpy as np
import torch

from specray.core.device import free_memory, to_device


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        """Allocates the whole cache up front, or refuses with a clear message if it cannot fit."""
        shape = (num_slots, 2 * num_kv_heads, max_len, head_dim)  # k heads, then v heads
        need, free = num_layers * shape[0] * shape[1] * max_len * head_dim * dtype.itemsize, free_memory(device)
        if free is not None and need > free:
            raise ValueError(f"the KV cache of {num_layers} layers x {num_slots} slots x {max_len} rows needs "
                             f"{need / 2**30:.1f} GiB on {device} and {free / 2**30:.1f} GiB is free: lower "
                             f"max_batch or max_context, or split the model over more stages")
        self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]  # per layer
        self.max_len = max_len
        self.lengths = torch.zeros(num_slots, dtype=torch.long)  # [num_slots], on the host
        self._lengths = self.lengths.numpy()  # the same memory, for host bookkeeping that launches nothing
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV slot")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0
        self._free.append(slot)

    def truncate(self, slot: int, length: int) -> None:
        """Roll a slot back to its first `length` rows."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"cannot truncate slot {slot} of length {int(self.lengths[slot])} to {length}")
        self.lengths[slot] = length

    def compact(self, slot: int, base: int, rows: list[int]) -> None:
        """Keep rows `base + rows[i]` at `base + i` (rows ascending) and drop the rest after base."""
        n = len(rows)
        if rows != list(range(n)):
            src = torch.tensor(rows, device=self.kv[0].device) + base
            for cache in self.kv:
                cache[slot, :, base:base + n] = cache[slot, :, src]
        self.lengths[slot] = base + n

    def advance(self, slots: np.ndarray, n: np.ndarray | int) -> None:
        """Count n more rows written to each of slots # [B] (n # [B] or one int)."""
        self._lengths[slots] += n

    def attention_mask(self, slots: np.ndarray, base: np.ndarray, window: np.ndarray,
                       n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Which rows n new rows appended to each slot see, and the rows they are written at.

        slots:  [B] slot ids.
        base:   [B] rows below base are visible to every new token (the committed prefix).
        window: [B, n, W] bool: new token j sees row base + w iff window[b, j, w]; W spans the
                tentative rows already written after base plus the n new rows.
        Host arrays in; computed in numpy (nothing launched on a device), then one copy each:
        mask [B, 1, n, L] bool (True: visible; L = longest slot after the append) and write rows
        [B, n], on the cache's device.
        """
        rows = self._lengths[slots][:, None] + np.arange(n)  # [B, n]
        length = int(rows.max()) + 1
        if length > self.max_len:
            raise ValueError(f"sequence exceeds the KV cache length {self.max_len}")
        col = np.arange(length)  # [L]
        rel = col - base[:, None]  # [B, L], position of each row relative to base
        w = window.shape[-1]
        seen = np.take_along_axis(window, np.broadcast_to(rel.clip(0, w - 1)[:, None], (len(rows), n, length)), -1)
        visible = seen & (rel < w)[:, None] | (rel < 0)[:, None] | (col == rows[..., None])  # [B, n, L]; sees itself
        device = self.kv[0].device
        return to_device(visible[:, None], device), to_device(rows, device)
