"""The draft worker: the draft model and its KV slots behind a core `Drafter`.

Calls that touch sequences may carry `outcomes`, the previous round's verification outcomes (an object ref the
engine passes on unopened): they are committed before the call's own work. Ray runs one actor's
calls in submission order, so the commit lands exactly between the round that produced it and
the next use of the drafter, with no extra call and no locks. Knows nothing of Serve or gRPC."""
from __future__ import annotations

from specray.actors import Busy, node_id, set_threads, worker_device
from specray.actors.wire import SpecWire, specs_to_wire
from specray.core.drafter import Drafter
from specray.core.loader import load_shard
from specray.core.sampling import SamplingParams
from specray.core.speculation import SpeculationConfig
from specray.core.verify import Outcome

Outcomes = dict[str, Outcome]


class DraftWorker:
    def __init__(self, path: str, num_slots: int, max_len: int, dtype: str = "float32", device: str = "auto",
                 num_threads: float | None = None, top_n: int = 8, auto_backup_batch: int = 2,
                 stand_in: bool = False):
        """stand_in: `path` is the target and only `off` requests come (a 1-layer shard keeps the books)."""
        set_threads(num_threads)
        shard = load_shard(path, 0, 1 if stand_in else None, dtype, worker_device(device))
        self.drafter = Drafter(shard, num_slots, max_len, top_n, auto_backup_batch=auto_backup_batch)
        self.busy = Busy()  # in propose, prepare and commit

    def node_id(self) -> str | None:
        return node_id()

    def busy_seconds(self) -> float:
        return self.busy.seconds

    def num_free(self) -> int:
        """Free draft slots (`off` sequences hold none)."""
        return self.drafter.cache.num_free

    def _commit(self, outcomes: Outcomes | None) -> None:
        if outcomes:
            self.drafter.commit(outcomes)

    def add(self, reqs: list[tuple[str, list[int], SamplingParams, SpeculationConfig]],
            outcomes: Outcomes | None = None) -> None:
        """Register and prefill each (rid, prompt, params, spec)."""
        self._commit(outcomes)
        for rid, prompt, params, spec in reqs:
            self.drafter.add(rid, prompt, params, spec)

    def propose(self, rids: list[str], outcomes: Outcomes | None = None) -> list[SpecWire]:
        """One speculation per sequence, in wire form (specray.actors.wire)."""
        with self.busy:
            self._commit(outcomes)
            return specs_to_wire(self.drafter.propose(rids))

    def prepare(self, rids: list[str]) -> None:
        """SSD: build the next round's speculation cache while the stages verify this one."""
        with self.busy:
            self.drafter.prepare(rids)

    def commit(self, outcomes: Outcomes) -> None:
        with self.busy:
            self.drafter.commit(outcomes)

    def remove(self, rids: list[str], outcomes: Outcomes | None = None) -> None:
        """Forget sequences (unknown ids are ignored: a failed admission may have added only some)."""
        self._commit(outcomes)
        for rid in rids:
            if rid in self.drafter.seqs:
                self.drafter.remove(rid)
