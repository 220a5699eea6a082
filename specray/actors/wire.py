"""How speculations and hidden states travel between actors: numpy arrays and plain tuples.

Ray serialises numpy arrays out of band (no copy) but pickles torch tensors slowly: a batch of 8
speculations costs ~1.5 ms to pickle and unpickle as `Speculation`s with torch laws and ~0.1 ms in
this form (measured on a 2-core CPU box), and every stage unpickles the batch once per round."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from specray.core.speculation import Speculation
from specray.core.target import Upstream
from specray.core.tree import Tree

HiddenWire = tuple[np.ndarray, str]  # an array and the torch dtype's name when numpy lacks it ("" otherwise)
UpWire = tuple[dict[str, HiddenWire], HiddenWire | None] | None  # a stage's output (core.target.Upstream)
# (rid, root, tree parents, tokens, hidden [1+N, H] or None, with_replacement, saguaro_c, fan_out, stats)
SpecWire = tuple


def hidden_to_wire(h: torch.Tensor) -> HiddenWire:
    """hidden [B, n, H] (any device) -> a host array."""
    h = h.detach().cpu()
    return (h.view(torch.int16).numpy(), "bfloat16") if h.dtype == torch.bfloat16 else (h.numpy(), "")


def hidden_from_wire(w: HiddenWire | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host array back on `device`; a tensor (kept on its device by the sender) as it is."""
    if isinstance(w, torch.Tensor):
        return w.to(device)
    array, dtype = w
    h = torch.from_numpy(array.copy())  # Ray hands out read-only arrays
    return (h.view(torch.bfloat16) if dtype == "bfloat16" else h).to(device)


def up_to_wire(up: Upstream) -> UpWire:
    prefilled, hidden = up
    return ({rid: hidden_to_wire(h) for rid, h in prefilled.items()},
            None if hidden is None else hidden_to_wire(hidden))


def up_from_wire(w: UpWire, device: torch.device) -> Upstream:
    if w is None:
        return None
    prefilled, hidden = w
    return ({rid: hidden_from_wire(h, device) for rid, h in prefilled.items()},
            None if hidden is None else hidden_from_wire(hidden, device))


def specs_to_wire(specs: list[Speculation]) -> list[SpecWire]:
    """Speculations as the stages need them (the draft-side `ranked` ids stay behind)."""
    return [(s.rid, s.root, s.tree.parents, s.tokens, None if s.hidden is None else hidden_to_wire(s.hidden),
             s.with_replacement, s.saguaro_c, s.fan_out, s.stats) for s in specs]


@lru_cache(maxsize=256)
def _tree(parents: tuple[int, ...]) -> Tree:
    return Tree(parents)  # shared, so its cached masks and levels are computed once per shape


def specs_from_wire(wire: list[SpecWire]) -> list[Speculation]:
    """Speculations back, their hidden states on the host (the last stage moves them to its device)."""
    return [Speculation(rid, root, _tree(tuple(parents)), list(tokens),
                        None if hidden is None else hidden_from_wire(hidden, torch.device("cpu")),
                        with_replacement, saguaro_c, tuple(fan_out), dict(stats))
            for rid, root, parents, tokens, hidden, with_replacement, saguaro_c, fan_out, stats in wire]


def specs_nbytes(wire: list[SpecWire]) -> int:
    """About what a batch of speculations weighs on the wire: its hidden states, 8 bytes per token,
    parent and fan-out entry."""
    return sum((0 if hidden is None else hidden[0].nbytes) + 8 * (len(tokens) + len(parents) + len(fan_out))
               for _, _, parents, tokens, hidden, _, _, fan_out, _ in wire)


def up_nbytes(up: UpWire | Upstream) -> int:
    """The hidden states' bytes in a stage's output (host arrays or device tensors)."""
    if up is None:
        return 0
    prefilled, hidden = up
    sizes = [h[0].nbytes if isinstance(h, tuple) else h.numel() * h.element_size()
             for h in (*prefilled.values(), hidden) if h is not None]
    return sum(sizes)
