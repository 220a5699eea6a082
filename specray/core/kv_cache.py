"""A static KV cache of per-sequence slots, and the attention mask over it.

A slot holds one sequence's K/V rows. `lengths[slot]` rows are written; a forward appends rows
after them. Rows are *tentative* until the caller keeps them: `truncate` rolls a slot back to a
length, `compact` keeps chosen rows (an accepted tree path) contiguously. The cache knows nothing
of tokens, trees or sampling."""
from __future__ import annotations

import torch

from specray.core.device import free_memory


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        """Allocates the whole cache up front, or refuses with a clear message if it cannot fit."""
        shape = (num_slots, num_kv_heads, max_len, head_dim)
        need, free = 2 * num_layers * num_slots * num_kv_heads * max_len * head_dim * dtype.itemsize, free_memory(device)
        if free is not None and need > free:
            raise ValueError(f"the KV cache of {num_layers} layers x {num_slots} slots x {max_len} rows needs "
                             f"{need / 2**30:.1f} GiB on {device} and {free / 2**30:.1f} GiB is free: lower "
                             f"max_batch or max_context, or split the model over more stages")
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.lengths = torch.zeros(num_slots, dtype=torch.long)  # [num_slots], on the host
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
            src = torch.tensor(rows, device=self.k[0].device) + base
            for cache in (*self.k, *self.v):
                cache[slot, :, base:base + n] = cache[slot, :, src]
        self.lengths[slot] = base + n

    def attention_mask(self, slots: torch.Tensor, base: torch.Tensor, window: torch.Tensor,
                       n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Additive mask for n new rows appended to each slot, and the rows they are written at.

        slots:  [B] slot ids.
        base:   [B] rows below base are visible to every new token (the committed prefix).
        window: [B, n, W] bool: new token j sees row base + w iff window[b, j, w]; W spans the
                tentative rows already written after base plus the n new rows.
        Returns mask [B, 1, n, L] (0 or -inf, L = longest slot after the append) and write rows [B, n].
        """
        start = self.lengths[slots]  # [B]
        rows = start[:, None] + torch.arange(n)  # [B, n]
        if int(rows.max()) >= self.max_len:
            raise ValueError(f"sequence exceeds the KV cache length {self.max_len}")
        length = int(rows.max()) + 1
        col = torch.arange(length)  # [L]
        rel = col[None, :] - base[:, None]  # [B, L], position of each row relative to base
        visible = (rel < 0)[:, None, :].expand(-1, n, -1).clone()  # [B, n, L]
        w = window.shape[-1]
        in_window = (rel >= 0) & (rel < w)  # [B, L]
        b_idx, l_idx = in_window.nonzero(as_tuple=True)
        visible[b_idx, :, l_idx] = window[b_idx, :, rel[b_idx, l_idx]]
        visible[torch.arange(len(slots))[:, None], torch.arange(n), rows] = True  # a token always sees itself
        mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))
        device = self.k[0].device
        return mask[:, None].to(device), rows.to(device)
