"""Per-request speculation settings and the speculation a draft sends to be verified.

Knows nothing of models: a `Speculation` is data (a token tree, its tokens and the exact laws the
draft drew them from), small enough to travel between actors."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specray.core.tree import Tree

MODES = ("off", "chain", "tree", "async")
MAX_TREE_NODES = 256
MIN_SAGUARO_C = 1e-6  # a smaller c is raised to it: scaled in float32, ~1e-45 would zero the weighted
#                       probabilities and leave a NaN law
BACKUPS = ("neural", "fast", "auto")


@dataclass(frozen=True)
class SpeculationConfig:
    """How one request speculates. `off` is target-only decoding; `chain` drafts K tokens; `tree`
    drafts a token tree with the given branching (K, if set, must equal its depth); `async` (SSD)
    drafts a K-chain and, while it is verified, the next round for the likely outcomes.

    fan_out: SSD guesses per outcome position k = 0..K (K+1 values; empty = automatic).
    saguaro_c: SSD down-weight of the draft's top guesses in (0, 1]; 1 is off.
    backup: what an SSD cache miss falls back to: neural (draft just in time), fast (zero-latency
    exact proposal), auto (neural below `auto_backup_batch` running sequences, else fast)."""
    mode: str = "chain"
    num_speculative_tokens: int = 4
    branching: tuple[int, ...] = ()
    with_replacement: bool = False
    fan_out: tuple[int, ...] = ()
    saguaro_c: float = 1.0
    backup: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "branching", tuple(int(b) for b in self.branching))
        object.__setattr__(self, "fan_out", tuple(int(f) for f in self.fan_out))
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
            if _tree_nodes(self.branching) > MAX_TREE_NODES:
                raise ValueError(f"branching {list(self.branching)[:8]} makes more than {MAX_TREE_NODES} tree nodes")

        if self.mode == "async" and self.num_speculative_tokens < 1:
            raise ValueError("num_speculative_tokens must be >= 1 in async mode")
        if self.fan_out and (len(self.fan_out) != self.num_speculative_tokens + 1 or min(self.fan_out) < 0):
            raise ValueError(f"fan_out needs num_speculative_tokens + 1 = {self.num_speculative_tokens + 1} "
                             f"non-negative values (one per outcome position k = 0..K), got {list(self.fan_out)}")
        if sum(self.fan_out) > 64:
            raise ValueError(f"fan_out {list(self.fan_out)} asks for more than 64 branches")
        if not 0 < self.saguaro_c <= 1:
            raise ValueError(f"saguaro_c must be in (0, 1], got {self.saguaro_c}")
        object.__setattr__(self, "saguaro_c", max(float(self.saguaro_c), MIN_SAGUARO_C))
        if self.backup not in BACKUPS:
            raise ValueError(f"backup must be one of {BACKUPS}, got {self.backup!r}")

    @property
    def branch_budget(self) -> int:
        """SSD branches per sequence (M = sum of the fan-out; automatic: 2 per outcome position)."""
        return sum(self.fan_out) if self.fan_out else 2 * (self.num_speculative_tokens + 1)

    @property
    def draft_rows(self) -> int:
        """KV rows one round may write after a sequence's committed tokens, on draft or target."""
        rows = self.tree.num_nodes + 2
        if self.mode == "async":
            rows += 1 + self.num_speculative_tokens * self.branch_budget
        return rows

    @property
    def tree(self) -> Tree:
        if self.mode == "off":
            return Tree(())
        if self.mode in ("chain", "async"):
            return Tree.chain(self.num_speculative_tokens)
        return Tree.from_branching(self.branching)


def _tree_nodes(branching: tuple[int, ...]) -> int:
    """Nodes of Tree.from_branching(branching), counted without building it, stopping once past the cap
    (so [2**31 - 1] or [2] * 32 cost nothing)."""
    nodes, level = 0, 1
    for k in branching:
        level *= k
        nodes += level
        if nodes > MAX_TREE_NODES:
            break
    return nodes


@dataclass
class Speculation:
    """One round's proposal for one sequence. The target feeds [root] + tokens under tree.mask."""
    rid: str
    root: int                     # t0: the last committed token, not yet in the target's cache
    tree: Tree
    tokens: list[int]             # [N] node tokens, breadth-first
    hidden: torch.Tensor | None   # [1+N, H] the draft's final hidden state at the root / node j, from which
    #                               verification recomputes the law (sampling.draft_law) its children were
    #                               drawn from; rows of leaves unused. None for a greedy request: each child
    #                               is then a point mass (the argmax, then deterministic candidates)
    with_replacement: bool = False
    saguaro_c: float = 1.0
    fan_out: tuple[int, ...] = ()  # SSD: guesses per outcome position, fixed when drafted: what its laws'
    #                                Saguaro weights and the guesses made while it is verified both use
    stats: dict = field(default_factory=dict)  # draft-side bookkeeping (e.g. cache hit), travels along
    ranked: torch.Tensor | None = None  # [1+N, W] draft side only, never shipped: each row's highest-logit
    #                                     ids (SSD's guesses, a greedy tree's deterministic candidates)
    ranked_probs: torch.Tensor | None = None  # [1+N, W] draft side only: their probabilities in the draft law

    def row_fans(self) -> list[int]:
        """The Saguaro fan-out each law row was weighted for: the root's is F_0, node j's F_depth(j)."""
        if not self.fan_out:
            return [0] * (1 + self.tree.num_nodes)
        return [self.fan_out[d] for d in (0, *self.tree.depths)]
