"""The committed stubs in specray/v1 match proto/specray/v1/specray.proto, and the contract round-trips."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from specray.v1 import specray_pb2, specray_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("specray_pb2.py", "specray_pb2_grpc.py", "specray_pb2.pyi")


def test_committed_stubs_match_a_fresh_protoc_run(tmp_path):
    pytest.importorskip("grpc_tools")
    out = str(tmp_path)
    # The same invocation as tools/gen_proto.sh, with the output dirs pointed at tmp_path.
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", "proto", f"--python_out={out}",
                    f"--grpc_python_out={out}", f"--pyi_out={out}", "proto/specray/v1/specray.proto"],
                   cwd=ROOT, check=True)
    for name in GENERATED:
        fresh = (tmp_path / "specray" / "v1" / name).read_bytes()
        committed = (ROOT / "specray" / "v1" / name).read_bytes()
        assert fresh == committed, f"specray/v1/{name} is stale: run tools/gen_proto.sh"


def test_servicer_registration_function_exists():
    assert callable(specray_pb2_grpc.add_SpecDecodeServicer_to_server)
    assert hasattr(specray_pb2_grpc, "SpecDecodeStub")


def test_generate_request_with_every_field_round_trips():
    pb = specray_pb2
    sampling = pb.SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=0, max_tokens=64,
                                 stop=["\n\n", "END"], ignore_eos=True)
    speculation = pb.SpeculationParams(mode=pb.SPECULATION_MODE_ASYNC, num_speculative_tokens=3,
                                       branching=[2, 2, 1], with_replacement=True, fan_out=[2, 2, 1, 1],
                                       saguaro_c=0.5, backup=pb.BACKUP_FAST)
    for prompt in ({"prompt": "def fibonacci(n):"}, {"prompt_token_ids": pb.TokenIds(ids=[1, 2, 3])}):
        req = pb.GenerateRequest(request_id="r-1", sampling=sampling, speculation=speculation, **prompt)
        back = pb.GenerateRequest.FromString(req.SerializeToString())
        assert back == req
        assert back.WhichOneof("input") == next(iter(prompt))
        # optional fields keep presence even at their zero value (seed=0 is a real seed).
        assert back.sampling.HasField("seed") and back.sampling.seed == 0
        assert back.speculation.HasField("saguaro_c") and back.speculation.saguaro_c == 0.5
        assert list(back.speculation.fan_out) == [2, 2, 1, 1] and back.speculation.backup == pb.BACKUP_FAST

    bare = pb.GenerateRequest.FromString(pb.GenerateRequest(prompt="x").SerializeToString())
    assert not bare.sampling.HasField("seed") and not bare.speculation.HasField("saguaro_c")
    assert not bare.HasField("sampling") and bare.speculation.mode == pb.SPECULATION_MODE_UNSPECIFIED
    # Setting one member of the oneof clears the other.
    switched = pb.GenerateRequest(prompt="x")
    switched.prompt_token_ids.ids.append(5)
    assert switched.WhichOneof("input") == "prompt_token_ids" and switched.prompt == ""
