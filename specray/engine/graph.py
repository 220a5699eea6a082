"""The `graph` transport: one step (core.step.run_step) as a compiled Ray graph over the worker actors.

The graph is the step's data flow bound once (`.bind` instead of `.remote`) and compiled: the work
goes in, speculations and hidden states go actor to actor, and the results come out through
shared-memory channels in the object store, with no per-call scheduling. When the stages hold
GPUs, the hidden states between them are typed for NCCL and stay on the device.

Two facts of Ray 2.60's compiled graphs shape this module:
- an actor in a compiled graph polls its input channel while idle (about a core each) for as long
  as the graph lives, which is the engine's life: the graph is compiled when the engine starts (a
  few hundred ms, on the waiter thread) and torn down at shutdown. (Tearing it down when idle and compiling it again at the
  next step hung the compile once in the serving tests: the actors' old loops and the new
  compile raced, so it is not done.)
- the driver's own wait would poll too: ours runs on one waiter thread that first sleeps through
  half of what recent rounds took, then checks the output channel and sleeps `POLL_S` between
  checks, so a waiting engine leaves its cores to the actors (a 2-core machine has no third one).
An actor that dies closes the graph's channels; that is raised as `RayActorError`, like the
`calls` transport's failures, so the serving layer restarts the actors."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import ray
from ray.dag import InputNode
from ray.exceptions import RayActorError, RayChannelError, RayChannelTimeoutError

from specray.core.step import RoundResult, Work, run_step

POLL_S = 1e-4  # the waiter's sleep between checks of the output channel


class CompiledStep:
    def __init__(self, draft, stages: list, gpu_stages: bool = False):
        """draft, stages: the worker actor handles. gpu_stages: stage hidden states go over NCCL."""
        self.draft, self.stages, self.gpu_stages = draft, stages, gpu_stages
        self._graph = None
        self._waiter = ThreadPoolExecutor(1, thread_name_prefix="specray-graph")  # compiles, executes, waits
        self._typical_s = 0.0  # a moving average of recent rounds' wall time

    def start(self) -> None:
        """Compile now, on the waiter thread, so that the first request does not wait for it (a
        failure shows again at the first step)."""
        self._waiter.submit(self._compile)

    def _bind(self, actor, method: str, *args):
        node = getattr(actor, method).bind(*args)
        return node.with_tensor_transport("nccl") if self.gpu_stages and method == "forward" else node

    def build(self):
        """The step as an uncompiled graph; its one output is the last stage's results."""
        with InputNode() as work:
            return run_step(self._bind, self.draft, self.stages, work)

    def submit(self, work: Work):
        """A concurrent.futures.Future of one step's {rid: RoundResult}."""
        return self._waiter.submit(self._execute, work)

    def _compile(self) -> None:
        if self._graph is None:
            self._graph = self.build().experimental_compile()

    def _execute(self, work: Work) -> dict[str, RoundResult]:
        self._compile()
        plain_round = bool(work.rids) and not work.add  # admissions' prefills take longer, flushes less
        try:
            start = time.perf_counter()
            ref = self._graph.execute(work)
            self._wait(ref, self._typical_s / 2 if plain_round else 0.0)
            if plain_round:
                self._typical_s += 0.2 * (time.perf_counter() - start - self._typical_s)
            return ray.get(ref)
        except RayChannelError as e:
            self._graph = None  # Ray tears a graph down when one of its actors dies
            raise RayActorError(error_msg=f"a worker actor died (the compiled graph's channel closed: {e})") from e

    def _wait(self, ref, first_sleep_s: float) -> None:
        """Until the step's output is in: one sleep, then non-blocking checks (Ray 2.60's
        CompiledDAG._execute_until with timeout 0; ray.get with a timeout would spin a core) with
        short sleeps between them."""
        time.sleep(first_sleep_s)
        while True:
            try:
                self._graph._execute_until(ref._execution_index, None, 0)
                return
            except RayChannelTimeoutError:
                time.sleep(POLL_S)

    def _teardown(self) -> None:
        graph, self._graph = self._graph, None
        if graph is not None:
            graph.teardown()

    def shutdown(self, wait_s: float = 10.0) -> None:
        """Tear the graph down after the step in flight, if any (waiting at most wait_s: the caller
        kills the actors next, which ends a step that hangs), and stop the threads."""
        try:
            self._waiter.submit(self._teardown).result(timeout=wait_s)
        except (RuntimeError, TimeoutError):  # already shut down, or a step hangs
            pass
        self._waiter.shutdown(wait=False)
