"""A target stage worker: layers [start, stop) of the target and their KV slots behind a core `TargetStage`.

Speculations arrive and hidden states leave in wire form (numpy; specray.actors.wire). Every step
method applies the step's `Work` first (core.step). The last stage verifies and returns a
`RoundResult` per sequence for the engine, so no logits or hidden states ever reach the engine.
Knows nothing of Serve or gRPC."""
from __future__ import annotations

from specray.actors import Busy, node_id, set_threads, worker_device
from specray.actors.wire import SpecWire, UpWire, specs_from_wire, up_from_wire, up_nbytes, up_to_wire
from specray.core.loader import load_lm_head, load_shard
from specray.core.step import RoundResult, Work
from specray.core.target import TargetStage


class TargetStageWorker:
    def __init__(self, path: str, start: int, stop: int, num_slots: int, max_len: int, dtype: str = "auto",
                 device: str = "auto", num_threads: float | None = None, device_hidden: bool = False,
                 draft: str | None = None):
        """device_hidden: hidden states leave `forward` as device tensors (for a transport that moves
        them device to device, e.g. NCCL), not as host arrays. draft: the draft checkpoint, whose LM
        head the last stage loads to recompute the draft's law (sampled requests need it)."""
        set_threads(num_threads)
        self.device, self.device_hidden = worker_device(device), device_hidden
        shard = load_shard(path, start, stop, dtype, self.device)
        head = load_lm_head(draft, dtype, self.device) if draft is not None and shard.is_last else None
        self.stage = TargetStage(shard, num_slots, max_len, draft_head=head)
        self.busy = Busy()  # in forward and verify
        self.sent_bytes = 0  # hidden states sent to the next stage

    def node_id(self) -> str | None:
        return node_id()

    def counters(self) -> dict:
        """Compute seconds so far and bytes of hidden states sent to the next stage."""
        return {"busy_s": self.busy.seconds, "sent_bytes": self.sent_bytes}

    def num_free(self) -> int:
        """Free KV slots (a draft's `off` sequences hold none)."""
        return self.stage.num_free

    def forward(self, work: Work, specs: list[SpecWire], up: UpWire = None) -> UpWire:
        """A stage before the last: apply the work, verification forward. up: the previous stage's output."""
        with self.busy:
            up = self.stage.forward(work, specs_from_wire(specs), up_from_wire(up, self.device))
            up = up if self.device_hidden else up_to_wire(up)
        self.sent_bytes += up_nbytes(up)
        return up

    def verify(self, work: Work, specs: list[SpecWire], up: UpWire = None) -> dict[str, RoundResult]:
        """The last stage: apply the work, forward, verify. Returns {rid: RoundResult}."""
        with self.busy:
            return self.stage.verify(work, specs_from_wire(specs), up_from_wire(up, self.device))
