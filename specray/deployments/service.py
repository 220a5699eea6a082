"""The replica's service, below both ingresses: checked requests in, engine deltas out, metrics kept.

`Service.stream(fields)` validates a request (`InvalidArgument`), takes a place in the replica
(`QueueFull`, `Unavailable`), runs it on the engine and yields its `Delta`s; an actor death becomes
`Unavailable` and starts the engine's rebuild. Each request runs under a fresh engine id, so
clients may reuse request ids freely. Knows nothing of protobuf or HTTP."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ray.exceptions import RayActorError

from specray.core.sequence import SpecStats
from specray.deployments.host import EngineHost, Unavailable
from specray.deployments.metrics import ServeMetrics
from specray.deployments.validation import InvalidArgument, Limits, RequestFields, to_engine_request
from specray.engine import Delta, EngineStopped


@dataclass(frozen=True)
class Models:
    target: str
    draft: str


@dataclass
class Load:
    running: int
    waiting: int
    free_slots: int
    totals: SpecStats


class Service:
    def __init__(self, host: EngineHost, tokenizer, limits: Limits, models: Models,
                 metrics: ServeMetrics | None = None):
        self.host, self.tokenizer, self.limits, self.models = host, tokenizer, limits, models
        self.metrics = metrics

    def prompt_tokens(self, fields: RequestFields) -> int:
        """How many tokens the request's prompt has (after validation it is non-empty)."""
        if fields.prompt_token_ids is not None:
            return len(fields.prompt_token_ids)
        return len(self.tokenizer.encode(fields.prompt, add_special_tokens=False))

    async def stream(self, fields: RequestFields) -> AsyncIterator[Delta]:
        """The request's deltas; raises InvalidArgument, QueueFull or Unavailable."""
        req = to_engine_request(fields, self.limits, self.tokenizer, uuid.uuid4().hex)
        engine = self.host.admit()
        start, first, count = time.perf_counter(), None, 0
        try:
            async for delta in engine.generate(req):
                now = time.perf_counter()
                if first is None and delta.token_ids:
                    first = now
                    if self.metrics:
                        self.metrics.first_token(req.spec.mode, now - start)
                count += len(delta.token_ids)
                if delta.finish_reason and self.metrics:
                    self.metrics.finished(req.spec.mode, delta.finish_reason, delta.stats, count, now - (first or now))
                yield delta
        except ValueError as e:  # the engine's own checks (e.g. branching wider than the draft law)
            raise InvalidArgument("speculation", str(e)) from None
        except RayActorError as e:
            self.host.actor_died(e)
            raise Unavailable(f"an engine actor died ({type(e).__name__}); the replica is restarting its "
                              "actors, retry shortly") from e
        except EngineStopped as e:
            raise Unavailable("the engine restarted while this request ran; retry") from e
        finally:
            if self.metrics:
                load = self.load()
                self.metrics.load(load.running, load.waiting)

    def load(self) -> Load:
        engine = self.host.engine
        if engine is None:
            return Load(0, 0, 0, SpecStats())
        return Load(engine.running, engine.waiting, engine.free_slots, engine.totals)
