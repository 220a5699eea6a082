"""Device-side chain verification (verify.verify_chains) is verify_tree's rule, vectorised: fed the
same uniforms it gives the same outcome on every case, so the host walk's exactness (enumerated in
test_verify_exact) carries over; and a large batch of one case reproduces the target's law."""
from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from specray.core.tree import Tree
from specray.core.verify import chain_outcomes, verify_chains, verify_tree


class Replay:
    """An Rng that answers from given uniforms: accept() compares u[i] for the i-th draft token,
    sample() draws with the last one (as sampling.draw does)."""

    def __init__(self, u: torch.Tensor):
        self.u, self.i = u.tolist(), 0

    def accept(self, prob: float) -> bool:
        self.i += 1
        return self.u[self.i - 1] < prob

    def sample(self, probs: torch.Tensor) -> int:
        cdf = probs.double().cumsum(0)
        return int(torch.searchsorted(cdf, torch.tensor([self.u[-1]], dtype=torch.float64) * cdf[-1], right=True))


def random_case(g: torch.Generator, k: int, v: int):
    p = torch.softmax(3 * torch.randn(k + 1, v, generator=g), -1)
    q = torch.softmax(3 * torch.randn(k + 1, v, generator=g), -1)
    kind = torch.randint(0, 4, (1,), generator=g).item()
    if kind == 1:  # the draft equals the target somewhere: an empty residual
        q[0] = p[0]
    tokens = torch.multinomial(q[:k], 1, generator=g)[:, 0] if k else torch.zeros(0, dtype=torch.long)
    if kind == 2 and k:  # a deterministic candidate: q gives its token no mass
        q[0, tokens[0]] = 0
    if kind == 3:  # a truncated target (top-k style zeros)
        p[:, : v // 2] = 0
        p /= p.sum(-1, keepdim=True)
    return tokens, p, q


@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_same_uniforms_same_outcome_as_the_walk(k):
    g = torch.Generator().manual_seed(k)
    cases = [random_case(g, k, 7) for _ in range(400)]
    u = torch.rand(len(cases), k + 1, generator=g, dtype=torch.float64)
    tokens, p, q = (torch.stack(parts) for parts in zip(*cases))
    got = chain_outcomes(verify_chains(tokens, p, q, u).tolist())
    for (t, pb, qb), ub, outcome in zip(cases, u, got):
        want = verify_tree(Tree.chain(k) if k else Tree(()), t, pb, qb, False, Replay(ub))
        assert outcome == want


def expected(probs: torch.Tensor, n: int):
    probs = probs.double()
    return (n * probs / probs.sum()).numpy()


def test_a_batch_of_one_case_follows_the_target_law():
    """First emitted token ~ p[0]; after accepting x_1 the second ~ p[1] (50,000 rounds at once)."""
    g = torch.Generator().manual_seed(7)
    k, v, n = 2, 5, 50_000
    p = torch.softmax(torch.randn(k + 1, v, generator=g), -1)
    q = torch.softmax(torch.randn(k + 1, v, generator=g), -1)
    tokens = torch.multinomial(q[:k], n, replacement=True, generator=g).T  # [n, k], each row drawn from q
    out = verify_chains(tokens, p.expand(n, -1, -1), q.expand(n, -1, -1),
                        torch.rand(n, k + 1, generator=g, dtype=torch.float64))
    accepted, emitted = out[:, 0], out[:, 1]
    first = torch.where(accepted > 0, tokens[:, 0], emitted)
    assert chisquare(torch.bincount(first, minlength=v).numpy(), expected(p[0], n)).pvalue > 1e-3
    took = accepted > 0
    second = torch.where(accepted[took] > 1, tokens[took, 1], emitted[took])
    assert chisquare(torch.bincount(second, minlength=v).numpy(), expected(p[1], int(took.sum()))).pvalue > 1e-3
