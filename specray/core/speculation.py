"""Per-request speculation settings and the speculation a draft sends to be verified.

Knows nothing of models: a `Speculation` is data (a token tree, its tokens and the exact laws the
draft drew them from), small enough to travel between actors."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specray.core.tree import Tree

MODES = ("off", "chain", "tree")


@dataclass(frozen=True)
class SpeculationConfig:
    """How one request speculates. `off` is target-only decoding; `chain` drafts K tokens; `tree`
    drafts a token tree with the given branching (K, if set, must equal its depth)."""
    mode: str = "chain"
    num_speculative_tokens: int = 4
    branching: tuple[int, ...] = ()
    with_replacement: bool = False

    def __post_init__(self):
        object.__setattr__(self, "branching", tuple(int(b) for b in self.branching))
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0 <= self.num_speculative_tokens <= 32:
            raise ValueError(f"num_speculative_tokens must be in [0, 32], got {self.num_speculative_tokens}")
        if self.mode == "chain" and self.num_speculative_tokens < 1:
            raise ValueError("num_speculative_tokens must be >= 1 in chain mode")
        if self.mode == "tree":
            if not self.branching or any(b < 1 for b in self.branching):
                raise ValueError(f"branching must be a non-empty list of positive ints in tree mode, "
                                 f"got {list(self.branching)}")
            if self.num_speculative_tokens and self.num_speculative_tokens != len(self.branching):
                raise ValueError(f"branching has depth {len(self.branching)} but num_speculative_tokens is "
                                 f"{self.num_speculative_tokens}; they must agree")
            if Tree.from_branching(self.branching).num_nodes > 256:
                raise ValueError(f"branching {list(self.branching)} makes more than 256 tree nodes")

    @property
    def tree(self) -> Tree:
        if self.mode == "off":
            return Tree(())
        if self.mode == "chain":
            return Tree.chain(self.num_speculative_tokens)
        return Tree.from_branching(self.branching)


@dataclass
class Speculation:
    """One round's proposal for one sequence. The target feeds [root] + tokens under tree.mask."""
    rid: str
    root: int                     # t0: the last committed token, not yet in the target's cache
    tree: Tree
    tokens: list[int]             # [N] node tokens, breadth-first
    q_ids: torch.Tensor           # [1+N, top_n] int64: draft law ids for the children of root / node j
    q_probs: torch.Tensor         # [1+N, top_n] fp32: their probabilities (rows of leaves unused)
    with_replacement: bool = False
    stats: dict = field(default_factory=dict)  # draft-side bookkeeping (e.g. cache hit), travels along
