"""Numbers that pass a naive range check but break the maths: each is floored, refused before
anything is built, or caught in verification -- never a NaN law, never a silent accept."""
from __future__ import annotations

import pytest
import torch

from specray.core.generate import generate
from specray.core.loader import load_shard
from specray.core.sampling import MIN_TEMPERATURE, SamplingParams, draft_law, target_probs
from specray.core.speculation import MAX_TREE_NODES, MIN_SAGUARO_C, SpeculationConfig
from specray.core.tree import Tree
from specray.core.verify import chain_outcomes, verify_chains, verify_tree


def test_a_tiny_positive_temperature_is_raised_to_the_floor():
    params = SamplingParams(temperature=1e-45)
    assert params.temperature == MIN_TEMPERATURE and not params.greedy
    logits = torch.tensor([[[3.0, 2.9, -1.0, 0.5]]])
    assert torch.isfinite(target_probs(logits, [params])).all()


def test_a_tiny_temperature_request_and_its_batch_mate_finish(tiny_pair):
    """The 1e-45 request used to make the target's law NaN and fail the round for both."""
    target, draft = load_shard(tiny_pair[0]), load_shard(tiny_pair[1])
    prompts = [[5, 6, 7], [8, 9]]
    spec = SpeculationConfig("chain", 3)
    solo = generate([target], draft, prompts[1:], SamplingParams(), spec, 8)[0].token_ids
    both = generate([target], draft, prompts, [SamplingParams(1e-45, seed=1), SamplingParams()], spec, 8)
    assert len(both[0].token_ids) == 8 and both[1].token_ids == solo


def test_a_tiny_saguaro_c_is_floored_and_its_law_stays_finite():
    spec = SpeculationConfig("async", 2, saguaro_c=1e-45)
    assert spec.saguaro_c == MIN_SAGUARO_C
    logits = torch.tensor([[9.0, 1.0, -30.0, -30.0]])  # nearly all mass on the down-weighted top 2
    law = draft_law(logits, [SamplingParams(1.0, top_k=2)], [2], [spec.saguaro_c])
    assert torch.isfinite(law).all() and float(law.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("branching", [[2_147_483_647], [2] * 32, [1_000_000]])
def test_huge_branchings_are_refused_without_building_the_tree(branching, monkeypatch):
    def refuse(_):
        raise AssertionError("the tree was built before its size was checked")
    monkeypatch.setattr(Tree, "from_branching", staticmethod(refuse))
    with pytest.raises(ValueError, match=f"more than {MAX_TREE_NODES} tree nodes"):
        SpeculationConfig("tree", 0, tuple(branching))


def test_the_node_count_matches_the_tree():
    for branching in [(3, 2, 1), (4, 4), (1,) * 5, (256,), (16, 15)]:
        nodes = Tree.from_branching(branching).num_nodes
        if nodes <= MAX_TREE_NODES:
            SpeculationConfig("tree", 0, branching)
        else:
            with pytest.raises(ValueError):
                SpeculationConfig("tree", 0, branching)


@pytest.mark.parametrize("bad", ["p", "q"])
def test_a_non_finite_law_is_an_error_not_an_accept(bad):
    """min(1, p / q) is 1 for a NaN ratio: the walk would accept every draft token."""
    tree = Tree.chain(2)
    p = torch.full((3, 4), 0.25)
    q = torch.full((3, 4), 0.25)
    (p if bad == "p" else q)[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        verify_tree(tree, torch.tensor([1, 2]), p, q, False, rng=None)
    with pytest.raises(ValueError, match="non-finite"):  # the device-side chain path likewise
        chain_outcomes(verify_chains(torch.tensor([[1, 2]]), p[None], q[None], torch.zeros(1, 3, dtype=torch.float64)).tolist())
