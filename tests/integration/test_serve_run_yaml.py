"""`serve run cluster/serve_config.yaml` comes up on its own Ray and answers a gRPC request on port 9000,
then stops cleanly on Ctrl-C (SIGINT)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from serving import wait_for

from specray.v1 import specray_pb2 as pb
from specray.v1 import specray_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
SERVE = Path(sys.executable).parent / "serve"


def answer(stub) -> pb.GenerateResponse | None:
    try:
        return stub.Generate(pb.GenerateRequest(prompt="def add(a, b):", sampling=pb.SamplingParams(max_tokens=8)),
                             timeout=30)
    except grpc.RpcError:
        return None


@pytest.mark.skipif(not SERVE.exists() and shutil.which("serve") is None, reason="no serve CLI")
def test_serve_run_of_the_cluster_yaml_answers():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([str(SERVE if SERVE.exists() else "serve"), "run", "cluster/serve_config.yaml"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with grpc.insecure_channel("127.0.0.1:9000") as channel:
            out = wait_for(lambda: proc.poll() is None and answer(pb_grpc.SpecDecodeStub(channel)), 180,
                           "serve run to answer", every_s=1)
        assert len(out.token_ids) == 8 and out.text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            log, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            log, _ = proc.communicate()
    assert proc.returncode is not None, log[-3000:]
