"""The OpenAI-style HTTP routes on top of `Service`: /v1/completions, /v1/chat/completions, /v1/models,
and vLLM's /tokenize and /detokenize.

Bodies are parsed here (not by FastAPI) so that errors keep OpenAI's shape: 400 for bad values
(naming the field), 429 when the replica's queue is full, 503 while it cannot serve. Fields the
server does not know are ignored, as vLLM does, and named in the `x-specray-ignored-fields`
response header and the log. A stream's first delta is awaited before the response starts, so
errors found on admission are still HTTP statuses; a failure after that ends the event stream with
an `error` event."""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from specray.deployments import openai_api as oa
from specray.deployments.host import QueueFull, Unavailable
from specray.deployments.service import Service
from specray.deployments.validation import InvalidArgument, RequestFields
from specray.engine import Delta

IGNORED_HEADER = "x-specray-ignored-fields"
logger = logging.getLogger(__name__)
STATUS = {InvalidArgument: (400, "invalid_request_error"), QueueFull: (429, "rate_limit_exceeded"),
          Unavailable: (503, "service_unavailable")}
ERRORS = tuple(STATUS)


def _error(e: Exception, chat: bool) -> JSONResponse:
    status, kind = STATUS[type(e)]
    param = oa.openai_param(e.field, chat) if isinstance(e, InvalidArgument) else None
    return JSONResponse(oa.error_body(str(e), kind, param, status), status_code=status)


async def completions(service: Service, model: str, body: bytes):
    return await _handle(service, model, body, oa.CompletionRequest, oa.completion_fields, chat=False)


async def chat_completions(service: Service, model: str, body: bytes):
    return await _handle(service, model, body, oa.ChatCompletionRequest,
                         lambda req: oa.chat_fields(req, service.tokenizer), chat=True)


async def _handle(service: Service, model: str, body: bytes, schema, to_fields, chat: bool):
    """Parse and check the body (400 naming the field), then answer it, streamed or whole."""
    try:
        req = schema.model_validate_json(body)
        fields = to_fields(req)
    except ValidationError as e:
        param, message = oa.describe_validation_error(e)
        return JSONResponse(oa.error_body(message, "invalid_request_error", param, 400), status_code=400)
    except InvalidArgument as e:
        return _error(e, chat)
    return _noting(await _respond(service, model, fields, req.stream, _usage_options(req), chat), oa.ignored_fields(req))


async def tokenize(service: Service, body: bytes):
    return _answer(body, oa.TokenizeRequest,
                   lambda req: oa.tokenize_response(req, service.tokenizer, service.limits.max_context))


async def detokenize(service: Service, body: bytes):
    return _answer(body, oa.DetokenizeRequest,
                   lambda req: oa.detokenize_response(req, service.tokenizer, service.limits.vocab_size))


def _answer(body: bytes, schema, respond):
    """A small request answered at once: its response, or 400 naming the field."""
    try:
        req = schema.model_validate_json(body)
        return _noting(respond(req), oa.ignored_fields(req))
    except ValidationError as e:
        param, message = oa.describe_validation_error(e)
        return JSONResponse(oa.error_body(message, "invalid_request_error", param, 400), status_code=400)
    except InvalidArgument as e:
        return _error(e, chat=False)


def _noting(response, ignored: list[str]):
    """The response, naming the body's fields the server ignored (unknown to it, as vLLM ignores them)
    in the IGNORED_HEADER header and the replica's log."""
    if not ignored:
        return response
    logger.warning("ignored request fields it does not know: %s", ", ".join(ignored))
    if isinstance(response, dict):
        response = JSONResponse(response)
    response.headers[IGNORED_HEADER] = ", ".join(ignored)[:2048]
    return response


def models(model: str) -> dict:
    return oa.models_response([model])


def _usage_options(req: oa.Common) -> tuple[bool, bool]:
    """(a last usage chunk, usage in every chunk): stream_options.include_usage, and with it
    continuous_usage_stats, as vLLM reads them."""
    options = req.stream_options or oa.StreamOptions()
    return options.include_usage, options.include_usage and options.continuous_usage_stats


async def _respond(service: Service, model: str, fields: RequestFields, stream: bool, usage: tuple[bool, bool],
                   chat: bool):
    rid, created = uuid.uuid4().hex, int(time.time())
    deltas = service.stream(fields)
    try:
        first = await anext(deltas)
    except ERRORS as e:
        return _error(e, chat)
    if stream:
        events = _events(service, model, fields, rid, created, first, deltas, usage, chat)
        return StreamingResponse(events, media_type="text/event-stream")
    text, count, done = first.text, len(first.token_ids), first
    try:
        async for delta in deltas:
            text, count, done = text + delta.text, count + len(delta.token_ids), delta
    except ERRORS as e:
        return _error(e, chat)
    finally:
        await deltas.aclose()
    usage = oa.usage_dict(service.prompt_tokens(fields), count)
    reason, stats = oa.openai_finish_reason(done.finish_reason), done.stats
    build = oa.chat_response if chat else oa.completion_response
    return build(rid, model, text, reason, usage, stats, created=created)


async def _events(service: Service, model: str, fields: RequestFields, rid: str, created: int, first: Delta,
                  deltas: AsyncIterator[Delta], usage: tuple[bool, bool], chat: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per committed block; the last has the finish reason and stats.
    usage: (a last usage chunk, the usage so far in every chunk)."""
    last_usage, every_chunk = usage
    prompt_tokens = service.prompt_tokens(fields) if last_usage else 0  # the prompt is encoded again: only if asked
    count, delta, is_first = 0, first, True
    try:
        while True:
            count += len(delta.token_ids)
            reason = oa.openai_finish_reason(delta.finish_reason)
            if chat:
                chunk = oa.chat_chunk(rid, model, delta.text, reason, delta.stats, first=is_first, created=created)
            else:
                chunk = oa.completion_chunk(rid, model, delta.text, reason, delta.stats, created=created)
            if every_chunk:
                chunk["usage"] = oa.usage_dict(prompt_tokens, count)
            yield oa.sse(chunk)
            if delta.finish_reason:
                break
            delta, is_first = await anext(deltas), False
    except ERRORS as e:
        yield oa.sse(oa.error_body(str(e), STATUS[type(e)][1], None, STATUS[type(e)][0]))
        return
    finally:
        await deltas.aclose()  # frees the request's slot at once if the client went away
    if last_usage:
        yield oa.sse(oa.usage_chunk(rid, model, oa.usage_dict(prompt_tokens, count), chat=chat, created=created))
    yield oa.SSE_DONE
