"""The engine end to end, on a local Ray cluster (CPU) and in process, with tiny random models.

Greedy: every mode, with 1, 2 and 3 target stages, many concurrent requests of different prompts,
lengths and modes sharing batches (more requests than slots, so admission runs between rounds),
each equal to transformers' greedy decoding of the target alone; the Ray and in-process engines
agree token for token and statistic for statistic. Seeded sampling: the Ray engine reproduces the
in-process reference `generate()` exactly (per-request generators make draws independent of
batching; the in-process chi-square tests establish the law). Then the engine's own rules:
cancellation frees slots, stop strings, max_tokens, EOS, bad requests, failing rounds."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from typing import ClassVar

import pytest
import torch
from conftest import make_pair
from transformers import AutoModelForCausalLM

from specray.core.generate import generate
from specray.core.loader import load_shard
from specray.core.sampling import SamplingParams
from specray.core.speculation import SpeculationConfig
from specray.engine import (
    ActorResources,
    Engine,
    EngineConfig,
    EngineRequest,
    EngineStopped,
    LocalWorkers,
    build_engine,
    complete,
)
from specray.engine.detokenizer import Detokenizer

ray = pytest.importorskip("ray")

VOCAB = 97
MODES = [SpeculationConfig("off"), SpeculationConfig("chain", 4), SpeculationConfig("tree", 3, (3, 2, 1)),
         SpeculationConfig("async", 3)]


class CharTokenizer:
    """Token i renders as a letter repeated 1-3 times: text of varying width, no special tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) * (1 + i % 3) for i in ids)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def ray_local():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(include_dashboard=False, object_store_memory=2e8)  # this machine's CPUs, as users get
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pair3(tmp_path_factory):
    """Vocab 97, 3 layers, so the target splits into 1, 2 or 3 stages."""
    return make_pair(tmp_path_factory.mktemp("pair3"), vocab=VOCAB, seed=3, noise=0.3, layers=3)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (1, 4, 9, 17, 2, 30, 6, 12)]


@pytest.fixture(scope="module")
def greedy(pair3, prompts):
    """transformers' greedy decoding of the target alone, 48 tokens per prompt."""
    model = AutoModelForCausalLM.from_pretrained(pair3[0]).eval()
    out = []
    for p in prompts:
        ids = model.generate(torch.tensor([p]), max_new_tokens=48, min_new_tokens=48, do_sample=False,
                             pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    return out


def config(pair, **kw) -> EngineConfig:
    return EngineConfig(pair[0], pair[1], max_batch=8, max_context=192, **kw)


@pytest.fixture(scope="module", params=["graph", "calls"])
def ray_engines(ray_local, pair3, request):
    """One Ray engine per stage count, for each transport; the 2-stage one is placed through a
    placement group."""
    from ray.util.placement_group import placement_group, remove_placement_group
    res = ActorResources(num_cpus=0.2)  # 9 actors in 1.8 CPUs; each still runs torch on 1 thread
    pg = placement_group([{"CPU": 0.2}] * 3)
    ray.get(pg.ready())
    engines = {n: build_engine(config(pair3, kind="ray", transport=request.param, num_target_stages=n,
                                      layer_split=(2, 1) if n == 2 else (), draft_resources=res,
                                      stage_resources=res),
                               CharTokenizer(), placement_group=pg if n == 2 else None) for n in (1, 2, 3)}
    yield engines
    for e in engines.values():
        e.workers.shutdown()
    remove_placement_group(pg)


@pytest.fixture(scope="module")
def local_engine(pair3):
    return build_engine(config(pair3), CharTokenizer())


def greedy_requests(prompts):
    """Every prompt in every mode, 8 to 45 tokens: 32 requests for 8 slots."""
    return [EngineRequest(f"{m}-{i}", p, SamplingParams(), spec, max_tokens=8 + (5 * i + 3 * m) % 38)
            for m, spec in enumerate(MODES) for i, p in enumerate(prompts)]


async def complete_all(engine, reqs):
    return await asyncio.gather(*(complete(engine, r) for r in reqs))


def check_greedy(outs, reqs, prompts, greedy):
    for (tokens, reason, stats), req in zip(outs, reqs):
        i = int(req.rid.split("-")[1])
        assert tokens == greedy[i][:req.max_tokens], req
        assert reason == "length"
        assert stats.num_steps >= 1 and (stats.num_accepted_tokens == 0 or req.spec.mode != "off")


def test_local_engine_greedy_all_modes(local_engine, prompts, greedy):
    reqs = greedy_requests(prompts)
    outs = run(complete_all(local_engine, reqs))
    check_greedy(outs, reqs, prompts, greedy)
    assert sum(s.num_accepted_tokens for _, _, s in outs) > 0
    assert local_engine.free_slots == 8 and local_engine.running == local_engine.waiting == 0


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_ray_engine_greedy_all_modes_equals_local(ray_engines, local_engine, prompts, greedy, stages):
    engine = ray_engines[stages]
    reqs = greedy_requests(prompts)
    outs = run(complete_all(engine, reqs))
    check_greedy(outs, reqs, prompts, greedy)
    local = run(complete_all(local_engine, reqs))
    assert [(t, s.to_dict()) for t, _, s in outs] == [(t, s.to_dict()) for t, _, s in local]
    ssd = [s for (_, _, s), r in zip(outs, reqs) if r.spec.mode == "async"]
    assert sum(s.cache_lookups for s in ssd) > 0  # SSD bookkeeping came back through the actors
    assert engine.free_slots == 8


def test_each_request_equals_its_solo_run(ray_engines, prompts, greedy):
    """Solo runs (batch 1: SSD's auto backup is neural) give the same tokens as the batched ones."""
    engine = ray_engines[3]
    for i in (0, 5):
        for spec in MODES:
            req = EngineRequest("solo", prompts[i], SamplingParams(), spec, 30)
            tokens, _, _ = run(complete(engine, req))
            assert tokens == greedy[i][:30]


def test_actors_report_their_nodes(ray_engines):
    workers = ray_engines[3].workers
    nodes = ray.get([a.node_id.remote() for a in (workers.draft, *workers.stages)])
    assert nodes == [ray.get_runtime_context().get_node_id()] * 4


SEEDED = [
    SpeculationConfig("chain", 3),
    SpeculationConfig("tree", 2, (3, 2)),
    SpeculationConfig("tree", 2, (2, 2), with_replacement=True),
    SpeculationConfig("async", 3, backup="neural"),
    SpeculationConfig("async", 2, fan_out=(2, 1, 2), saguaro_c=0.5, backup="fast"),
]


@pytest.mark.parametrize("spec", SEEDED, ids=lambda s: f"{s.mode}-{s.branching}-{s.backup}")
def test_ray_engine_sampling_equals_reference_generate(ray_engines, pair3, prompts, spec):
    params = [SamplingParams(0.9, top_k=(0, 20)[i % 2], top_p=(1.0, 0.9)[i % 2 == 0], seed=100 + i)
              for i in range(len(prompts))]
    want = generate([load_shard(pair3[0])], load_shard(pair3[1]), prompts, params, spec, max_tokens=24)
    reqs = [EngineRequest(str(i), p, sp, spec, 24) for i, (p, sp) in enumerate(zip(prompts, params))]
    outs = run(complete_all(ray_engines[2], reqs))
    assert [t for t, _, _ in outs] == [w.token_ids for w in want]
    assert [s.to_dict() for _, _, s in outs] == [w.stats.to_dict() for w in want]


def test_cancellation_frees_slots(ray_engines, prompts, greedy):
    engine = ray_engines[2]
    workers = engine.workers

    async def scenario():
        long = asyncio.ensure_future(complete(engine, EngineRequest("long", prompts[1], SamplingParams(),
                                                                    MODES[1], max_tokens=45)))
        stream = engine.generate(EngineRequest("dropped", prompts[2], SamplingParams(), MODES[3], 60))
        first = await stream.__anext__()  # one delta, then the consumer walks away
        await stream.aclose()
        killed = asyncio.ensure_future(complete(engine, EngineRequest("killed", prompts[3], SamplingParams(),
                                                                      MODES[2], 60)))
        while "killed" not in engine._running:
            await asyncio.sleep(0.001)
        killed.cancel()
        tokens, _, _ = await long
        return first, tokens

    first, tokens = run(scenario())
    assert list(first.token_ids) == greedy[2][:len(first.token_ids)]
    assert tokens == greedy[1][:45]
    assert engine.free_slots == 8 and engine.running == engine.waiting == 0 and engine.num_cancelled >= 2
    actors = [*workers.stages, workers.draft]
    run(workers.flush())  # removals reach the actors with the next step (the engine flushes when idle)
    assert ray.get([a.num_free.remote() for a in actors]) == [8] * 3
    tokens, _, _ = run(complete(engine, EngineRequest("dropped", prompts[2], SamplingParams(), MODES[3], 20)))
    assert tokens == greedy[2][:20]  # the id and the slots are usable again


def test_cancelled_waiting_request_never_runs(pair3, prompts, greedy):
    engine = build_engine(EngineConfig(pair3[0], pair3[1], max_batch=1, max_context=192), CharTokenizer())

    async def scenario():
        first = asyncio.ensure_future(complete(engine, EngineRequest("a", prompts[0], max_tokens=30)))
        second = asyncio.ensure_future(complete(engine, EngineRequest("b", prompts[1], max_tokens=30)))
        await asyncio.sleep(0)
        assert engine.waiting >= 1
        second.cancel()
        return await first

    tokens, _, _ = run(scenario())
    assert tokens == greedy[0][:30]
    assert engine.num_finished == 1 and engine.waiting == 0 and engine.free_slots == 1


def test_stop_strings_cut_text_and_tokens(local_engine, prompts, greedy):
    tok = CharTokenizer()
    full = tok.decode(greedy[3][:40])
    stop = tok.decode(greedy[3][6:8])
    at = full.find(stop)
    n = next(k for k in range(1, 41) if len(tok.decode(greedy[3][:k])) >= at + len(stop))

    async def collect(req):
        return [d async for d in local_engine.generate(req)]

    for spec in MODES:
        req = EngineRequest("s", prompts[3], SamplingParams(), spec, 40, stop=("zzzzzz", stop))
        deltas = run(collect(req))
        assert "".join(d.text for d in deltas) == full[:at]
        assert [t for d in deltas for t in d.token_ids] == greedy[3][:n]
        assert deltas[-1].finish_reason == "stop" and deltas[-1].stats is not None
        assert all(d.finish_reason is None and d.stats is None for d in deltas[:-1])
    deltas = run(collect(EngineRequest("s", prompts[3], SamplingParams(), MODES[1], 40, stop=("zzzzzz",))))
    assert "".join(d.text for d in deltas) == full and deltas[-1].finish_reason == "length"


def test_max_tokens_one(local_engine, prompts, greedy):
    for spec in MODES:
        assert run(complete(local_engine, EngineRequest("m", prompts[4], SamplingParams(), spec, 1)))[:2] == \
            ([greedy[4][0]], "length")


def test_eos_finishes_unless_ignored(pair3, prompts, greedy, tmp_path):
    """A copy of the target whose config names an EOS token that greedy decoding reaches."""
    target = tmp_path / "target"
    shutil.copytree(pair3[0], target)
    out = greedy[5]
    eos = next(t for i, t in enumerate(out) if i >= 4 and t not in out[:i])
    cfg = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**cfg, "eos_token_id": eos}))
    engine = build_engine(EngineConfig(str(target), pair3[1], max_batch=4, max_context=192), CharTokenizer())
    for spec in MODES:
        tokens, reason, _ = run(complete(engine, EngineRequest("e", prompts[5], SamplingParams(), spec, 40)))
        assert (tokens, reason) == (out[:out.index(eos) + 1], "eos")
        tokens, reason, _ = run(complete(engine, EngineRequest("e", prompts[5], SamplingParams(), spec, 40,
                                                               ignore_eos=True)))
        assert (tokens, reason) == (out[:40], "length")


def test_ssd_with_the_target_as_draft_always_hits(pair3, prompts):
    engine = build_engine(EngineConfig(pair3[0], pair3[0], max_batch=2, max_context=192), CharTokenizer())
    _, _, stats = run(complete(engine, EngineRequest("x", prompts[2], SamplingParams(),
                                                     SpeculationConfig("async", 3), 40)))
    assert stats.cache_lookups == stats.num_steps - 1 and stats.cache_hit_rate == 1.0
    assert stats.acceptance_rate == 1.0


def test_bad_requests_are_refused(local_engine, pair3, prompts):
    async def first(req, engine=local_engine):
        return await engine.generate(req).__anext__()

    with pytest.raises(ValueError, match="max_context"):
        run(first(EngineRequest("a", prompts[5], max_tokens=180)))
    with pytest.raises(ValueError, match="vocabulary"):
        run(first(EngineRequest("a", [VOCAB])))
    with pytest.raises(ValueError, match="wider"):
        run(first(EngineRequest("a", [1], spec=SpeculationConfig("tree", 1, (VOCAB + 1,)))))
    no_tok = Engine(local_engine.workers, local_engine.config)
    with pytest.raises(ValueError, match="tokenizer"):
        run(first(EngineRequest("a", [1], stop=("x",)), no_tok))
    with pytest.raises(ValueError, match="prompt"):
        EngineRequest("a", [])
    with pytest.raises(ValueError, match="layer_split"):
        EngineConfig(pair3[0], pair3[1], num_target_stages=2, layer_split=(3,))
    with pytest.raises(ValueError, match="draft"):
        EngineConfig(pair3[0], None, spec=SpeculationConfig("chain"))

    async def duplicate():
        a = local_engine.generate(EngineRequest("dup", [1], max_tokens=5))
        await a.__anext__()
        try:
            await first(EngineRequest("dup", [2]))
        finally:
            await a.aclose()

    with pytest.raises(ValueError, match="already in use"):
        run(duplicate())


def test_target_only_engine_without_draft(pair3, prompts, greedy):
    engine = build_engine(EngineConfig(pair3[0], None, spec=SpeculationConfig("off"), max_batch=2,
                                       max_context=128), CharTokenizer())
    assert run(complete(engine, EngineRequest("t", prompts[6], max_tokens=20)))[0] == greedy[6][:20]


def test_a_failing_round_fails_its_requests_not_the_engine(pair3, prompts, greedy):
    class Flaky(LocalWorkers):
        fail = True

        async def round(self, rids):
            if self.fail:
                self.fail = False
                raise RuntimeError("boom")
            return await super().round(rids)

    cfg = config(pair3)
    engine = Engine(Flaky(cfg, cfg.stage_layers(3)), cfg, CharTokenizer())
    with pytest.raises(RuntimeError, match="boom"):
        run(complete(engine, EngineRequest("f", prompts[0], max_tokens=10)))
    assert engine.free_slots == 8 and engine.num_failed == 1
    assert run(complete(engine, EngineRequest("f", prompts[0], max_tokens=10)))[0] == greedy[0][:10]


def test_shutdown_fails_requests_in_flight(pair3, prompts):
    engine = build_engine(config(pair3), CharTokenizer())

    async def scenario():
        task = asyncio.ensure_future(complete(engine, EngineRequest("s", prompts[0], max_tokens=150)))
        while engine.running == 0:
            await asyncio.sleep(0.001)
        await engine.shutdown()
        return await asyncio.gather(task, return_exceptions=True)

    (result,) = run(scenario())
    assert isinstance(result, EngineStopped)


def test_detokenizer_holds_back_partial_characters():
    class Bytes:
        table: ClassVar[dict[int, bytes]] = {1: b"a", 2: b"\xc3", 3: b"\xa9", 4: b" b"}

        def decode(self, ids, skip_special_tokens=True):
            return b"".join(self.table[i] for i in ids).decode("utf-8", errors="replace")

    d = Detokenizer(Bytes(), [1])
    assert [d.push(t) for t in (1, 2, 3, 4)] == ["a", "", "é", " b"]


def test_actor_resources_validate():
    with pytest.raises(ValueError, match="num_cpus"):
        ActorResources(num_cpus=-1)


def test_infeasible_placement_fails_at_once_naming_the_resources(ray_local, pair3):
    cpus = ray.cluster_resources()["CPU"]
    start = time.monotonic()
    with pytest.raises(ValueError, match=f"CPU {1 + 2 * cpus:g} asked, {cpus:g} in the cluster"):
        build_engine(config(pair3, kind="ray", num_target_stages=2, stage_resources=ActorResources(cpus)),
                     CharTokenizer())
    with pytest.raises(ValueError, match="no node of this Ray cluster has"):
        build_engine(config(pair3, kind="ray", draft_resources=ActorResources(0.1, resources={"tpu": 1})),
                     CharTokenizer())
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_timings_split_draft_and_verification(ray_engines, local_engine, prompts, kind):
    engine = local_engine if kind == "local" else ray_engines[1]
    before = run(engine.timings())
    run(complete(engine, EngineRequest("t", prompts[3], SamplingParams(), MODES[1], 20)))
    after = run(engine.timings())
    assert after["rounds"] > before["rounds"]
    assert after["draft_s"] > before["draft_s"] and after["verify_s"] > before["verify_s"]


def test_gpu_stages_send_hidden_states_over_nccl(ray_engines):
    """The graph transport types the stage-to-stage edges for NCCL when stages hold GPUs (built, not
    compiled: this machine has no GPU); the draft's speculations stay on shared memory."""
    from specray.engine.graph import CompiledStep
    workers = ray_engines[3].workers
    verify = CompiledStep(workers.draft, workers.stages, gpu_stages=True).build()
    hints, node = [], verify
    while (up := node.get_args()[2]) is not None:  # verify / forward(work, specs, up)
        hints.append(up.type_hint.transport)
        node = up
    assert hints == ["accelerator", "accelerator"]
    assert not hasattr(verify.get_args()[1].type_hint, "transport")  # the draft's output: plain channel
