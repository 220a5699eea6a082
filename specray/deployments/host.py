"""One replica's engine and its capacity: built when the replica starts, rebuilt after an actor dies.

`EngineHost.admit()` hands out the engine for one more request, or raises `Unavailable` (the
models are loading) or `QueueFull` (the running batch and the replica's queue are full). When a
request sees an engine actor die, `actor_died()` drops the engine, whose in-flight requests fail,
and rebuilds it in the background in the same placement group; meanwhile requests get
`Unavailable`. Knows nothing of protobuf or HTTP."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from specray.engine import Engine

log = logging.getLogger("ray.serve")


class Unavailable(RuntimeError):
    """The replica cannot serve now (models loading, or an actor died); retrying later may succeed."""


class QueueFull(RuntimeError):
    """The replica's running batch and queue are full."""


class EngineHost:
    def __init__(self, build: Callable[[int], Engine], max_waiting: int):
        """build(generation): starts a fresh engine (blocking); called now with 0, and with 1, 2, ...
        after an actor dies (actor names may embed it: a dead actor's name is not freed at once)."""
        self._build, self.max_waiting = build, max_waiting
        self._engine: Engine | None = build(0)
        self._loading_since: float | None = None
        self._failure: BaseException | None = None
        self._rebuild: asyncio.Task | None = None
        self.num_rebuilds = 0

    @property
    def engine(self) -> Engine | None:
        return self._engine

    def admit(self) -> Engine:
        """The engine, if it can take one more request."""
        engine = self._engine
        if engine is None:
            waited = time.monotonic() - self._loading_since
            raise Unavailable(f"the models are loading (an engine actor died {waited:.0f}s ago and the replica "
                              "is restarting its actors); retry shortly")
        capacity = engine.config.max_batch + self.max_waiting
        if engine.running + engine.waiting >= capacity:
            raise QueueFull(f"this replica's queue is full ({engine.running} running, {engine.waiting} waiting, "
                            f"capacity {capacity}); retry later or add replicas")
        return engine

    def actor_died(self, error: BaseException) -> None:
        """Drop the engine (its requests fail with EngineStopped) and start rebuilding it."""
        if self._engine is None:
            return
        log.warning("specray: an engine actor died (%s); restarting the replica's actors", error)
        old, self._engine, self._loading_since = self._engine, None, time.monotonic()
        self._rebuild = asyncio.get_running_loop().create_task(self._restart(old))

    async def _restart(self, old: Engine) -> None:
        await old.shutdown()
        try:
            self._engine = await asyncio.to_thread(self._build, self.num_rebuilds + 1)
            self.num_rebuilds += 1
        except Exception as e:  # noqa: BLE001 -- reported through check_health, which restarts the replica
            self._failure = e

    def check_health(self) -> None:
        """Raise when the replica cannot recover by itself (Serve then replaces it)."""
        if self._failure is not None:
            raise RuntimeError(f"rebuilding the engine failed: {self._failure!r}")

    async def shutdown(self) -> None:
        if self._rebuild is not None:
            await asyncio.gather(self._rebuild, return_exceptions=True)
        if self._engine is not None:
            await self._engine.shutdown()
