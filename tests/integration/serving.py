"""Helpers for the serving tests: a local Ray + Serve with the app, real gRPC clients."""
from __future__ import annotations

import os
import random
import socket
import time
from contextlib import contextmanager

import grpc

from specray.v1 import specray_pb2 as pb
from specray.v1 import specray_pb2_grpc as pb_grpc


def free_port() -> int:
    """A free port outside the kernel's ephemeral range (where Ray's own servers pick theirs at
    random) and Ray's worker range (10002-19999), so the proxies do not race Ray for it."""
    while True:
        port = random.randrange(20000, 30000)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port


@contextmanager
def serve_apps(apps: dict, grpc_port: int, http_port: int, num_cpus: int = 4):
    """Ray (num_cpus logical CPUs) + Serve with gRPC and HTTP, running {name: (application, route_prefix)}."""
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from specray.deployments import GRPC_SERVICER

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=2e8)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                    grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[GRPC_SERVICER]))
        for name, (app, prefix) in apps.items():
            serve.run(app, name=name, route_prefix=prefix)
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


class Stub:
    """A SpecDecode stub bound to one Serve application (the `application` metadata)."""

    def __init__(self, port: int, app: str):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.SpecDecodeStub(self.channel)
        self.metadata = (("application", app),)

    def generate(self, req: pb.GenerateRequest, **kw) -> pb.GenerateResponse:
        return self.stub.Generate(req, metadata=self.metadata, timeout=120, **kw)

    def stream(self, req: pb.GenerateRequest, **kw):
        return self.stub.GenerateStream(req, metadata=self.metadata, timeout=120, **kw)

    def info(self) -> pb.ServerInfo:
        return self.stub.GetServerInfo(pb.ServerInfoRequest(), metadata=self.metadata, timeout=30)

    def raw_generate(self, payload: bytes) -> bytes:
        """Generate with hand-made bytes (e.g. fields this contract does not have)."""
        call = self.channel.unary_unary("/specray.v1.SpecDecode/Generate")
        return call(payload, metadata=self.metadata, timeout=60)


def joined(parts) -> tuple[str, list[int], pb.GenerateResponse]:
    """(text, token ids, last message) of a stream."""
    text, ids, last = "", [], None
    for part in parts:
        text += part.text
        ids += part.token_ids
        last = part
    return text, ids, last


def wait_for(predicate, timeout_s: float, what: str, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


