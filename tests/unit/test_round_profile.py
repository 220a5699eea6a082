"""`specray bench round`: ops and host reads are counted at the dispatcher, and a round profiles end to end."""
from __future__ import annotations

import torch

from specray.bench.round_profile import OpCounter, profile
from specray.core.loader import load_shard


def test_the_counter_sees_every_op_and_each_scalar_read():
    with OpCounter() as counter:
        x = torch.ones(3) + 1  # [3]
        int(x.sum())
    assert counter.ops >= 3 and counter.host_reads == 1


def test_a_round_profiles_greedy_and_sampled(tiny_pair):
    target_dir, draft_dir = tiny_pair
    target, draft = [load_shard(target_dir, 0, 1), load_shard(target_dir, 1, 2)], load_shard(draft_dir)
    for temperature in (0.0, 1.0):
        cost = profile(target, draft, [[1, 2, 3], [4, 5]], "chain", 2, 3, temperature)
        assert cost.ops > 100 and cost.host_reads > 0 and cost.ms > 0
        assert 1 <= cost.tokens <= 5  # chain K=4 commits 1 to 5 tokens a round
