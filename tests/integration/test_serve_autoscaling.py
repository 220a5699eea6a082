"""Autoscaling: under sustained concurrent load a second replica starts (each replica with its own
placement group of small CPU bundles), and every request keeps succeeding while it does."""
from __future__ import annotations

import threading

import pytest
from serving import Stub, free_port, joined, serve_apps, wait_for

from specray.v1 import specray_pb2 as pb

ray = pytest.importorskip("ray")

ARGS = {"max_batch": 2, "max_waiting": 30, "max_context": 256, "replica_cpus": 0.1, "draft_cpus": 0.2,
        "stage_cpus": 0.2, "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
        "upscale_delay_s": 1, "downscale_delay_s": 600, "metrics_interval_s": 0.5, "look_back_period_s": 2}


def running_replicas() -> int:
    from ray import serve
    app = serve.status().applications.get("specray")
    if app is None or "SpecDecode" not in app.deployments:
        return 0
    return app.deployments["SpecDecode"].replica_states.get("RUNNING", 0)


def test_second_replica_starts_under_load_and_requests_keep_succeeding():
    from specray.deployments.app import build_app
    grpc_port = free_port()
    with serve_apps({"specray": (build_app(ARGS), "/")}, grpc_port, free_port()):
        assert running_replicas() == 1
        stub, stop = Stub(grpc_port, "specray"), threading.Event()
        done, failures = [], []

        def client(i: int):
            req = pb.GenerateRequest(prompt=f"def f{i}(x):", sampling=pb.SamplingParams(max_tokens=48,
                                                                                         ignore_eos=True))
            while not stop.is_set():
                try:
                    _, ids, last = joined(stub.stream(req))
                    assert len(ids) == 48 and last.finish_reason == pb.FINISH_REASON_LENGTH
                    done.append(i)
                except Exception as e:  # noqa: BLE001 -- every failure is reported below
                    failures.append(repr(e))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: running_replicas() == 2, 180, "a second replica", every_s=1)
            served_before = len(done)
            wait_for(lambda: len(done) >= served_before + 6, 120, "requests after the scale-up")
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not failures, failures[:3]
        groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
        assert sum(len(g["bundles"]) == 3 for g in groups) == 2  # one group per replica: itself, draft, stage
