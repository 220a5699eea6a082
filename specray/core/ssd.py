"""Speculative speculative decoding (SSD, "Saguaro"): the speculation cache of one sequence.

While the target verifies a K-chain x_1..x_K, the draft predicts the likely outcomes (k, b) -- k
accepted tokens, then the correction/bonus token b -- and drafts the next round's K-chain for
each, all branches batched, one forward per depth, tree-masked over the shared prefix. A hit
serves the next speculation at once; a miss falls back to a backup. Only the latest round's cache
is kept. Exactness: every cached token was drawn from its node's draft law (sampling.draft_law,
Saguaro's down-weighting included), which verification recomputes from the hidden state the branch
ships, and which branch is used depends only on the verification outcome.

Which outcomes to guess. The drafted token x_{k+1} is never a guess at k (it cannot be the
correction). Greedy, or with Saguaro weights, or a fan-out the request fixed: F_k guesses at each
position k (geometric_fan_out, fixed when the speculation is drafted, since Saguaro's weights of its
laws depend on it), the draft's highest-logit tokens there; with Saguaro they are the tokens it
down-weighted, where the residual norm(max(0, p - q')) then lies. Sampled without Saguaro: the
branch budget goes to the outcomes the draft rates likeliest across all positions (likely_outcomes):
P(k accepted) from the sequence's live acceptance per position (outcome_law) times the draft's own
law at k without x_{k+1} (its best estimate of where the correction falls), or its law after x_K
for the bonus; a peaked position takes few guesses, a flat one many. Chosen by a one-off replay
(2026-12-03; the script was not kept) of 340 recorded SSD rounds of the demo pair at T = 1, budget
10: the fixed geometric fan-out would have hit 0.256, the likeliest outcomes with one acceptance
rate 0.321, with per-position rates 0.347. `specray bench engine --temperature 1.0 --modes async`
measures the result end to end.

Rows of a sequence's draft cache after `base` while a cache is built (P pending rows):
  [0, P) pending | [P, P+K-1) x_1..x_{K-1} | P+K-1 x_K | then K blocks of M branch rows
Branch i = (k_i, b_i) feeds b_i, y_1 .. y_{K-1} (row P + K + j*M + i for j = 0..K-1).
Knows nothing of Ray."""
from __future__ import annotations

from dataclasses import dataclass

from specray.core.speculation import Speculation


def geometric_fan_out(k: int, acceptance: float, budget: int, width: int) -> tuple[int, ...]:
    """F_0..F_K over `budget` branches, in proportion to P(exactly k accepted) under i.i.d. acceptance,
    never more guesses at a position than candidates exist there: width - 1 at k < K (the drafted
    token cannot be the correction), width at K (the bonus). Branches a capped position cannot take
    go to the others (Sainte-Laguë: each branch to the position with the most weight / (2 F + 1))."""
    a = min(max(acceptance, 0.05), 0.95)
    weights = [a ** j * (1 - a) for j in range(k)] + [a ** k]
    caps = [width - 1] * k + [width]
    fan = [0] * (k + 1)
    for _ in range(min(budget, sum(caps))):
        j = max((j for j in range(k + 1) if fan[j] < caps[j]), key=lambda j: weights[j] / (2 * fan[j] + 1))
        fan[j] += 1
    return tuple(fan)


def outcome_law(passed: list[int], reached: list[int]) -> list[float]:
    """P(exactly k of the K drafted tokens accepted), k = 0..K, from each position's live acceptance:
    position j was reached (every token before it accepted) reached[j] times and accepted passed[j]
    times; its rate (passed + 1) / (reached + 2). Unlike one rate for all positions this keeps how
    acceptances cluster: on the demo pair at T = 1, 33 % of SSD rounds accept all K = 4 tokens, where
    i.i.d. acceptance at the measured 0.47 predicts 5 %."""
    law, alive = [], 1.0
    for p, n in zip(passed, reached):
        a = (p + 1) / (n + 2)
        law.append(alive * (1 - a))
        alive *= a
    return law + [alive]


def likely_outcomes(law: list[float], candidates: list[list[tuple[int, float]]], budget: int) -> list[tuple[int, int]]:
    """The `budget` outcomes (k, b) the draft rates likeliest, best first: law[k] = P(exactly k
    accepted) (outcome_law) times P(b | k), the chance that b is the correction at position k (k < K)
    or the bonus (k = K). candidates[k]: (token, P(b | k) as the draft estimates it) at position k."""
    scored = [(law[k] * w, k, token) for k, position in enumerate(candidates) for token, w in position]
    scored.sort(key=lambda x: -x[0])
    return [(k, token) for _, k, token in scored[:budget]]


@dataclass
class SpeculationCache:
    """One sequence's cached next rounds, keyed by the outcome (k, b)."""
    pending: int                    # P
    k: int                          # K of the speculation being verified
    keys: dict[tuple[int, int], int]  # (k, b) -> branch index
    branches: list[Speculation]     # the next round's speculation per branch

    @property
    def width(self) -> int:          # M
        return len(self.branches)

    def lookup(self, accepted: int, token: int) -> int | None:
        return self.keys.get((accepted, token))

    def kept_rows(self, branch: int, accepted: int) -> list[int]:
        """Rows (relative to base) that stay on a hit: pending, x_1..x_a, then the branch's b, y_1.. y_{K-1}."""
        p, k, m = self.pending, self.k, self.width
        return list(range(p + accepted)) + [p + k + j * m + branch for j in range(k)]
