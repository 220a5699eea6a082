"""What a client asked for -> an `EngineRequest`, or `InvalidArgument` naming the offending field.

Both ingresses (gRPC and OpenAI-style HTTP) first copy their message into `RequestFields`, whose
names are the gRPC contract's field paths, then call `to_engine_request`. Unset or zero fields take
the server's defaults. Knows nothing of protobuf, HTTP or Ray."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from specray.core.sampling import SamplingParams
from specray.core.speculation import SpeculationConfig
from specray.engine import EngineRequest

MAX_STOP_CHARS = 256
MAX_REQUEST_ID_CHARS = 256  # echoed in every stream message
MAX_LIST = 64  # branching and fan_out (K <= 32 anyway): longer lists are refused before they are read


class InvalidArgument(ValueError):
    """A bad request field; `field` is its path in the gRPC contract (e.g. "sampling.max_tokens")."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Limits:
    """What one request may ask of this server (GetServerInfo reports them)."""
    max_context: int
    max_tokens_limit: int
    default_max_tokens: int
    max_prompt_bytes: int
    max_stop_strings: int
    vocab_size: int
    default_speculation: SpeculationConfig
    tree_branching: tuple[int, ...]


@dataclass
class RequestFields:
    """A request as sent, before defaults and checks. Zero / None / empty means "server default"."""
    request_id: str = ""
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    mode: str | None = None
    num_speculative_tokens: int = 0
    branching: list[int] = field(default_factory=list)
    with_replacement: bool = False
    fan_out: list[int] = field(default_factory=list)
    saguaro_c: float | None = None
    backup: str | None = None


def prompt_ids(f: RequestFields, limits: Limits, tokenizer) -> list[int]:
    """The prompt's token ids: exactly one of prompt / prompt_token_ids, non-empty, in the vocabulary."""
    if (f.prompt is None) == (f.prompt_token_ids is None):
        raise InvalidArgument("input", "give exactly one of prompt and prompt_token_ids")
    if f.prompt is not None:
        size = len(f.prompt.encode("utf-8", "surrogatepass"))
        if size > limits.max_prompt_bytes:
            raise InvalidArgument("prompt", f"{size} bytes exceeds the limit of {limits.max_prompt_bytes}")
        ids = tokenizer.encode(f.prompt, add_special_tokens=False) if f.prompt else []
        if not ids:
            raise InvalidArgument("prompt", "must not be empty")
        return ids
    if len(f.prompt_token_ids) > limits.max_context:  # refused before the ids are read
        raise InvalidArgument("prompt", f"{len(f.prompt_token_ids)} tokens exceed max_context ({limits.max_context})")
    ids = list(f.prompt_token_ids)
    if not ids:
        raise InvalidArgument("prompt_token_ids", "must not be empty")
    bad = [t for t in ids if not 0 <= t < limits.vocab_size]
    if bad:
        raise InvalidArgument("prompt_token_ids", f"ids {bad[:5]} are outside the vocabulary "
                                                  f"[0, {limits.vocab_size})")
    return ids


def sampling_params(f: RequestFields) -> SamplingParams:
    t = f.temperature
    if not (math.isfinite(t) and t >= 0):
        raise InvalidArgument("sampling.temperature", f"must be a finite number >= 0 (0 = greedy), got {t}")
    if not (math.isfinite(f.top_p) and 0 <= f.top_p <= 1):
        raise InvalidArgument("sampling.top_p", f"must be in [0, 1] (0 or 1 = off), got {f.top_p}")
    if f.top_k < 0:
        raise InvalidArgument("sampling.top_k", f"must be >= 0 (0 = off), got {f.top_k}")
    if f.seed is not None and not 0 <= f.seed < 2**64:
        raise InvalidArgument("sampling.seed", f"must be in [0, 2^64), got {f.seed}")
    return SamplingParams(float(t), int(f.top_k), float(f.top_p) or 1.0, f.seed)


def speculation(f: RequestFields, limits: Limits) -> SpeculationConfig:
    """The request's speculation: each unset field takes the server default's value."""
    for name in ("branching", "fan_out"):
        if len(getattr(f, name)) > MAX_LIST:
            raise InvalidArgument(f"speculation.{name}", f"{len(getattr(f, name))} values; at most {MAX_LIST}")
    base = limits.default_speculation
    mode = f.mode or base.mode
    branching = tuple(f.branching) or (base.branching or limits.tree_branching if mode == "tree" else ())
    k = f.num_speculative_tokens or (len(branching) if mode == "tree" else base.num_speculative_tokens)
    try:
        return replace(base, mode=mode, num_speculative_tokens=k, branching=branching,
                       with_replacement=f.with_replacement or base.with_replacement,
                       fan_out=tuple(f.fan_out) or (base.fan_out if k == base.num_speculative_tokens else ()),
                       saguaro_c=base.saguaro_c if f.saguaro_c is None else f.saguaro_c,
                       backup=f.backup or base.backup)
    except ValueError as e:
        raise InvalidArgument("speculation", str(e)) from None


def stop_strings(f: RequestFields, limits: Limits) -> tuple[str, ...]:
    if len(f.stop) > limits.max_stop_strings:
        raise InvalidArgument("sampling.stop", f"{len(f.stop)} strings; at most {limits.max_stop_strings}")
    for s in f.stop:
        if not s or len(s) > MAX_STOP_CHARS:
            raise InvalidArgument("sampling.stop", f"each stop string needs 1 to {MAX_STOP_CHARS} characters, "
                                                   f"got {s!r:.40}")
    return tuple(f.stop)


def to_engine_request(f: RequestFields, limits: Limits, tokenizer, rid: str) -> EngineRequest:
    """The engine request for `f` (rid: the id the engine runs it under), or InvalidArgument."""
    if len(f.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument("request_id", f"{len(f.request_id)} characters; at most {MAX_REQUEST_ID_CHARS}")
    ids = prompt_ids(f, limits, tokenizer)
    params = sampling_params(f)
    spec = speculation(f, limits)
    if f.max_tokens < 0 or f.max_tokens > limits.max_tokens_limit:
        raise InvalidArgument("sampling.max_tokens", f"must be in [1, {limits.max_tokens_limit}] "
                                                     f"(0 = default {limits.default_max_tokens}), got {f.max_tokens}")
    max_tokens = f.max_tokens or limits.default_max_tokens
    need = len(ids) + max_tokens + spec.draft_rows
    if need > limits.max_context:
        field_name = "sampling.max_tokens" if len(ids) + spec.draft_rows < limits.max_context else "prompt"
        raise InvalidArgument(field_name, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) + one round's "
                                          f"speculation ({spec.draft_rows} rows) = {need} exceeds max_context "
                                          f"({limits.max_context})")
    return EngineRequest(rid, tuple(ids), params, spec, max_tokens, stop_strings(f, limits), f.ignore_eos)
