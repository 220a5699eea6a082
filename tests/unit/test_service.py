"""The replica's service and gRPC ingress without Ray Serve: an in-process engine on the demo pair and a
fake gRPC context. Checks the status mapping, the queue limit, and the restart after an actor death;
the full contract through the real proxy is in tests/integration/test_serve_grpc.py."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from conftest import target_greedy
from ray.exceptions import ActorDiedError

from specray.assets import DEMO_DRAFT, DEMO_TARGET
from specray.core.loader import load_tokenizer
from specray.deployments import grpc_ingress
from specray.deployments.config import AppConfig
from specray.deployments.host import EngineHost
from specray.deployments.service import Models, Service
from specray.deployments.validation import Limits
from specray.engine import Engine, LocalWorkers
from specray.v1 import specray_pb2 as pb

PROMPT = "def fibonacci(n):"


class Context:
    """What Serve hands a gRPC method as grpc_context (the parts the ingress uses)."""

    def __init__(self):
        self.code, self.details = None, ""

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


class DyingWorkers(LocalWorkers):
    """Workers whose first round fails as if an actor had died."""
    died = False

    async def round(self, rids):
        if not DyingWorkers.died:
            DyingWorkers.died = True
            raise ActorDiedError()
        return await super().round(rids)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEMO_TARGET)


def make_service(tok, workers=LocalWorkers, **args) -> tuple[Service, list[int]]:
    """A service over in-process engines; returns it and the generations built."""
    config = AppConfig(**{"max_context": 256, "max_tokens_limit": 128, "max_batch": 2, **args})
    engine_config = config.engine_config(256)
    built = []

    def build(generation: int) -> Engine:
        built.append(generation)
        layers = engine_config.stage_layers(6)
        return Engine(workers(engine_config, layers), engine_config, tok, (tok.eos_token_id,), len(tok))

    limits = Limits(256, 128, 16, 1 << 20, 4, len(tok), config.default_speculation, config.tree_branching)
    return Service(EngineHost(build, config.max_waiting), tok, limits, Models(DEMO_TARGET, DEMO_DRAFT)), built


def request(**sampling) -> pb.GenerateRequest:
    sampling = {"max_tokens": 12, "ignore_eos": True, **sampling}
    return pb.GenerateRequest(request_id="a", prompt=PROMPT, sampling=pb.SamplingParams(**sampling))


async def collect(service, req):
    """(messages, context) of one GenerateStream call; a failed call raised RpcAbort after setting its status."""
    ctx, parts = Context(), []
    try:
        async for part in grpc_ingress.generate_stream(service, req, ctx):
            parts.append(part)
    except grpc_ingress.RpcAbort as e:
        assert str(e) == f"{ctx.code.name}: {ctx.details}"
    return parts, ctx


def test_greedy_stream_and_unary_equal_the_target(tok):
    service, _ = make_service(tok)
    ref = target_greedy(tok.encode(PROMPT, add_special_tokens=False), 12)
    parts, ctx = asyncio.run(collect(service, request()))
    unary = asyncio.run(grpc_ingress.generate(service, request(), Context()))
    assert ctx.code is None and [t for p in parts for t in p.token_ids] == list(unary.token_ids) == ref
    assert unary.text == tok.decode(ref) and unary.finish_reason == pb.FINISH_REASON_LENGTH
    assert unary.usage.completion_tokens == 12 and unary.stats.num_draft_tokens > 0
    info = grpc_ingress.server_info(service)
    assert info.totals.num_steps == 2 * unary.stats.num_steps and info.free_slots == 2


@pytest.mark.parametrize("req, code, field", [
    (request(temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    (request(max_tokens=129), grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens"),
    (pb.GenerateRequest(prompt=PROMPT, speculation=pb.SpeculationParams(mode=pb.SPECULATION_MODE_TREE,
                                                                        branching=[16, 15])),
     grpc.StatusCode.INVALID_ARGUMENT, "prompt"),  # a 256-node tree: one round's rows overflow the context
    # sizes refused before anything is read or built
    (pb.GenerateRequest(request_id="r" * 257, prompt=PROMPT), grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
    (pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[1] * 100_000)), grpc.StatusCode.INVALID_ARGUMENT,
     "prompt"),  # as any prompt beyond the context
    (pb.GenerateRequest(prompt=PROMPT, speculation=pb.SpeculationParams(mode=pb.SPECULATION_MODE_TREE,
                                                                        branching=[2] * 65)),
     grpc.StatusCode.INVALID_ARGUMENT, "speculation.branching"),
    (pb.GenerateRequest(prompt=PROMPT, speculation=pb.SpeculationParams(mode=pb.SPECULATION_MODE_TREE,
                                                                        branching=[2_147_483_647])),
     grpc.StatusCode.INVALID_ARGUMENT, "speculation"),
])
def test_errors_set_the_status_and_name_the_field(tok, req, code, field):
    service, _ = make_service(tok)
    parts, ctx = asyncio.run(collect(service, req))
    assert parts == [] and ctx.code == code and ctx.details.startswith(field + ":"), ctx.details


def test_full_replica_is_resource_exhausted(tok):
    service, _ = make_service(tok, max_batch=1, max_waiting=0)

    async def scenario():
        stream = grpc_ingress.generate_stream(service, request(max_tokens=64), Context())
        await anext(stream)
        _, ctx = await collect(service, request())
        await stream.aclose()
        return ctx

    ctx = asyncio.run(scenario())
    assert ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in ctx.details


def test_actor_death_is_unavailable_until_the_engine_is_rebuilt(tok):
    DyingWorkers.died = False
    service, built = make_service(tok, workers=DyingWorkers)

    async def scenario():
        _, died = await collect(service, request())
        _, loading = await collect(service, request())
        await service.host._rebuild
        parts, ctx = await collect(service, request())
        return died, loading, parts, ctx

    died, loading, parts, ctx = asyncio.run(scenario())
    assert died.code == loading.code == grpc.StatusCode.UNAVAILABLE
    assert "actor died" in died.details and "loading" in loading.details
    assert built == [0, 1] and ctx.code is None
    assert [t for p in parts for t in p.token_ids] == target_greedy(tok.encode(PROMPT, add_special_tokens=False), 12)
