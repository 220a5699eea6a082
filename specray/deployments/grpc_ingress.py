"""The gRPC contract (proto/specray/v1/specray.proto) on top of `Service`.

Protobuf types live here and in server.py only: requests become `RequestFields`, deltas become
`GenerateResponse`s. Errors become statuses with a message naming the field: INVALID_ARGUMENT
(bad values, unknown fields), RESOURCE_EXHAUSTED (queue full), UNAVAILABLE (loading, actor died).
Serve sends a status set on the context only when the method then raises, so a failed call sets
it and raises `RpcAbort`. A cancelled call stops its generator, which frees the request's slot at
the engine's next step."""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from google.protobuf import unknown_fields

from specray.core.sequence import SpecStats
from specray.core.speculation import SpeculationConfig
from specray.deployments.host import QueueFull, Unavailable
from specray.deployments.service import Service
from specray.deployments.validation import InvalidArgument, RequestFields
from specray.engine import Delta
from specray.v1 import specray_pb2 as pb

log = logging.getLogger("ray.serve")


class RpcAbort(Exception):
    """Ends a call whose status and details are already set on its gRPC context."""

MODES = {pb.SPECULATION_MODE_OFF: "off", pb.SPECULATION_MODE_CHAIN: "chain", pb.SPECULATION_MODE_TREE: "tree",
         pb.SPECULATION_MODE_ASYNC: "async"}
BACKUPS = {pb.BACKUP_NEURAL: "neural", pb.BACKUP_FAST: "fast", pb.BACKUP_AUTO: "auto"}
MODE_IDS = {name: value for value, name in MODES.items()}
BACKUP_IDS = {name: value for value, name in BACKUPS.items()}
FINISH = {"length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP, "eos": pb.FINISH_REASON_EOS}
STATUS = {InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT, QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
          Unavailable: grpc.StatusCode.UNAVAILABLE}


def _check_known(message, path: str) -> None:
    """INVALID_ARGUMENT for fields this server does not know (a newer client's, or garbage)."""
    numbers = [f.field_number for f in unknown_fields.UnknownFieldSet(message)]
    if numbers:
        raise InvalidArgument(path or "request", f"unknown field numbers {numbers}")


def _enum(value: int, names: dict, path: str) -> str | None:
    if value == 0:
        return None
    if value not in names:
        raise InvalidArgument(path, f"unknown value {value}")
    return names[value]


def request_fields(req: pb.GenerateRequest) -> RequestFields:
    """The request as RequestFields (no defaults applied yet)."""
    for message, path in ((req, ""), (req.sampling, "sampling"), (req.speculation, "speculation"),
                          (req.prompt_token_ids, "prompt_token_ids")):
        _check_known(message, path)
    s, p = req.sampling, req.speculation
    which = req.WhichOneof("input")
    return RequestFields(
        request_id=req.request_id,
        prompt=req.prompt if which == "prompt" else None,
        prompt_token_ids=list(req.prompt_token_ids.ids) if which == "prompt_token_ids" else None,
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None, max_tokens=s.max_tokens, stop=list(s.stop),
        ignore_eos=s.ignore_eos,
        mode=_enum(p.mode, MODES, "speculation.mode"), num_speculative_tokens=p.num_speculative_tokens,
        branching=list(p.branching), with_replacement=p.with_replacement, fan_out=list(p.fan_out),
        saguaro_c=p.saguaro_c if p.HasField("saguaro_c") else None,
        backup=_enum(p.backup, BACKUPS, "speculation.backup"))


def stats_message(stats: SpecStats) -> pb.SpeculationStats:
    return pb.SpeculationStats(
        num_steps=stats.num_steps, num_draft_tokens=stats.num_draft_tokens,
        num_accepted_tokens=stats.num_accepted_tokens, accepted_per_position=stats.accepted_per_position,
        cache_lookups=stats.cache_lookups, cache_hits=stats.cache_hits,
        mean_acceptance_length=stats.mean_acceptance_length)


def speculation_message(spec: SpeculationConfig) -> pb.SpeculationParams:
    return pb.SpeculationParams(
        mode=MODE_IDS[spec.mode], num_speculative_tokens=spec.num_speculative_tokens,
        branching=spec.branching, with_replacement=spec.with_replacement, fan_out=spec.fan_out,
        saguaro_c=spec.saguaro_c, backup=BACKUP_IDS[spec.backup])


def response(request_id: str, delta: Delta, prompt_tokens: int, completion_tokens: int) -> pb.GenerateResponse:
    """One message: the delta's text and ids; the last one also finish reason, usage and stats."""
    out = pb.GenerateResponse(request_id=request_id, text=delta.text, token_ids=delta.token_ids)
    if delta.finish_reason:
        out.finish_reason = FINISH[delta.finish_reason]
        out.usage.CopyFrom(pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens))
        out.stats.CopyFrom(stats_message(delta.stats))
    return out


async def generate_stream(service: Service, req: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
    """GenerateStream: one message per committed block; an error ends the stream with its status."""
    try:
        fields = request_fields(req)
        request_id = fields.request_id
        done = 0
        async for delta in service.stream(fields):
            done += len(delta.token_ids)
            prompt_tokens = service.prompt_tokens(fields) if delta.finish_reason else 0
            yield response(request_id, delta, prompt_tokens, done)
    except tuple(STATUS) as e:
        _fail(service, context, STATUS[type(e)], str(e))
    except Exception as e:
        log.exception("specray: request failed")
        _fail(service, context, grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")


async def generate(service: Service, req: pb.GenerateRequest, context) -> pb.GenerateResponse:
    """Generate: the whole completion in one message (the stream's messages joined)."""
    out = pb.GenerateResponse()
    async for part in generate_stream(service, req, context):
        out.request_id = part.request_id
        out.text += part.text
        out.token_ids.extend(part.token_ids)
        if part.finish_reason:
            out.finish_reason = part.finish_reason
            out.usage.CopyFrom(part.usage)
            out.stats.CopyFrom(part.stats)
    return out


def server_info(service: Service) -> pb.ServerInfo:
    load, limits = service.load(), service.limits
    return pb.ServerInfo(
        target_model=service.models.target, draft_model=service.models.draft, max_context=limits.max_context,
        max_tokens_limit=limits.max_tokens_limit, default_speculation=speculation_message(limits.default_speculation),
        totals=stats_message(load.totals), running_requests=load.running, waiting_requests=load.waiting,
        free_slots=load.free_slots)


def _fail(service: Service, context, code: grpc.StatusCode, message: str):
    context.set_code(code)
    context.set_details(message)
    if service.metrics:
        service.metrics.failed(code.name)
    raise RpcAbort(f"{code.name}: {message}")
