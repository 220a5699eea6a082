"""Two-node placement: the draft worker on one Ray node, the target stages on another.

`ray.cluster_utils.Cluster` starts a head and two raylets on this machine; custom resources pin
the actors. Runs its own cluster, so it must not share a process-wide Ray with other modules'
fixtures (theirs are module-scoped and shut down before this module starts)."""
from __future__ import annotations

import asyncio
import os

import pytest
import torch
from conftest import make_pair
from transformers import AutoModelForCausalLM

from specray.core.sampling import SamplingParams
from specray.core.speculation import SpeculationConfig
from specray.engine import ActorResources, EngineConfig, EngineRequest, build_engine, complete

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

MODES = [SpeculationConfig("off"), SpeculationConfig("chain", 3), SpeculationConfig("tree", 2, (2, 2)),
         SpeculationConfig("async", 3)]


class Letters:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    c = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                      "object_store_memory": int(1e8)})
    draft_node = c.add_node(num_cpus=1, resources={"draft_node": 1}, object_store_memory=int(1e8))
    target_node = c.add_node(num_cpus=1, resources={"target_node": 1}, object_store_memory=int(1e8))
    ray.init(address=c.address)
    yield draft_node.node_id, target_node.node_id
    ray.shutdown()
    c.shutdown()


@pytest.mark.parametrize("transport", ["graph", "calls"])
def test_draft_and_stages_on_their_own_nodes(cluster, tmp_path, transport):
    draft_node, target_node = cluster
    target, draft = make_pair(tmp_path, vocab=97, seed=4, noise=0.3, layers=2)
    engine = build_engine(EngineConfig(
        target, draft, kind="ray", transport=transport, num_target_stages=2, max_batch=4, max_context=128,
        draft_resources=ActorResources(num_cpus=0.5, resources={"draft_node": 1}),
        stage_resources=ActorResources(num_cpus=0.5, resources={"target_node": 0.5})), tokenizer=Letters())
    workers = engine.workers
    assert ray.get(workers.draft.node_id.remote()) == draft_node
    assert ray.get([s.node_id.remote() for s in workers.stages]) == [target_node] * 2

    prompt = [5, 17, 3, 88, 41]
    model = AutoModelForCausalLM.from_pretrained(target).eval()
    want = model.generate(torch.tensor([prompt]), max_new_tokens=30, min_new_tokens=30, do_sample=False,
                          pad_token_id=0)[0, len(prompt):].tolist()

    async def all_modes():
        reqs = [EngineRequest(str(i), prompt, SamplingParams(), spec, 30) for i, spec in enumerate(MODES)]
        return await asyncio.gather(*(complete(engine, r) for r in reqs))

    assert [tokens for tokens, _, _ in asyncio.run(all_modes())] == [want] * len(MODES)
    workers.shutdown()
