"""The workers an engine drives: one draft worker and a chain of target stages.

The contract: `add(reqs)` registers and prefills, `round(rids)` runs one verification round for
those sequences and returns {rid: RoundResult}, `remove(rids)` frees their slots, `free_slots()`,
`timings()` gives the seconds the draft worker and the stages have computed so far.
`LocalWorkers` holds the worker objects in this process (the algorithm's own cost);
`RayWorkers` holds actor handles and moves everything actor to actor as object refs:

    specs   = draft.propose(rids, last outcomes)          # last outcomes: committed first
    (SSD)     draft.prepare(rids)                         # drafts the next round meanwhile
    hidden  = stage_i.forward(specs, hidden, last outcomes)   for every stage but the last
    outcomes, results = last.verify(specs, hidden)        # forward + verify + commit
    await results                                         # the only thing the engine opens

The outcomes ref rides along with the next call to each other actor (Ray runs an actor's calls in
submission order), so a round costs 1 + num_stages actor calls (+1 in SSD)."""
from __future__ import annotations

import asyncio

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from specray.actors.draft_worker import DraftWorker
from specray.actors.target_stage import RoundResult, TargetStageWorker
from specray.engine.requests import ActorResources, EngineConfig, EngineRequest

ACTOR_START_TIMEOUT_S = 600  # loading a large checkpoint can take minutes


class _Slots:
    """Slot accounting and each sequence's mode, shared by both kinds of workers."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.modes: dict[str, str] = {}

    def free_slots(self) -> int:
        return self.num_slots - len(self.modes)

    def _register(self, reqs: list[EngineRequest]) -> None:
        if len(reqs) > self.free_slots():
            raise RuntimeError(f"{len(reqs)} requests for {self.free_slots()} free slots")
        self.modes.update((r.rid, r.spec.mode) for r in reqs)

    def _unregister(self, rids: list[str]) -> None:
        for rid in rids:
            self.modes.pop(rid, None)

    def _ssd(self, rids: list[str]) -> bool:
        return any(self.modes[r] == "async" for r in rids)


def _draft_kwargs(config: EngineConfig, num_threads: float | None) -> dict:
    return {"path": config.draft or config.target, "num_slots": config.max_batch,
            "max_len": config.max_context, "dtype": config.dtype, "device": config.device,
            "num_threads": num_threads, "top_n": config.top_n, "auto_backup_batch": config.auto_backup_batch,
            "stand_in": config.draft is None}


def _stage_kwargs(config: EngineConfig, layers: tuple[int, int], num_threads: float | None) -> dict:
    return {"path": config.target, "start": layers[0], "stop": layers[1], "num_slots": config.max_batch,
            "max_len": config.max_context, "dtype": config.dtype, "device": config.device,
            "num_threads": num_threads}


class LocalWorkers(_Slots):
    def __init__(self, config: EngineConfig, layers: list[tuple[int, int]]):
        """Sets this process's torch threads to the stages' num_cpus: torch's default (every core) ran the
        demo pair 3x slower on the 2-core box (29 vs 9 ms a token), 10x with Ray processes beside it."""
        super().__init__(config.max_batch)
        threads = config.stage_resources.num_cpus
        self.draft = DraftWorker(**_draft_kwargs(config, threads))
        self.stages = [TargetStageWorker(**_stage_kwargs(config, span, threads)) for span in layers]

    async def add(self, reqs: list[EngineRequest]) -> None:
        self._register(reqs)
        self.draft.add([(r.rid, list(r.prompt_ids), r.sampling, r.spec) for r in reqs])
        hidden = None
        for stage in self.stages:
            hidden = stage.add([(r.rid, list(r.prompt_ids), r.sampling) for r in reqs], hidden)

    async def round(self, rids: list[str]) -> dict[str, RoundResult]:
        specs = self.draft.propose(rids)
        if self._ssd(rids):
            self.draft.prepare(rids)
        hidden = None
        for stage in self.stages[:-1]:
            hidden = stage.forward(specs, hidden)
        outcomes, results = self.stages[-1].verify(specs, hidden)
        for stage in self.stages[:-1]:
            stage.commit(outcomes)
        self.draft.commit(outcomes)
        return results

    def remove(self, rids: list[str]) -> None:
        self._unregister(rids)
        for worker in (self.draft, *self.stages):
            worker.remove(rids)

    async def timings(self) -> dict[str, float]:
        return {"draft_s": self.draft.busy_seconds(), "verify_s": sum(s.busy_seconds() for s in self.stages)}

    def shutdown(self) -> None:
        pass


def _actor(cls, res: ActorResources, placement_group, bundle: int, name: str | None):
    """cls as a Ray actor with its resources, in its placement-group bundle when given one."""
    options = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus, "resources": dict(res.resources), "name": name}
    if placement_group is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group, placement_group_bundle_index=bundle)
    return ray.remote(cls).options(**options)


class RayWorkers(_Slots):
    def __init__(self, draft, stages: list, num_slots: int):
        """draft, stages: handles of DraftWorker and TargetStageWorker actors (stages in layer order)."""
        super().__init__(num_slots)
        self.draft, self.stages = draft, stages
        self._actors = [draft, *stages[:-1]]  # the actors that learn outcomes from the last stage
        self._pending: dict[int, ray.ObjectRef] = {}  # index in _actors -> outcomes it has not seen

    @classmethod
    def create(cls, config: EngineConfig, layers: list[tuple[int, int]], placement_group=None,
               first_bundle: int = 0, name: str | None = None) -> RayWorkers:
        """Start the actors (draft in bundle first_bundle, stage i in first_bundle + 1 + i) and wait
        until every model is loaded. With a name, the actors are `{name}-draft`, `{name}-stage{i}`."""
        if not ray.is_initialized():
            ray.init(include_dashboard=False)
        d, s = config.draft_resources, config.stage_resources
        draft = _actor(DraftWorker, d, placement_group, first_bundle, name and f"{name}-draft").remote(
            **_draft_kwargs(config, d.num_cpus))
        stages = [_actor(TargetStageWorker, s, placement_group, first_bundle + 1 + i, name and f"{name}-stage{i}").remote(
            **_stage_kwargs(config, span, s.num_cpus)) for i, span in enumerate(layers)]
        ray.get([a.node_id.remote() for a in (draft, *stages)], timeout=ACTOR_START_TIMEOUT_S)
        return cls(draft, stages, config.max_batch)

    def _take(self, i: int) -> ray.ObjectRef | None:
        return self._pending.pop(i, None)

    async def add(self, reqs: list[EngineRequest]) -> None:
        self._register(reqs)
        drafted = self.draft.add.remote([(r.rid, list(r.prompt_ids), r.sampling, r.spec) for r in reqs],
                                        outcomes=self._take(0))
        items, hidden = [(r.rid, list(r.prompt_ids), r.sampling) for r in reqs], None
        for i, stage in enumerate(self.stages):
            hidden = stage.add.remote(items, hidden, outcomes=self._take(i + 1))
        await drafted
        await hidden

    async def round(self, rids: list[str]) -> dict[str, RoundResult]:
        specs = self.draft.propose.remote(rids, outcomes=self._take(0))
        if self._ssd(rids):
            self.draft.prepare.remote(rids)
        hidden = None
        for i, stage in enumerate(self.stages[:-1]):
            hidden = stage.forward.remote(specs, hidden, outcomes=self._take(i + 1))
        outcomes, results = self.stages[-1].verify.options(num_returns=2).remote(specs, hidden)
        self._pending = dict.fromkeys(range(len(self._actors)), outcomes)
        try:
            return await results
        except BaseException:
            self._pending = {}  # a failed round's outcomes must not reach the next call
            raise

    def remove(self, rids: list[str]) -> None:
        """Fire and forget: later calls to each actor run after its removal."""
        self._unregister(rids)
        self.draft.remove.remote(rids, outcomes=self._take(0))
        for i, stage in enumerate(self.stages):
            stage.remove.remote(rids, outcomes=self._take(i + 1))

    async def timings(self) -> dict[str, float]:
        draft, *stages = await asyncio.gather(*(a.busy_seconds.remote() for a in (self.draft, *self.stages)))
        return {"draft_s": draft, "verify_s": sum(stages)}

    def shutdown(self) -> None:
        for actor in (self.draft, *self.stages):
            ray.kill(actor)


def make_workers(config: EngineConfig, layers: list[tuple[int, int]], placement_group=None,
                 first_bundle: int = 0, name: str | None = None) -> LocalWorkers | RayWorkers:
    if config.kind == "local":
        return LocalWorkers(config, layers)
    return RayWorkers.create(config, layers, placement_group, first_bundle, name)
