"""The workers an engine drives: one draft worker and a chain of target stages, and how a step reaches them.

The contract the engine uses: `add(reqs)` admits and prefills, `round(rids)` runs one verification
round and returns {rid: RoundResult}, `remove(rids)` frees their slots, `flush()` applies pending
removals and outcomes, `free_slots()`, `timings()` (the compute seconds of the draft worker and of
the stages so far, and the bytes they sent each other), `shutdown()`.

Each `add` and `round` is one step (core.step.run_step, the one place the data flow is written):
the last round's outcomes and the removals since the last step ride along in its `Work`, so a
round is one message per worker. Three transports follow it:
- `local`: the worker objects in this process (the algorithm's own cost);
- `calls`: Ray actors, one actor call per worker and step, values passed as object refs;
- `graph`: Ray actors in a compiled graph (ray.dag), compiled once when the workers start; the work
  goes in and the results come out through shared-memory channels, with no per-call scheduling.
  Actors in a compiled graph poll their input channel while idle (about a core each)."""
from __future__ import annotations

import asyncio

import ray

from specray.actors.draft_worker import DraftWorker
from specray.actors.target_stage import TargetStageWorker
from specray.core.step import Admission, RoundResult, Work, direct, run_step
from specray.engine.graph import CompiledStep
from specray.engine.placement import actor_options, start_local_ray
from specray.engine.requests import EngineConfig, EngineRequest

ACTOR_START_TIMEOUT_S = 600  # loading a large checkpoint can take minutes


class Workers:
    """Slot accounting, each sequence's pending outcome and removal, and the engine contract over
    one `_step(work)` per transport."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._rids: set[str] = set()
        self._outcomes: dict = {}        # rid -> the last round's Outcome, committed with the next step
        self._removed: list[str] = []    # removed since the last step

    def free_slots(self) -> int:
        return self.num_slots - len(self._rids)

    def _work(self, add: tuple[Admission, ...] = (), rids: tuple[str, ...] = ()) -> Work:
        """The next step's work with the pending removals, and the pending outcomes unless it only
        admits (a failed admission must not lose the running sequences' outcomes)."""
        admit_only = bool(add) and not rids
        work = Work({} if admit_only else self._outcomes, tuple(self._removed), add, rids)
        if not admit_only:
            self._outcomes = {}
        self._removed = []
        return work

    async def _run(self, work: Work) -> dict[str, RoundResult]:
        """One step; if it fails, its removals are tried again with the next (removing is idempotent)."""
        try:
            return await self._step(work)
        except BaseException:
            self._removed = [*work.remove, *self._removed]
            raise

    async def add(self, reqs: list[EngineRequest]) -> None:
        if len(reqs) > self.free_slots():
            raise RuntimeError(f"{len(reqs)} requests for {self.free_slots()} free slots")
        self._rids.update(r.rid for r in reqs)
        await self._run(self._work(add=tuple(Admission(r.rid, r.prompt_ids, r.sampling, r.spec) for r in reqs)))

    async def round(self, rids: list[str]) -> dict[str, RoundResult]:
        results = await self._run(self._work(rids=tuple(rids)))
        self._outcomes = {rid: r.outcome for rid, r in results.items()}
        return results

    async def flush(self) -> None:
        """Apply pending outcomes and removals now (a step without a round), e.g. when going idle."""
        if self._outcomes or self._removed:
            await self._run(self._work())

    def remove(self, rids: list[str]) -> None:
        """Forget sequences; the workers learn it with the next step."""
        gone = [rid for rid in rids if rid in self._rids]
        self._rids.difference_update(gone)
        self._removed += gone
        for rid in gone:
            self._outcomes.pop(rid, None)

    async def _step(self, work: Work) -> dict[str, RoundResult]:
        raise NotImplementedError

    @staticmethod
    def _timings(draft: dict, stages: list[dict]) -> dict[str, float]:
        """The workers' counters as the engine reports them."""
        return {"draft_s": draft["busy_s"], "verify_s": sum(s["busy_s"] for s in stages),
                "wire_bytes": draft["sent_bytes"] + sum(s["sent_bytes"] for s in stages)}

    def shutdown(self) -> None:
        pass


def _draft_kwargs(config: EngineConfig, num_threads: float | None) -> dict:
    return {"path": config.draft or config.target, "num_slots": config.max_batch,
            "max_len": config.max_context, "dtype": config.dtype, "device": config.device,
            "num_threads": num_threads, "auto_backup_batch": config.auto_backup_batch,
            "stand_in": config.draft is None}


def _device_hidden(config: EngineConfig) -> bool:
    """Hidden states stay on the stages' GPUs between them (NCCL channels of the graph transport)."""
    return config.kind == "ray" and config.transport == "graph" and config.stage_resources.num_gpus > 0


def _stage_kwargs(config: EngineConfig, layers: tuple[int, int], num_threads: float | None) -> dict:
    return {"path": config.target, "start": layers[0], "stop": layers[1], "num_slots": config.max_batch,
            "max_len": config.max_context, "dtype": config.dtype, "device": config.device,
            "num_threads": num_threads, "device_hidden": _device_hidden(config), "draft": config.draft}


class LocalWorkers(Workers):
    def __init__(self, config: EngineConfig, layers: list[tuple[int, int]]):
        """Sets this process's torch threads to the stages' num_cpus: torch's default (every core) ran the
        demo pair 3x slower on the 2-core box (29 vs 9 ms a token), 10x with Ray processes beside it."""
        super().__init__(config.max_batch)
        threads = config.stage_resources.num_cpus
        self.draft = DraftWorker(**_draft_kwargs(config, threads))
        self.stages = [TargetStageWorker(**_stage_kwargs(config, span, threads)) for span in layers]

    async def _step(self, work: Work) -> dict[str, RoundResult]:
        return run_step(direct, self.draft, self.stages, work)

    async def timings(self) -> dict[str, float]:
        return self._timings(self.draft.counters(), [s.counters() for s in self.stages])


def _remote(actor, method: str, *args):
    return getattr(actor, method).remote(*args)


def _bind(actor, method: str, *args):
    return getattr(actor, method).bind(*args)


class RayWorkers(Workers):
    """The worker actors, reached through actor calls (`calls`) or a compiled graph (`graph`)."""

    def __init__(self, draft, stages: list, num_slots: int, transport: str = "graph", gpu_stages: bool = False):
        """draft, stages: handles of DraftWorker and TargetStageWorker actors (stages in layer order).
        gpu_stages: the stages hold GPUs (the graph sends their hidden states over NCCL)."""
        super().__init__(num_slots)
        self.draft, self.stages, self.transport = draft, stages, transport
        self.graph = CompiledStep(draft, stages, gpu_stages) if transport == "graph" else None
        if self.graph is not None:
            self.graph.start()

    @classmethod
    def create(cls, config: EngineConfig, layers: list[tuple[int, int]], placement_group=None,
               first_bundle: int = 0, name: str | None = None) -> RayWorkers:
        """Start the actors (draft in bundle first_bundle, stage i in first_bundle + 1 + i) and wait
        until every model is loaded. With a name, the actors are `{name}-draft`, `{name}-stage{i}`.
        Without a running Ray, starts a local one that fits the actors (engine.placement)."""
        fit = not ray.is_initialized()
        if fit:
            start_local_ray()
        d_opts, s_opts = actor_options(config, len(layers), placement_group, first_bundle, name, fit)
        draft = ray.remote(DraftWorker).options(**d_opts).remote(**_draft_kwargs(config, d_opts["num_cpus"]))
        stages = [ray.remote(TargetStageWorker).options(**opts).remote(
            **_stage_kwargs(config, span, opts["num_cpus"])) for span, opts in zip(layers, s_opts)]
        ray.get([a.node_id.remote() for a in (draft, *stages)], timeout=ACTOR_START_TIMEOUT_S)
        return cls(draft, stages, config.max_batch, config.transport, _device_hidden(config))

    async def _step(self, work: Work) -> dict[str, RoundResult]:
        if self.graph is not None:
            # shielded: a cancelled caller must not cancel a step the waiter has not started yet
            return await asyncio.shield(asyncio.wrap_future(self.graph.submit(work)))
        return await run_step(_remote, self.draft, self.stages, work)

    async def timings(self) -> dict[str, float]:
        draft, *stages = await asyncio.gather(*(a.counters.remote() for a in (self.draft, *self.stages)))
        return self._timings(draft, stages)

    def shutdown(self) -> None:
        if self.graph is not None:
            self.graph.shutdown()
        for actor in (self.draft, *self.stages):
            ray.kill(actor)


def make_workers(config: EngineConfig, layers: list[tuple[int, int]], placement_group=None,
                 first_bundle: int = 0, name: str | None = None) -> LocalWorkers | RayWorkers:
    if config.kind == "local":
        return LocalWorkers(config, layers)
    return RayWorkers.create(config, layers, placement_group, first_bundle, name)
