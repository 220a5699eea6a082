"""The gRPC system: the Serve app started in this process, and a threaded load generator against it.

`serving(app, ...)` deploys the app with `specray.deployments.run.running` on free ports and yields
the gRPC address. `load(client, requests, concurrency)` streams every request from a pool of
`concurrency` client threads sharing one channel (a closed loop, as vLLM's --max-concurrency): each
message that carries tokens is a chunk, stamped on arrival; the last one's statistics are merged.
A failed call is recorded as the trace's error (its status code), not raised."""
from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc

from specray.bench.metrics import Measurement, Trace
from specray.client import Client
from specray.core.sequence import SpecStats
from specray.core.speculation import SpeculationConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app, **ray_init):
    """app (an AppConfig) served in this process until the block exits; yields "127.0.0.1:PORT"."""
    from specray.deployments.run import running
    grpc_port = free_port()
    with running(app, grpc_port=grpc_port, http_port=free_port(), **ray_init):
        yield f"127.0.0.1:{grpc_port}"


def request_fields(spec: SpeculationConfig, max_tokens: int, temperature: float, seed: int) -> dict:
    """Client.stream keyword arguments for one request: its speculation settings in full, exactly
    max_tokens long (EOS ignored), seeded when sampled."""
    return {**dataclasses.asdict(spec), "max_tokens": max_tokens, "temperature": temperature,
            "seed": seed if temperature else None, "ignore_eos": True}


def _stats(msg) -> SpecStats:
    """The final message's SpeculationStats as SpecStats."""
    s = msg.stats
    return SpecStats(s.num_steps, s.num_draft_tokens, s.num_accepted_tokens, list(s.accepted_per_position),
                     s.cache_lookups, s.cache_hits)


def load(client: Client, requests: list[tuple[list[int], dict]], concurrency: int,
         on_done: Callable[[], None] | None = None) -> Measurement:
    """Stream (prompt ids, fields) requests with `concurrency` threads; traces in request order."""
    traces = [Trace(0.0) for _ in requests]
    stats, lock = SpecStats(), threading.Lock()

    def one(i: int) -> None:
        prompt, fields = requests[i]
        trace = traces[i] = Trace(time.perf_counter())
        try:
            for msg in client.stream(prompt, request_id=f"bench-{i}", **fields):
                trace.add(time.perf_counter(), list(msg.token_ids))
                if msg.finish_reason:
                    with lock:
                        stats.merge(_stats(msg))
        except grpc.RpcError as e:
            trace.error = e.code().name
        if on_done is not None:
            on_done()

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(len(requests))))
    return Measurement(traces, time.perf_counter() - start, stats)
