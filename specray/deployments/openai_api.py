"""OpenAI-style JSON <-> specray: request bodies in as `RequestFields`, engine output out as OpenAI objects.

In: `CompletionRequest` / `ChatCompletionRequest` (pydantic; unknown fields ignored and listed by
`ignored_fields`, as vLLM does, except inside specray's own `speculation`), turned into
`RequestFields` by `completion_fields` / `chat_fields`; `to_engine_request` then applies the server's
defaults and limits. Out: plain dicts in OpenAI's shapes (`completion_response`, `chat_chunk`, ...),
each carrying the request's speculation statistics under a top-level "speculation" key when given,
and `sse` to frame them as server-sent events.

Differences from OpenAI: an omitted (or null) sampling field takes the *server's* default, so an
omitted temperature means greedy (0), not 1. Extensions: `top_k`, `ignore_eos`, and `speculation`
(sent with the OpenAI client's `extra_body`). Not supported yet (400): n > 1, echo, logprobs, penalties,
logit_bias and min_tokens other than their neutral values (NOT_YET), several prompts
in one request. Knows nothing of Ray, Serve, HTTP frameworks or protobuf."""
from __future__ import annotations

import json
import time
from typing import Annotated, Literal

from jinja2 import TemplateError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from specray.core.sequence import SpecStats
from specray.core.speculation import BACKUPS, MODES
from specray.deployments.validation import InvalidArgument, RequestFields

# Used when the tokenizer has none: ChatML, "<|im_start|>{role}\n{content}<|im_end|>\n" per message,
# then "<|im_start|>assistant\n" for the reply.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SSE_DONE = "data: [DONE]\n\n"
FINISH_REASONS = {"length": "length", "stop": "stop", "eos": "stop"}  # engine's -> OpenAI's


def _as_list(value):
    """`stop` may be one string, a list of strings, or null."""
    return [] if value is None else [value] if isinstance(value, str) else value


class ClosedModel(BaseModel):
    """Part of a body that rejects unknown fields: specray's own `speculation`, where a misspelt
    setting is a mistake no other client makes."""
    model_config = ConfigDict(extra="forbid")


class OpenModel(BaseModel):
    """A body (or part of one) that ignores fields it does not know, as vLLM's server does, so clients
    written for OpenAI or vLLM work; `ignored_fields` lists them for the reply and the log."""
    model_config = ConfigDict(extra="allow")


def ignored_fields(body: BaseModel, prefix: str = "") -> list[str]:
    """The paths of every field of `body` (nested parts included) that was given and is not known."""
    out = [prefix + name for name in body.model_extra or {}]
    for name in type(body).model_fields:
        value = getattr(body, name)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, OpenModel):
                out += ignored_fields(item, f"{prefix}{name}{f'[{i}]' if isinstance(value, list) else ''}.")
    return out


class Speculation(ClosedModel):
    """The request's speculation; each unset (0 / null / empty) field takes the server default."""
    mode: Literal[MODES] | None = None
    num_speculative_tokens: int = Field(0, ge=0)
    branching: list[int] = []
    with_replacement: bool = False
    fan_out: list[int] = []
    saguaro_c: float | None = None
    backup: Literal[BACKUPS] | None = None


class StreamOptions(OpenModel):
    include_usage: bool = False  # a last chunk with the whole usage
    continuous_usage_stats: bool = False  # with include_usage: every chunk carries the usage so far (vLLM's)


class Common(OpenModel):
    """The fields completions and chat completions share."""
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: Annotated[list[str], BeforeValidator(_as_list)] = []
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    ignore_eos: bool = False
    # known, honoured only at their neutral value for now (NOT_YET): anything else is a 400, not a silent no-op
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted and ignored
    speculation: Speculation | None = None


class CompletionRequest(Common):
    prompt: str | list[int]
    echo: bool = False
    logprobs: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(t, int) for t in value)):
            return value
        if isinstance(value, list) and all(isinstance(t, str) for t in value):
            raise ValueError("one prompt per request: give a string or a list of token ids, not a list of strings")
        raise ValueError("must be a string or a list of token ids")


class ChatMessage(OpenModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None


NOT_YET = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "min_tokens": 0,
           "logit_bias": {}, "top_logprobs": 0}  # field -> the one value honoured now


def _common_fields(body: Common) -> dict:
    """RequestFields' keyword arguments for the shared fields (null -> the server default)."""
    if body.n != 1:
        raise InvalidArgument("n", f"only n=1 is supported, got {body.n}")
    if body.stream_options is not None and not body.stream:
        raise InvalidArgument("stream_options", "only allowed when stream is true")
    for name, neutral in NOT_YET.items():
        value = getattr(body, name, None)
        if value is not None and value != neutral:
            raise InvalidArgument(name, f"{name}={value!r} is not supported yet (leave it out or send {neutral!r})")
    return dict(temperature=body.temperature or 0.0, top_p=body.top_p or 0.0, top_k=body.top_k or 0,
                seed=body.seed, stop=list(body.stop), ignore_eos=body.ignore_eos,
                **(body.speculation or Speculation()).model_dump())


def completion_fields(body: CompletionRequest) -> RequestFields:
    """The request behind a /v1/completions body, or InvalidArgument naming an unsupported field."""
    if body.echo:
        raise InvalidArgument("echo", "echo is not supported")
    if body.logprobs is not None:
        raise InvalidArgument("logprobs", "logprobs are not supported")
    text, ids = (body.prompt, None) if isinstance(body.prompt, str) else (None, list(body.prompt))
    return RequestFields(prompt=text, prompt_token_ids=ids, max_tokens=body.max_tokens or 0,
                         **_common_fields(body))


def chat_prompt(messages: list[ChatMessage], tokenizer) -> str:
    """The messages rendered by the tokenizer's chat template (DEFAULT_CHAT_TEMPLATE if it has none),
    ending with the assistant's turn; a template's complaint becomes InvalidArgument("messages")."""
    template = None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
    try:
        return tokenizer.apply_chat_template([m.model_dump() for m in messages], chat_template=template,
                                             tokenize=False, add_generation_prompt=True)
    except TemplateError as e:
        raise InvalidArgument("messages", f"the chat template refused them: {e}") from None


def chat_fields(body: ChatCompletionRequest, tokenizer) -> RequestFields:
    """The request behind a /v1/chat/completions body, or InvalidArgument naming the offending field."""
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise InvalidArgument("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
    if body.logprobs:
        raise InvalidArgument("logprobs", "logprobs are not supported yet")
    common = _common_fields(body)
    return RequestFields(prompt=chat_prompt(body.messages, tokenizer),
                         max_tokens=body.max_completion_tokens or body.max_tokens or 0, **common)


def openai_param(field: str, chat: bool = False) -> str:
    """The body's name for a field `to_engine_request` complains about ("sampling.top_p" -> "top_p")."""
    name = field.removeprefix("sampling.")
    if name in ("input", "prompt", "prompt_token_ids"):
        return "messages" if chat else "prompt"
    return name


def _path(loc: tuple) -> str:
    """A pydantic error location as a field path: ("messages", 1, "role") -> "messages[1].role"."""
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    return path or "body"


def describe_validation_error(exc: ValidationError) -> tuple[str, str]:
    """(the first offending field's path, one message naming every offending field)."""
    errors = exc.errors(include_url=False)
    parts = []
    for e in errors:
        path = _path(e["loc"])
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown field '{path}'")
        else:
            reason = str(e["ctx"]["error"]) if e["type"] == "value_error" else e["msg"]
            parts.append(f"{path}: {reason}")
    return _path(errors[0]["loc"]), "; ".join(parts)


def openai_finish_reason(reason: str | None) -> str | None:
    """The engine's finish reason ("eos" | "length" | "stop" | None) in OpenAI's words."""
    return None if reason is None else FINISH_REASONS[reason]


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _envelope(id_prefix: str, obj: str, request_id: str, model: str, choices: list[dict],
              created: int | None, usage: dict | None = None, stats: SpecStats | None = None) -> dict:
    """The fields every response and chunk shares; usage and speculation only when given."""
    body = {"id": f"{id_prefix}-{request_id}", "object": obj,
            "created": int(time.time()) if created is None else created, "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    if stats is not None:
        body["speculation"] = stats.to_dict()
    return body


def _text_choice(text: str, finish_reason: str | None) -> dict:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": openai_finish_reason(finish_reason)}


def completion_response(request_id: str, model: str, text: str, finish_reason: str, usage: dict,
                        stats: SpecStats | None, *, created: int | None = None) -> dict:
    """A whole /v1/completions answer (created: seconds since the epoch, default now)."""
    return _envelope("cmpl", "text_completion", request_id, model, [_text_choice(text, finish_reason)],
                     created, usage, stats)


def completion_chunk(request_id: str, model: str, text: str, finish_reason: str | None = None,
                     stats: SpecStats | None = None, *, created: int | None = None) -> dict:
    """One streamed /v1/completions piece: a text delta; the last one has the finish reason (and stats)."""
    return _envelope("cmpl", "text_completion", request_id, model, [_text_choice(text, finish_reason)],
                     created, stats=stats)


def chat_response(request_id: str, model: str, content: str, finish_reason: str, usage: dict,
                  stats: SpecStats | None, *, created: int | None = None) -> dict:
    """A whole /v1/chat/completions answer."""
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
              "finish_reason": openai_finish_reason(finish_reason)}
    return _envelope("chatcmpl", "chat.completion", request_id, model, [choice], created, usage, stats)


def chat_chunk(request_id: str, model: str, content: str, finish_reason: str | None = None,
               stats: SpecStats | None = None, *, first: bool = False, created: int | None = None) -> dict:
    """One streamed chat piece. The first one's delta names the role; an empty content is left out of
    the delta, so the last chunk is `delta: {}` with the finish reason (and stats)."""
    delta = {"role": "assistant"} if first else {}
    if content or first:
        delta["content"] = content
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": openai_finish_reason(finish_reason)}
    return _envelope("chatcmpl", "chat.completion.chunk", request_id, model, [choice], created, stats=stats)


def usage_chunk(request_id: str, model: str, usage: dict, *, chat: bool, created: int | None = None) -> dict:
    """The extra last chunk that stream_options.include_usage asks for: no choices, the whole usage."""
    prefix, obj = ("chatcmpl", "chat.completion.chunk") if chat else ("cmpl", "text_completion")
    return _envelope(prefix, obj, request_id, model, [], created, usage)


def sse(obj: dict) -> str:
    """One server-sent event carrying `obj` as JSON; end a stream with SSE_DONE."""
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    """OpenAI's error object, e.g. error_body("n: only n=1 ...", "invalid_request_error", "n")."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def models_response(model_ids: list[str]) -> dict:
    """The answer to GET /v1/models."""
    now = int(time.time())
    return {"object": "list",
            "data": [{"id": m, "object": "model", "created": now, "owned_by": "specray"} for m in model_ids]}


class TokenizeRequest(OpenModel):
    """POST /tokenize (vLLM's): a prompt, or chat messages rendered by the chat template."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = False  # what this server feeds the model for a completions prompt

    @field_validator("messages")
    @classmethod
    def _some(cls, value):
        if value is not None and not value:
            raise ValueError("give at least one message")
        return value


class DetokenizeRequest(OpenModel):
    """POST /detokenize (vLLM's)."""
    model: str | None = None
    tokens: list[int]


def tokenize_response(body: TokenizeRequest, tokenizer, max_model_len: int) -> dict:
    """vLLM's answer to /tokenize: the ids the server would feed the model, their count, the context."""
    if (body.prompt is None) == (body.messages is None):
        raise InvalidArgument("prompt", "give exactly one of prompt and messages")
    text = body.prompt if body.messages is None else chat_prompt(body.messages, tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=body.add_special_tokens)
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids}


def detokenize_response(body: DetokenizeRequest, tokenizer, vocab_size: int) -> dict:
    bad = [t for t in body.tokens if not 0 <= t < vocab_size]
    if bad:
        raise InvalidArgument("tokens", f"token ids {bad[:8]} are outside the vocabulary [0, {vocab_size})")
    return {"prompt": tokenizer.decode(body.tokens)}
