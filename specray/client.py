"""A small gRPC client for the specray.v1.SpecDecode service (what `specray generate --server` uses).

    client = Client("localhost:9000")
    for part in client.stream("def add(a, b):", max_tokens=32, mode="tree", branching=(2, 2)):
        print(part.text, end="")

Keyword arguments are the contract's SamplingParams and SpeculationParams fields (mode and backup
by name). Errors arrive as `grpc.RpcError` with the server's status and message. Knows nothing of
Ray or the engine."""
from __future__ import annotations

from collections.abc import Iterator

import grpc

from specray.v1 import specray_pb2 as pb
from specray.v1 import specray_pb2_grpc as pb_grpc

SAMPLING = ("temperature", "top_p", "top_k", "seed", "max_tokens", "stop", "ignore_eos")
SPECULATION = ("num_speculative_tokens", "branching", "with_replacement", "fan_out", "saguaro_c")


def make_request(prompt: str | list[int], request_id: str = "", mode: str | None = None,
                 backup: str | None = None, **fields) -> pb.GenerateRequest:
    """A GenerateRequest: prompt as text or token ids; unknown keyword arguments raise TypeError."""
    unknown = set(fields) - set(SAMPLING) - set(SPECULATION)
    if unknown:
        raise TypeError(f"unknown request fields {sorted(unknown)}")
    sampling = {k: v for k, v in fields.items() if k in SAMPLING and v is not None}
    spec = {k: v for k, v in fields.items() if k in SPECULATION and v is not None}
    if mode:
        spec["mode"] = pb.SpeculationMode.Value(f"SPECULATION_MODE_{mode.upper()}")
    if backup:
        spec["backup"] = pb.Backup.Value(f"BACKUP_{backup.upper()}")
    req = pb.GenerateRequest(request_id=request_id, sampling=pb.SamplingParams(**sampling),
                             speculation=pb.SpeculationParams(**spec))
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.prompt_token_ids.ids.extend(prompt)
    return req


class Client:
    def __init__(self, address: str, timeout_s: float | None = None):
        """address: HOST:PORT of the Serve gRPC proxy. With one Serve application no routing metadata
        is needed; `application` selects one when several run."""
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.SpecDecodeStub(self.channel)
        self.timeout_s = timeout_s

    def generate(self, prompt: str | list[int], **fields) -> pb.GenerateResponse:
        return self.stub.Generate(make_request(prompt, **fields), timeout=self.timeout_s)

    def stream(self, prompt: str | list[int], **fields) -> Iterator[pb.GenerateResponse]:
        return self.stub.GenerateStream(make_request(prompt, **fields), timeout=self.timeout_s)

    def info(self) -> pb.ServerInfo:
        return self.stub.GetServerInfo(pb.ServerInfoRequest(), timeout=self.timeout_s)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
