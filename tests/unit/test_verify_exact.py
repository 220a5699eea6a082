"""Exact verification of chains and trees, checked by enumeration on a 6-token vocabulary.

One round: the draft draws a tree from its law at each node (draft_law, then the draw law of
draw_children; a greedy draft's children are point masses and it ships no law), the target verifies it (verify_tree). The enumerating rng below visits every draft
draw, every accept/reject branch and every correction/bonus token, each weighted by its exact
probability. Extend each round's output with tokens from the target's exact conditionals up to
D+1 tokens (D = tree depth): that law must equal the target's joint law of D+1 tokens."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from functools import cache

import numpy as np
import pytest
import torch
from scipy import stats

from specray.core import verify
from specray.core.sampling import (
    SamplingParams,
    draft_law,
    draw_children,
    make_generator,
    target_probs,
    top_ids,
)
from specray.core.tree import Tree
from specray.core.verify import (
    Outcome,
    TorchRng,
    accepted_per_position,
    verify_batch,
    verify_greedy,
    verify_tree,
)

V = 6


@dataclass(frozen=True)
class Model:
    """A toy language model: a random Dirichlet(1) next-token table per prefix, seen through
    params; with `like`, model `like`'s logits plus Gaussian noise (a draft that resembles it)."""

    seed: int
    params: SamplingParams
    like: int | None = None


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little"))


@cache
def logits_at(seed: int, like: int | None, prefix: tuple[int, ...]) -> torch.Tensor:
    """# [V] fp32 logits of model (seed, like) after `prefix`."""
    if like is None:
        return torch.from_numpy(np.log(_rng(seed, prefix).dirichlet(np.ones(V)))).float()
    return logits_at(like, None, prefix) + torch.from_numpy(_rng(seed, prefix).normal(size=V)).float()


@cache
def p_row(model: Model, prefix: tuple[int, ...]) -> torch.Tensor:
    """# [V] the target's processed distribution after prefix."""
    return target_probs(logits_at(model.seed, model.like, prefix)[None, None], [model.params])[0, 0]


@cache
def q_row(model: Model, prefix: tuple[int, ...]) -> torch.Tensor:
    """# [V] the draft's law after prefix."""
    return draft_law(logits_at(model.seed, model.like, prefix)[None], [model.params], [0], [1.0])[0]


@cache
def ranked(model: Model, prefix: tuple[int, ...]) -> torch.Tensor:
    """# [V] the draft's ids by descending logit after prefix."""
    return top_ids(logits_at(model.seed, model.like, prefix)[None], V)[0]


def q_rows(model: Model, rows: list[tuple[int, ...]]) -> torch.Tensor | None:
    """# [len(rows), V] the laws verification is given, None for a greedy draft (point masses)."""
    return None if model.params.greedy else torch.stack([q_row(model, r) for r in rows])


@dataclass(frozen=True)
class Case:
    target: Model
    draft: Model
    claimed: Model | None = None  # the law verification is told (default: the draft's own)
    sort_children: bool = False  # a broken variant: siblings sorted by draft probability


class EnumRng:
    """Rng (and draft sampler) that follows a script of branch indices, weighing the run by each
    branch's probability; past the script it takes branch 0 and records the branch count."""

    def __init__(self, script: list[int]):
        self.choices, self.arity, self.pos, self.weight = list(script), [], 0, 1.0

    def _branch(self, options: list[tuple[object, float]]):
        options = [(v, w) for v, w in options if w > 0]
        if self.pos == len(self.choices):
            self.choices.append(0)
            self.arity.append(len(options))
        value, w = options[self.choices[self.pos]]
        self.pos += 1
        self.weight *= w
        return value

    def accept(self, prob: float) -> bool:
        return self._branch([(True, prob), (False, 1.0 - prob)])

    def sample(self, probs: torch.Tensor) -> int:  # probs [V]
        return self._branch(list(enumerate(probs.tolist())))

    def draw(self, ids: list[int], probs: list[float], k: int, with_replacement: bool) -> list[int]:
        """The draw law draw_children implements, enumerated."""
        picked: list[int] = []
        for _ in range(k):
            law = [0.0 if (i in picked and not with_replacement) else w for i, w in enumerate(probs)]
            mass = sum(law)
            if mass == 0:  # exhausted: next id not yet drawn, deterministically
                picked.append(next(i for i in range(len(ids)) if i not in picked))
            else:
                picked.append(self._branch([(i, w / mass) for i, w in enumerate(law)]))
        return [ids[i] for i in picked]


def enumerate_runs(run) -> list[tuple[float, tuple[int, ...]]]:
    """(probability, result) of every branch of run(rng), depth first."""
    out, todo = [], [[]]
    while todo:
        script = todo.pop()
        rng = EnumRng(script)
        result = run(rng)
        out.append((rng.weight, result))
        for j, n in enumerate(rng.arity, start=len(script)):
            todo.extend(rng.choices[:j] + [alt] for alt in range(1, n))
    return out


def play_round(rng: EnumRng, case: Case, tree: Tree, with_replacement: bool) -> tuple[int, ...]:
    """Draft a tree at the empty prefix, verify it; returns the emitted tokens."""
    tokens = [0] * tree.num_nodes
    prefix = lambda j: tuple(tokens[a] for a in tree.path(j))  # draft tokens above node j (-1: root)
    for parent in range(-1, tree.num_nodes):
        children = tree.children(parent)
        if children:
            ids = ranked(case.draft, prefix(parent))
            probs = q_row(case.draft, prefix(parent))[ids]
            drawn = rng.draw(ids.tolist(), probs.tolist(), len(children), with_replacement)
            if case.sort_children:
                drawn.sort(key=lambda t: -float(probs[ids.tolist().index(t)]))
            for child, token in zip(children, drawn):
                tokens[child] = token
    rows = [prefix(j) for j in range(-1, tree.num_nodes)]
    p = torch.stack([p_row(case.target, r) for r in rows])  # [1+N, V]
    q = q_rows(case.claimed or case.draft, rows)  # [1+N, V] or None
    outcome = verify_tree(tree, torch.tensor(tokens), p, q, with_replacement, rng)
    return tuple(tokens[a] for a in outcome.accepted) + (outcome.token,)


def extended_law(runs, target: Model, length: int) -> dict[tuple[int, ...], float]:
    """Law of `length` tokens: each run's output continued from the target's exact conditionals."""
    law: dict[tuple[int, ...], float] = {}

    def extend(seq: tuple[int, ...], w: float):
        if len(seq) == length:
            law[seq] = law.get(seq, 0.0) + w
            return
        for t, pt in enumerate(p_row(target, seq).tolist()):
            if pt > 0:
                extend(seq + (t,), w * pt)

    for w, seq in runs:
        extend(seq, w)
    return law


def bounded(case: Case, branching: tuple[int, ...]) -> Case:
    """Trees enumerate a sampled draft truncated by its own top-k of 3 (V-wide draws at every node
    take minutes to enumerate); chains enumerate the draft's full law."""
    draft = case.draft.params
    if branching == (1,) * len(branching) or draft.greedy or draft.top_k:
        return case
    return replace(case, draft=replace(case.draft, params=replace(draft, top_k=3)))


def deviation(case: Case, branching: tuple[int, ...], with_replacement: bool) -> float:
    """Max |P_round(y) - P_target(y)| over sequences y of depth+1 tokens."""
    tree = Tree.from_branching(branching)
    runs = enumerate_runs(lambda rng: play_round(rng, case, tree, with_replacement))
    assert abs(sum(w for w, _ in runs) - 1) < 1e-6
    got = extended_law(runs, case.target, tree.depth + 1)
    want = extended_law([(1.0, ())], case.target, tree.depth + 1)
    return max(abs(got.get(y, 0.0) - want.get(y, 0.0)) for y in got.keys() | want.keys())


CASES = {
    "sampled": Case(Model(1, SamplingParams(1.0)), Model(2, SamplingParams(1.0), like=1)),
    "unrelated_draft": Case(Model(3, SamplingParams(1.0)), Model(4, SamplingParams(1.0))),
    "temperature_top_p": Case(Model(5, SamplingParams(0.7, top_p=0.8)), Model(6, SamplingParams(1.3, top_p=0.9), like=5)),
    "greedy_draft": Case(Model(7, SamplingParams(1.0, top_k=4)), Model(8, SamplingParams(0.0), like=7)),
    "exhausting_top_p": Case(Model(9, SamplingParams(0.9)), Model(10, SamplingParams(0.8, top_p=0.5), like=9)),
    "exhausting_top_k": Case(Model(17, SamplingParams(1.0)), Model(18, SamplingParams(1.2, top_k=2), like=17)),
    "greedy_target": Case(Model(11, SamplingParams(0.0)), Model(12, SamplingParams(1.0), like=11)),
}


@pytest.mark.parametrize("with_replacement", [False, True], ids=["without", "with"])
@pytest.mark.parametrize("branching", [(1, 1), (2, 2), (3, 1)])
@pytest.mark.parametrize("name", list(CASES))
def test_round_has_the_target_law(name, branching, with_replacement):
    assert deviation(bounded(CASES[name], branching), branching, with_replacement) < 1e-6


@pytest.mark.parametrize("with_replacement", [False, True], ids=["without", "with"])
@pytest.mark.parametrize("branching", [(1, 1, 1), (2, 2), (3, 1)])
@pytest.mark.parametrize("draft_temperature", [0.0, 1.0])
def test_greedy_target_emits_its_greedy_continuation(branching, with_replacement, draft_temperature):
    target = Model(13, SamplingParams(0.0))
    case = bounded(Case(target, Model(14, SamplingParams(draft_temperature), like=13)), branching)
    greedy: tuple[int, ...] = ()
    for _ in range(len(branching) + 1):
        greedy += (int(p_row(target, greedy).argmax()),)
    tree = Tree.from_branching(branching)
    runs = enumerate_runs(lambda rng: play_round(rng, case, tree, with_replacement))
    assert abs(sum(w for w, _ in runs) - 1) < 1e-6
    assert all(seq == greedy[: len(seq)] for _, seq in runs)
    if draft_temperature == 0:
        assert len(runs) == 1  # nothing random is left


@pytest.mark.parametrize("broken, branching", [
    ("skip_residual", (2, 2)), ("sort_children", (3, 1)), ("sampled_q_for_deterministic_candidates", (2, 2)),
    ("no_removal_without_replacement", (2, 2)),
])
def test_enumeration_detects_a_broken_rule(monkeypatch, broken, branching):
    case = bounded(CASES["sampled"], branching)
    if broken == "skip_residual":
        monkeypatch.setattr(verify, "_residual", lambda p, q: p)
    elif broken == "no_removal_without_replacement":
        monkeypatch.setattr(verify, "_without", lambda q, token: q)
    elif broken == "sort_children":
        case = replace(case, sort_children=True)
    else:  # a greedy draft's deterministic candidates verified as if drawn from its sampled law
        case = replace(case, draft=replace(case.draft, params=SamplingParams(0.0)), claimed=case.draft)
    assert deviation(case, branching, with_replacement=False) > 1e-3


class RejectAll:
    """Rejects every candidate, even one with acceptance probability 1; samples the argmax."""

    def accept(self, prob: float) -> bool:
        return False

    def sample(self, probs: torch.Tensor) -> int:  # probs [V]
        assert torch.isfinite(probs).all() and abs(float(probs.sum()) - 1) < 1e-5
        return int(probs.argmax())


@pytest.mark.parametrize("with_replacement", [False, True])
def test_no_nan_when_p_equals_q(with_replacement):
    model = Model(15, SamplingParams(1.0))
    tree = Tree.from_branching((2,))
    p = p_row(model, ())[None]  # [1, V]
    tokens = ranked(model, ())[:2]  # [2]
    out = verify_tree(tree, tokens, torch.cat([p, p, p]), q_row(model, ()).expand(3, V), with_replacement,
                      RejectAll())
    assert out == Outcome((), out.token) and 0 <= out.token < V
    torch.testing.assert_close(verify._residual(p[0], p[0]), p[0])


@pytest.mark.parametrize("q", ["none", "one_hot"])
def test_hand_cases_greedy(q):
    """One-hot p and a greedy draft (no law shipped, or a one-hot law): decisions are certain, so any
    generator gives the same outcome."""
    one_hot = lambda t: torch.nn.functional.one_hot(torch.tensor(t), V).float()
    rng = TorchRng(make_generator(0, "target"))
    chain = Tree.chain(3)
    laws = lambda tokens: None if q == "none" else torch.stack([one_hot(t) for t in tokens])  # [rows, V]
    p = torch.stack([one_hot(t) for t in (2, 4, 1, 5)])  # [4, V] target argmax per row
    for tokens, want in (([2, 4, 1], Outcome((0, 1, 2), 5)), ([2, 3, 1], Outcome((0,), 4)), ([0, 4, 1], Outcome((), 2))):
        assert verify_tree(chain, torch.tensor(tokens), p, laws(tokens + [0]), False, rng) == want
    fan = Tree.from_branching((3, 1))  # children 0, 1, 2 of the root; node 3+i under node i
    tokens = [0, 3, 2, 1, 1, 4]  # root children: 0 (drawn), 3 and 2 (deterministic)
    p = torch.stack([one_hot(t) for t in (2, 0, 0, 4, 0, 0, 0)])  # [7, V]
    assert verify_tree(fan, torch.tensor(tokens), p, laws([0, 1, 1, 4, 0, 0, 0]), False, rng) == Outcome((2, 5), 0)


def test_verify_batch_and_accepted_per_position():
    case = CASES["sampled"]
    tree = Tree.from_branching((2, 2))
    p = torch.stack([p_row(case.target, ())] * 7)  # [7, V]
    q = q_row(case.draft, ()).expand(7, V)  # [7, V]
    tokens = torch.tensor([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])  # [B, N]
    rngs = lambda: [TorchRng(make_generator(b, "target")) for b in range(2)]
    got = verify_batch([tree, tree], tokens, p.expand(2, 7, V), q.expand(2, 7, V), False, rngs())
    want = [verify_tree(tree, tokens[b], p, q, False, r) for b, r in enumerate(rngs())]
    assert got == want
    outcomes = [Outcome((), 1), Outcome((0,), 2), Outcome((1, 4), 3), Outcome((0, 2), 0)]
    assert accepted_per_position(outcomes, 2) == [3, 2]
    with pytest.raises(ValueError, match="depth"):
        accepted_per_position(outcomes, 1)


def test_monte_carlo_first_token_of_a_tree_without_replacement():
    case = CASES["sampled"]
    tree = Tree.from_branching((2, 2))
    draft_gen, rng = make_generator(7, "draft"), TorchRng(make_generator(7, "target"))
    counts = [0] * V
    n = 10_000
    draw = lambda prefix: draw_children(q_row(case.draft, prefix), ranked(case.draft, prefix), 2, False, draft_gen)
    for _ in range(n):
        tokens = draw(())
        for a in range(2):
            tokens += draw((tokens[a],))
        rows = [()] + [tuple(tokens[a] for a in tree.path(j)) for j in range(tree.num_nodes)]
        p = torch.stack([p_row(case.target, r) for r in rows])  # [7, V]
        out = verify_tree(tree, torch.tensor(tokens), p, q_rows(case.draft, rows), False, rng)
        counts[tokens[out.accepted[0]] if out.accepted else out.token] += 1
    want = p_row(case.target, ()).double()
    assert stats.chisquare(counts, (want / want.sum() * n).tolist()).pvalue > 1e-3


@pytest.mark.parametrize("branching", [(1, 1, 1, 1), (2, 2), (3, 1), (2, 2, 1)])
@pytest.mark.parametrize("with_replacement", [False, True])
def test_the_greedy_fast_path_equals_the_walk_on_one_hot_laws(branching, with_replacement):
    """verify_greedy (argmaxes only) gives verify_tree's outcome on the one-hot p it stands for, with
    the greedy draft's point masses (q None), over random trees, tokens and target choices."""
    tree = Tree.from_branching(branching)
    g = torch.Generator().manual_seed(sum(branching) + with_replacement)
    for _ in range(200):
        tokens = torch.randint(0, 3, (tree.num_nodes,), generator=g)  # [N], small range: many matches
        best = torch.randint(0, 3, (1 + tree.num_nodes,), generator=g)  # [1+N] target argmax per row
        p = torch.nn.functional.one_hot(best, V).float()  # [1+N, V]
        want = verify_tree(tree, tokens, p, None, with_replacement, TorchRng(make_generator(0, "target")))
        assert verify_greedy(tree, tokens, best) == want
