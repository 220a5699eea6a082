"""SSD's fan-out: never more guesses at a position than it has candidates (the rest go elsewhere), so
Saguaro always leaves some of a drafted law unweighted; and one fan-out per speculation, used both
for its laws' Saguaro weights and for the guesses made while it is verified."""
from __future__ import annotations

import pytest
import torch

from specray.core.drafter import Drafter
from specray.core.loader import load_shard
from specray.core.sampling import SamplingParams, draft_law
from specray.core.speculation import SpeculationConfig
from specray.core.ssd import geometric_fan_out, likely_outcomes, outcome_law
from specray.core.step import Admission, Work


@pytest.mark.parametrize("acceptance", [0.0, 0.05, 0.2, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("k, budget, width", [(4, 10, 8), (4, 40, 8), (7, 24, 3), (2, 64, 8), (1, 1, 2)])
def test_fan_out_is_capped_and_keeps_the_budget(acceptance, k, budget, width):
    fan = geometric_fan_out(k, acceptance, budget, width)
    caps = [width - 1] * k + [width]
    assert len(fan) == k + 1 and all(0 <= f <= c for f, c in zip(fan, caps))
    assert sum(fan) == min(budget, sum(caps))  # branches a capped position cannot take go elsewhere


def test_low_acceptance_no_longer_asks_for_more_guesses_than_exist():
    # before the cap, F_0 was 8 or 9 here while only 7 tokens can be the correction at k = 0
    assert geometric_fan_out(4, 0.2, 10, 8) == (7, 3, 0, 0, 0)
    assert geometric_fan_out(4, 0.6, 10, 8) == (4, 3, 1, 1, 1)  # proportional (Sainte-Laguë)


def test_saguaro_acts_at_a_capped_position():
    probs = torch.tensor([[0.5, 0.2, 0.2, 0.1]])
    logits, params = probs.log(), [SamplingParams(1.0)]
    weighted = draft_law(logits, params, [geometric_fan_out(1, 0.0, 8, 4)[0]], [0.5])  # F_0 = 3 of V = 4
    assert weighted.sum().item() == pytest.approx(1)
    assert weighted[0, 3] > probs[0, 3]  # mass moved onto the one unguessed candidate
    torch.testing.assert_close(draft_law(logits, params, [4], [0.5]), probs)  # F = V: nothing to move to


def test_one_fan_out_per_speculation(tiny_pair):
    """The guesses made while a speculation is verified follow the fan-out its laws were weighted
    for, even when the live acceptance (and so the next fan-out) changes in between."""
    drafter = Drafter(load_shard(tiny_pair[1]), 1, 128)
    spec = SpeculationConfig("async", 4, saguaro_c=0.5)
    sent = drafter.propose(Work(add=(Admission("a", (5, 17, 3), SamplingParams(1.0, seed=1), spec),), rids=("a",)))
    fan = sent[0].fan_out
    assert fan == geometric_fan_out(4, 0.5, spec.branch_budget, drafter.vocab)
    seq = drafter.seqs["a"]
    seq.accepted, seq.drafted = 0, 40  # acceptance collapses before the preparation
    drafter.prepare(Work(rids=("a",)))
    guesses = [pos for pos, _ in seq.cache.keys]
    assert [guesses.count(pos) for pos in range(5)] == list(fan)
    assert all(branch.fan_out == geometric_fan_out(4, 1 / 42, spec.branch_budget, drafter.vocab)
               for branch in seq.cache.branches)  # the next round's speculations carry the new one


def test_outcome_law_keeps_clustered_acceptance():
    assert outcome_law([], []) == [1.0]
    assert outcome_law([0, 0], [0, 0]) == pytest.approx([0.5, 0.25, 0.25])  # no history: 1/2 per position
    # a sequence that rejects its first token half the time but otherwise accepts everything
    law = outcome_law([50, 48, 48, 48], [100, 50, 48, 48])
    assert sum(law) == pytest.approx(1) and law[4] > 0.4 and law[1] + law[2] + law[3] < 0.1


def test_likely_outcomes_spend_the_budget_where_the_mass_is():
    law = [0.5, 0.1, 0.4]  # P(0, 1, 2 accepted) for K = 2
    peaked, flat = [(7, 0.9), (8, 0.05)], [(t, 0.1) for t in range(10)]
    got = likely_outcomes(law, [flat, peaked, peaked], 4)
    assert got == [(2, 7), (1, 7), (0, 0), (0, 1)]  # best first: 0.36, 0.09, then the flat position's 0.05s
    assert len(likely_outcomes(law, [flat, peaked, peaked], 100)) == 14  # never more than the candidates
