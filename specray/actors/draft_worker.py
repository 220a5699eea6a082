"""The draft worker: the draft model and its KV slots behind a core `Drafter`.

`propose(work)` applies the step's `Work` first (commit the last outcomes, remove, admit), so one
message per step carries everything. For SSD (async) sequences it then prepares the next round on
a second thread, while the target stages verify this one; the next `propose` waits for that
preparation before it touches the drafter, so the drafter is never used by two threads at once
and its draws happen in the same order as in the one-thread reference (core.generate). Ray runs
one actor's calls in submission order (and a compiled graph its nodes in graph order), so no
other locks are needed. Knows nothing of Serve or gRPC."""
from __future__ import annotations

import threading
import time

from specray.actors import Busy, node_id, set_threads, worker_device
from specray.actors.wire import SpecWire, specs_nbytes, specs_to_wire
from specray.core.drafter import Drafter
from specray.core.loader import load_shard
from specray.core.step import Work


class DraftWorker:
    def __init__(self, path: str, num_slots: int, max_len: int, dtype: str = "auto", device: str = "auto",
                 num_threads: float | None = None, auto_backup_batch: int = 2,
                 stand_in: bool = False):
        """stand_in: `path` is the target and only `off` requests come (a 1-layer shard keeps the books)."""
        set_threads(num_threads)
        shard = load_shard(path, 0, 1 if stand_in else None, dtype, worker_device(device))
        self.drafter = Drafter(shard, num_slots, max_len, auto_backup_batch=auto_backup_batch)
        self.busy = Busy()  # in propose and in the preparation thread
        self.sent_bytes = 0  # speculations sent
        self._preparing: threading.Thread | None = None
        self._failed: BaseException | None = None  # the last preparation's error, raised by the next propose

    def node_id(self) -> str | None:
        return node_id()

    def counters(self) -> dict:
        """Compute seconds so far and bytes sent to the stages (for the bench's round split)."""
        return {"busy_s": self.busy.seconds, "sent_bytes": self.sent_bytes}

    def num_free(self) -> int:
        """Free KV slots (`off` sequences hold none)."""
        return self.drafter.cache.num_free

    def propose(self, work: Work) -> list[SpecWire]:
        """Apply the work, then one speculation per sequence of work.rids, in wire form (actors.wire);
        SSD sequences' next round is prepared in the background."""
        self._wait_prepared()
        with self.busy:
            specs = specs_to_wire(self.drafter.propose(work))
        self.sent_bytes += specs_nbytes(specs)
        if any(self.drafter.seqs[rid].spec.mode == "async" for rid in work.rids):
            self._preparing = threading.Thread(target=self._prepare, args=(work,), daemon=True)
            self._preparing.start()
        return specs

    def _prepare(self, work: Work) -> None:
        start = time.perf_counter()
        try:
            self.drafter.prepare(work)
        except BaseException as e:  # noqa: BLE001 -- handed to the next propose
            self._failed = e
        self.busy.seconds += time.perf_counter() - start

    def _wait_prepared(self) -> None:
        if self._preparing is not None:
            self._preparing.join()
            self._preparing = None
        failed, self._failed = self._failed, None
        if failed is not None:
            raise RuntimeError(f"SSD preparation of the last round failed: {failed!r}") from failed
