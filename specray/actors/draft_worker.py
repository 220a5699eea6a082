"""The draft worker: the draft model and its KV slots behind a core `Drafter`.

Its two step methods (core.step) apply the step's `Work` first (commit the last outcomes, remove,
admit), so one message per step carries everything; Ray runs one actor's calls in submission
order (and a compiled graph its nodes in graph order), so no locks are needed. Knows nothing of
Serve or gRPC."""
from __future__ import annotations

from specray.actors import Busy, node_id, set_threads, worker_device
from specray.actors.wire import SpecWire, specs_to_wire
from specray.core.drafter import Drafter
from specray.core.loader import load_shard
from specray.core.step import Work


class DraftWorker:
    def __init__(self, path: str, num_slots: int, max_len: int, dtype: str = "float32", device: str = "auto",
                 num_threads: float | None = None, top_n: int = 8, auto_backup_batch: int = 2,
                 stand_in: bool = False):
        """stand_in: `path` is the target and only `off` requests come (a 1-layer shard keeps the books)."""
        set_threads(num_threads)
        shard = load_shard(path, 0, 1 if stand_in else None, dtype, worker_device(device))
        self.drafter = Drafter(shard, num_slots, max_len, top_n, auto_backup_batch=auto_backup_batch)
        self.busy = Busy()  # in propose and prepare

    def node_id(self) -> str | None:
        return node_id()

    def busy_seconds(self) -> float:
        return self.busy.seconds

    def num_free(self) -> int:
        """Free KV slots (a draft's `off` sequences hold none)."""
        return self.drafter.cache.num_free

    def propose(self, work: Work) -> list[SpecWire]:
        """Apply the work, then one speculation per sequence of work.rids, in wire form (actors.wire)."""
        with self.busy:
            return specs_to_wire(self.drafter.propose(work))

    def prepare(self, work: Work, specs: list[SpecWire] | None = None) -> None:
        """SSD: build the next round's speculation cache while the stages verify this one."""
        with self.busy:
            self.drafter.prepare(work, specs)
