"""The Ray actors: the draft worker and the target stages, plain classes the engine makes remote.

Each wraps one core object (`Drafter`, `TargetStage`) and speaks in small Python objects
(speculations, outcomes, token ids); hidden states travel stage to stage as numpy arrays. The
same classes run in process behind the engine's `LocalWorkers`. Knows nothing of Serve or gRPC."""
from __future__ import annotations

import time

import ray
import torch

from specray.core.device import pick_device


def worker_device(name: str) -> torch.device:
    """`auto` inside a Ray actor: the GPU Ray gave it, else the CPU. Elsewhere: core's pick_device."""
    if name == "auto" and ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        return torch.device("cuda" if ray.get_gpu_ids() else "cpu")
    return pick_device(name)


def set_threads(num_cpus: float | None) -> None:
    """Give torch the actor's CPUs (Ray sets OMP_NUM_THREADS, not torch's pool); None leaves it alone."""
    if num_cpus is not None:
        torch.set_num_threads(max(1, int(num_cpus)))


def node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class Busy:
    """Seconds a worker spent in its round methods (`with self.busy:`), for the per-round time split."""

    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        self._start = time.perf_counter()

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self._start
