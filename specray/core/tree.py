"""Token trees for multi-candidate speculation, laid out breadth-first.

Node i (0-based) has a parent (`-1` is the root: the last committed token t0, not yet in the
target's cache) and a depth (1-based). A chain of K tokens is the tree with branching (1,)*K.
Knows nothing of models or probabilities."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch


@dataclass(frozen=True)
class Tree:
    parents: tuple[int, ...]

    @staticmethod
    @lru_cache(maxsize=64)
    def from_branching(branching: tuple[int, ...]) -> Tree:
        """Every node at depth d-1 gets branching[d-1] children (d = 1..D)."""
        if not branching or any(k < 1 for k in branching):
            raise ValueError(f"branching must be a non-empty list of positive ints, got {list(branching)}")
        parents: list[int] = []
        level = [-1]
        for k in branching:
            nxt = []
            for p in level:
                for _ in range(k):
                    nxt.append(len(parents))
                    parents.append(p)
            level = nxt
        return Tree(tuple(parents))

    @staticmethod
    def chain(k: int) -> Tree:
        return Tree.from_branching((1,) * k)

    @property
    def num_nodes(self) -> int:
        return len(self.parents)

    @cached_property
    def depths(self) -> tuple[int, ...]:
        depths: list[int] = []
        for p in self.parents:
            depths.append(1 if p < 0 else depths[p] + 1)
        return tuple(depths)

    @property
    def depth(self) -> int:
        return max(self.depths, default=0)

    @cached_property
    def levels(self) -> tuple[tuple[int, ...], ...]:
        """Node ids at depth 1, 2, ..., D."""
        return tuple(tuple(i for i, d in enumerate(self.depths) if d == depth) for depth in range(1, self.depth + 1))

    def children(self, node: int) -> tuple[int, ...]:
        """Children of `node` (-1 for the root) in draw order."""
        return tuple(i for i, p in enumerate(self.parents) if p == node)

    def path(self, node: int) -> list[int]:
        """Nodes from the root's child down to `node` (root excluded)."""
        out = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    @cached_property
    def mask(self) -> torch.Tensor:
        """[1+N, 1+N] bool: entry [i, j] is True iff row j is row i or its ancestor (row 0 = root t0)."""
        n = self.num_nodes + 1
        m = torch.eye(n, dtype=torch.bool)
        m[:, 0] = True
        for i, p in enumerate(self.parents):
            m[i + 1] |= m[p + 1]
        return m
