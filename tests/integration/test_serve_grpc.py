"""The Serve app through its real gRPC proxy (loopback), on the embedded demo pair, CPU.

Two applications run side by side: `main` (4 slots, a deep queue) and `tiny` (1 slot, 1 queued:
for RESOURCE_EXHAUSTED). Greedy output equals the target's own greedy decoding in every mode,
unary equals the joined stream, a seeded sampled request repeats; every bad input gets its status
and a message naming the field, and the server keeps serving; 50 streams cancelled mid-way leave
no slot behind (the engine's and the actors' own counts); an actor killed mid-service gives
UNAVAILABLE until the replica has restarted its actors, then outputs are exact again."""
from __future__ import annotations

import concurrent.futures as cf
import threading

import grpc
import pytest
from conftest import target_greedy
from serving import Stub, free_port, joined, serve_apps, wait_for
from transformers import AutoTokenizer

from specray.assets import DEMO_TARGET
from specray.v1 import specray_pb2 as pb

ray = pytest.importorskip("ray")

PROMPTS = ["def fibonacci(n):", "class Stack:\n    def push(self, item):", "import os\n\n\ndef read_lines(path):"]
MODES = {"off": {}, "chain": {"num_speculative_tokens": 3}, "tree": {"branching": [2, 2, 1]},
         "async": {"num_speculative_tokens": 3, "backup": pb.BACKUP_NEURAL}}
N = 24
MAIN_ARGS = {"max_batch": 4, "max_waiting": 60, "max_context": 512, "max_tokens_limit": 256,
             "replica_cpus": 0.1, "draft_cpus": 0.5, "stage_cpus": 0.5, "min_replicas": 1, "max_replicas": 1}
TINY_ARGS = {**MAIN_ARGS, "max_batch": 1, "max_waiting": 1}
CALLS_ARGS = {**TINY_ARGS, "transport": "calls"}  # main and tiny take the default transport


@pytest.fixture(scope="module")
def ports():
    return {"grpc": free_port(), "http": free_port()}


@pytest.fixture(scope="module")
def server(ports):
    from specray.deployments.app import build_app
    apps = {"main": (build_app(MAIN_ARGS), "/"), "tiny": (build_app(TINY_ARGS), "/tiny"),
            "calls": (build_app(CALLS_ARGS), "/calls")}
    with serve_apps(apps, ports["grpc"], ports["http"]):
        yield


@pytest.fixture(scope="module")
def main(server, ports):
    return Stub(ports["grpc"], "main")


@pytest.fixture(scope="module")
def tiny(server, ports):
    return Stub(ports["grpc"], "tiny")


@pytest.fixture(scope="module")
def calls(server, ports):
    return Stub(ports["grpc"], "calls")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(DEMO_TARGET)


@pytest.fixture(scope="module")
def references(tok):
    return {p: target_greedy(tok.encode(p, add_special_tokens=False), N) for p in PROMPTS}


def request(prompt, mode=None, spec=None, **sampling) -> pb.GenerateRequest:
    sampling.setdefault("max_tokens", N)
    sampling.setdefault("ignore_eos", True)
    speculation = pb.SpeculationParams(**(spec or {}))
    if mode:
        speculation.mode = pb.SpeculationMode.Value(f"SPECULATION_MODE_{mode.upper()}")
    req = pb.GenerateRequest(request_id="r1", sampling=pb.SamplingParams(**sampling), speculation=speculation)
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.prompt_token_ids.ids.extend(prompt)
    return req


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_every_mode_unary_equals_stream_equals_target(main, references, tok, mode):
    for prompt, ref in references.items():
        req = request(prompt, mode, MODES[mode])
        unary = main.generate(req)
        text, ids, last = joined(main.stream(req))
        assert list(unary.token_ids) == ids == ref, (mode, prompt)
        assert unary.text == text == tok.decode(ref)
        assert unary.finish_reason == last.finish_reason == pb.FINISH_REASON_LENGTH
        assert unary.request_id == last.request_id == "r1"
        assert unary.usage.prompt_tokens == len(tok.encode(prompt, add_special_tokens=False))
        assert unary.usage.completion_tokens == N
        stats = unary.stats
        assert stats.num_steps >= 1 and stats == last.stats
        if mode == "off":
            assert stats.num_draft_tokens == 0 and stats.num_steps == N
        else:
            assert stats.num_draft_tokens > 0 and stats.mean_acceptance_length > 1
            assert sum(stats.accepted_per_position) == stats.num_accepted_tokens
        if mode == "async":
            assert stats.cache_lookups > 0


def test_token_id_prompt_and_streaming_deltas(main, references, tok):
    prompt = PROMPTS[0]
    parts = list(main.stream(request(tok.encode(prompt, add_special_tokens=False), "chain")))
    assert len(parts) > 1 and not any(p.finish_reason for p in parts[:-1])
    assert not any(p.HasField("usage") or p.HasField("stats") for p in parts[:-1])
    assert [t for p in parts for t in p.token_ids] == references[prompt]


@pytest.mark.parametrize("mode", ["chain", "async"])
def test_seeded_sampling_repeats_and_stream_equals_unary(main, mode):
    req = request(PROMPTS[1], mode, MODES[mode], temperature=0.9, top_p=0.95, seed=2**63 + 5)
    first, second = main.generate(req), main.generate(req)
    _, ids, _ = joined(main.stream(req))
    assert list(first.token_ids) == list(second.token_ids) == ids
    other = main.generate(request(PROMPTS[1], mode, MODES[mode], temperature=0.9, top_p=0.95, seed=6))
    assert list(other.token_ids) != ids


def test_server_info_reports_defaults_limits_and_totals(main):
    before = main.info()
    main.generate(request(PROMPTS[0], "chain"))
    info = main.info()
    assert info.target_model.endswith("target") and info.draft_model.endswith("draft")
    assert info.max_context == 512 and info.max_tokens_limit == 256
    assert info.default_speculation.mode == pb.SPECULATION_MODE_CHAIN
    assert info.default_speculation.num_speculative_tokens == 4
    assert info.totals.num_steps > before.totals.num_steps
    assert info.running_requests == info.waiting_requests == 0 and info.free_slots == 4


def test_unset_fields_take_the_server_defaults(main, references):
    req = pb.GenerateRequest(prompt=PROMPTS[0], sampling=pb.SamplingParams(ignore_eos=True))
    out = main.generate(req)
    assert list(out.token_ids)[:N] == references[PROMPTS[0]]
    assert len(out.token_ids) == 64  # the app's default_max_tokens
    assert out.stats.num_draft_tokens % 4 == 0  # the default: chain, K = 4
    assert out.request_id == ""


BAD = [
    ("empty prompt", request(""), "prompt"),
    ("no input", pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=4)), "input"),
    ("negative max_tokens", request("x = 1", max_tokens=-1), "sampling.max_tokens"),
    ("absurd max_tokens", request("x = 1", max_tokens=10**9), "sampling.max_tokens"),
    ("negative temperature", request("x = 1", temperature=-0.5), "sampling.temperature"),
    ("NaN temperature", request("x = 1", temperature=float("nan")), "sampling.temperature"),
    ("top_p above 1", request("x = 1", top_p=1.5), "sampling.top_p"),
    ("negative top_p", request("x = 1", top_p=-0.1), "sampling.top_p"),
    ("negative top_k", request("x = 1", top_k=-3), "sampling.top_k"),
    ("branching vs K", request("x = 1", "tree", {"num_speculative_tokens": 3, "branching": [2, 2]}),
     "speculation"),
    ("fan_out vs K", request("x = 1", "async", {"num_speculative_tokens": 3, "fan_out": [1, 1]}), "speculation"),
    ("saguaro_c 0", request("x = 1", "async", {"saguaro_c": 0.0}), "speculation"),
    ("unknown mode", request("x = 1", spec={"mode": 9}), "speculation.mode"),
    ("unknown token id", request([5, 8192]), "prompt_token_ids"),
    ("negative token id", request([5, -1]), "prompt_token_ids"),
    ("beyond the context", request(list(range(1, 400)), max_tokens=200), "sampling.max_tokens"),
    ("prompt alone beyond the context", request(list(range(1, 600))), "prompt"),
    ("oversized prompt", request("x" * (2 << 20)), "prompt"),
    ("empty stop string", request("x = 1", stop=[""]), "sampling.stop"),
]


@pytest.mark.parametrize("what, req, field", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_invalid_argument_naming_the_field(main, what, req, field):
    for call in (main.generate, lambda r: joined(main.stream(r))):
        with pytest.raises(grpc.RpcError) as err:
            call(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert err.value.details().startswith(field + ":"), err.value.details()


def test_unknown_fields_are_invalid_argument(main):
    payload = request("x = 1").SerializeToString() + bytes([0xF8, 0x06, 0x01])  # field 111, varint 1
    with pytest.raises(grpc.RpcError) as err:
        main.raw_generate(payload)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown field numbers [111]" in err.value.details()


def test_server_keeps_serving_after_errors(main, references):
    for _, req, _ in BAD[:3]:
        with pytest.raises(grpc.RpcError):
            main.generate(req)
    assert list(main.generate(request(PROMPTS[0], "tree", MODES["tree"])).token_ids) == references[PROMPTS[0]]


def test_full_queue_is_resource_exhausted(tiny):
    long = request(PROMPTS[0], "off", max_tokens=256)  # one token a round: holds the slot well past the polls
    streams = [tiny.stream(long) for _ in range(2)]  # one runs, one waits
    next(streams[0])
    wait_for(lambda: tiny.info().waiting_requests == 1, 30, "the second request to queue")
    with pytest.raises(grpc.RpcError) as err:
        tiny.generate(request(PROMPTS[1], max_tokens=4))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in err.value.details()
    for s in streams:
        s.cancel()
    wait_for(lambda: idle(tiny.info(), 1), 30, "slots freed")
    assert len(tiny.generate(request(PROMPTS[1], max_tokens=4)).token_ids) == 4


def idle(info: pb.ServerInfo, slots: int) -> bool:
    return info.running_requests == info.waiting_requests == 0 and info.free_slots == slots


def _actors(app: str) -> dict[str, object]:
    """{"draft": handle, "stage0": handle} of the app's replica, latest generation (named
    specray-{app}-{replica}-g{generation}-{role})."""
    named = [(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"specray-{app}-")]
    latest = max(int(name.rsplit("-", 2)[1][1:]) for name, _ in named)
    return {name.rsplit("-", 1)[1]: ray.get_actor(name, namespace=ns) for name, ns in named
            if name.rsplit("-", 2)[1] == f"g{latest}"}


def test_cancelling_50_streams_leaves_no_slot_behind(main):
    streams = [main.stream(request(PROMPTS[i % 3], list(MODES)[i % 4], MODES[list(MODES)[i % 4]], max_tokens=200))
               for i in range(50)]
    with cf.ThreadPoolExecutor(8) as pool:  # wait until every stream has been admitted or queued
        list(pool.map(lambda s: next(s) if s is streams[0] else None, streams))
    wait_for(lambda: main.info().running_requests == 4, 30, "a full batch")
    for s in streams:
        s.cancel()
    wait_for(lambda: idle(main.info(), 4), 30, "every slot free after cancellation")
    actors = _actors("main")
    assert sorted(actors) == ["draft", "stage0"]
    # the actors learn removals with the engine's next step, which it takes at once when it goes idle
    wait_for(lambda: [ray.get(a.num_free.remote()) for a in actors.values()] == [4, 4], 30, "the actors' slots")


@pytest.mark.parametrize("app", ["tiny", "calls"])
def test_actor_death_is_unavailable_then_the_replica_recovers(app, tiny, calls, references):
    stub = {"tiny": tiny, "calls": calls}[app]
    ray.kill(_actors(app)["draft"])
    codes = set()

    def attempt():
        try:
            out = stub.generate(request(PROMPTS[0], "chain"))
            return list(out.token_ids)
        except grpc.RpcError as e:
            codes.add(e.code())
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
            return None

    ids = wait_for(attempt, 120, "the replica to recover", every_s=0.5)
    assert ids == references[PROMPTS[0]]
    assert codes == {grpc.StatusCode.UNAVAILABLE}


def test_concurrent_streams_are_each_exact(main, references):
    results = {}

    def run(i):
        prompt, mode = PROMPTS[i % 3], list(MODES)[i % 4]
        _, ids, _ = joined(main.stream(request(prompt, mode, MODES[mode])))
        results[i] = ids == references[prompt]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results.values()) and len(results) == 12


def test_metrics_reach_rays_prometheus_endpoint(main):
    import urllib.request
    main.generate(request(PROMPTS[0], "async", MODES["async"]))
    port = ray._private.worker.global_worker.node.metrics_export_port
    names = ("specray_draft_tokens_total", "specray_accepted_tokens_total", "specray_accepted_per_position_total",
             "specray_verification_steps_total", "specray_cache_lookups_total", "specray_cache_hits_total",
             "specray_time_to_first_token_seconds", "specray_time_per_output_token_seconds",
             "specray_running_requests", "specray_waiting_requests")

    def scrape():
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        return all(f"ray_{n}" in text for n in names) and text

    text = wait_for(scrape, 60, "specray metrics on the Prometheus endpoint", every_s=2)
    assert 'mode="async"' in text
