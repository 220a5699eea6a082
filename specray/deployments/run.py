"""Run the app: start (or join) Ray, start Serve with gRPC and HTTP, deploy; `serve_forever` until Ctrl-C,
or `running(...)` as a context manager (benchmarks, tests)."""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

from specray.deployments.config import GRPC_SERVICER, AppConfig


@contextmanager
def running(config: AppConfig, address: str | None = None, grpc_port: int = 9000, http_host: str = "127.0.0.1",
            http_port: int = 8000, **ray_init):
    """The app deployed under config.name at route "/", until the block exits (then Serve and, if this
    call started it, Ray shut down). ray_init: extra `ray.init` arguments (e.g. num_cpus)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from specray.deployments.app import build_app

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, **ray_init)
    try:
        serve.start(http_options={"host": http_host, "port": http_port},
                    grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[GRPC_SERVICER]))
        serve.run(build_app(config), name=config.name, route_prefix="/")
        yield
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


def serve_forever(config: AppConfig, address: str | None, grpc_port: int, http_host: str, http_port: int) -> None:
    try:
        with running(config, address, grpc_port, http_host, http_port):
            print(f"specray: serving {config.target} (draft {config.draft}), default mode "
                  f"{config.default_speculation.mode}\n"
                  f"  gRPC  0.0.0.0:{grpc_port}  specray.v1.SpecDecode (reflection on; binds all interfaces)\n"
                  f"  HTTP  http://{http_host}:{http_port}/v1  (completions, chat/completions, models)\n"
                  "Ctrl-C stops.", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("\nspecray: stopping", file=sys.stderr)
