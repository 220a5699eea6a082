"""The engine: continuous batching over one draft worker and a chain of target stages.

`generate(req)` queues a request and yields its `Delta`s. One asyncio task runs the step loop
while there is work; each `step`:

1. drops requests whose consumer went away (their slots are freed);
2. admits waiting requests while slots are free (prefill on the draft and every stage);
3. runs ONE round for every running sequence, whatever its mode or sampling settings, and while
   it runs, streams the tokens the previous round committed (detokenising is off the critical path);
4. appends each sequence's committed tokens (cut at EOS, a stop string or max_tokens) and retires
   finished sequences, streaming their last tokens at once.

The engine sees token ids and small statistics only. It knows nothing of Ray (the workers do),
Serve or gRPC; it raises `ValueError` for a request it cannot serve."""
from __future__ import annotations

import asyncio
import contextvars
import copy
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from specray.core.sequence import Sequence, SpecStats
from specray.core.step import RoundResult
from specray.engine.detokenizer import Detokenizer
from specray.engine.requests import Delta, EngineConfig, EngineRequest


class EngineStopped(RuntimeError):
    """The engine shut down while the request was in flight."""


@dataclass(eq=False)
class _Request:
    req: EngineRequest
    seq: Sequence
    detok: Detokenizer | None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # Delta | BaseException
    text: str = ""     # output text so far (cut at a stop string)
    sent: int = 0      # characters of text already streamed
    fresh: list[int] = field(default_factory=list)  # committed tokens not streamed yet
    gone: bool = False  # the consumer stopped listening

    @property
    def holdback(self) -> int:
        """Characters withheld from the stream: they may be the start of a stop string."""
        return max((len(s) for s in self.req.stop), default=1) - 1


class Engine:
    def __init__(self, workers, config: EngineConfig, tokenizer=None, eos_ids: tuple[int, ...] = (),
                 vocab_size: int | None = None):
        """workers: LocalWorkers or RayWorkers (or a fake with the same contract). tokenizer: anything
        with `decode(ids, skip_special_tokens=True)`; None streams no text (and allows no stop strings)."""
        self.workers, self.config, self.tokenizer = workers, config, tokenizer
        self.eos_ids, self.vocab_size = frozenset(eos_ids), vocab_size
        self._waiting: deque[_Request] = deque()
        self._running: dict[str, _Request] = {}
        self._task: asyncio.Task | None = None
        self.totals = SpecStats()
        self.num_rounds = self.num_finished = self.num_failed = self.num_cancelled = 0

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def free_slots(self) -> int:
        return self.workers.free_slots()

    def stats(self) -> dict:
        return {**self.totals.to_dict(), "num_rounds": self.num_rounds, "num_finished": self.num_finished,
                "num_failed": self.num_failed, "num_cancelled": self.num_cancelled, "running": self.running,
                "waiting": self.waiting}

    async def timings(self) -> dict:
        """Rounds run, the cumulative compute seconds of the draft worker (draft_s) and of all target
        stages (verify_s), and the bytes of speculations and hidden states sent between the workers
        (wire_bytes); the rest of a round's wall time is waiting, transport and scheduling."""
        return {"rounds": self.num_rounds, **await self.workers.timings()}

    # ---- requests in, deltas out -------------------------------------------------------------

    def _check(self, req: EngineRequest) -> EngineRequest:
        """The request with its speculation settings resolved, or ValueError."""
        req = req if req.spec is not None else replace(req, spec=self.config.spec)
        spec, cfg = req.spec, self.config
        if req.rid in self._running or any(w.req.rid == req.rid for w in self._waiting):
            raise ValueError(f"request id {req.rid!r} is already in use")
        if spec.mode != "off" and cfg.draft is None:
            raise ValueError(f"mode {spec.mode!r} needs a draft model and this engine has none; "
                             "use mode 'off'")
        if self.vocab_size is not None and max(spec.branching, default=1) > self.vocab_size:
            raise ValueError(f"branching {list(spec.branching)} is wider than the vocabulary ({self.vocab_size})")
        need = len(req.prompt_ids) + req.max_tokens + spec.draft_rows
        if need > cfg.max_context:
            raise ValueError(f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.max_tokens}) + one "
                             f"round's speculation ({spec.draft_rows} rows) needs {need} KV rows; "
                             f"max_context is {cfg.max_context}")
        if self.vocab_size is not None and max(req.prompt_ids) >= self.vocab_size:
            raise ValueError(f"prompt token id {max(req.prompt_ids)} is outside the vocabulary "
                             f"({self.vocab_size})")
        if req.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer and this engine has none")
        return req

    async def generate(self, req: EngineRequest) -> AsyncIterator[Delta]:
        """Queue `req` and yield its deltas as rounds commit; the last has finish_reason and stats.
        Stopping the iteration (or cancelling its task) frees the request's slot at the next step."""
        req = self._check(req)
        prompt = list(req.prompt_ids)
        seq = Sequence(req.rid, prompt, req.max_tokens, frozenset() if req.ignore_eos else self.eos_ids)
        r = _Request(req, seq, None if self.tokenizer is None else Detokenizer(self.tokenizer, prompt))
        self._waiting.append(r)
        if self._task is None or self._task.done():
            # A fresh context: the loop must not inherit this request's (under Serve, Ray counts actor
            # calls made in a request's context as its children and cancels them with it).
            self._task = asyncio.get_running_loop().create_task(self._run(), context=contextvars.Context())
        try:
            while True:
                item = await r.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            r.gone = True

    async def shutdown(self) -> None:
        """Stop the loop (in-flight requests fail with EngineStopped) and release the workers."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.workers.shutdown()

    # ---- the step loop -----------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while self._waiting or self._running:
                await self.step()
                await asyncio.sleep(0)  # let consumers take their deltas
                if not (self._waiting or self._running):
                    await self.workers.flush()  # idle: the workers free finished sequences' slots now
        except BaseException as e:
            reason = EngineStopped("engine shut down") if isinstance(e, asyncio.CancelledError) else e
            self._retire(list(self._running.values()), reason)
            for r in self._waiting:
                r.queue.put_nowait(reason)
            self._waiting.clear()
            raise

    async def step(self) -> None:
        """One step: drop abandoned requests, admit, one round for all running, stream, retire. The
        text of the previous round is detokenised and streamed while this round runs."""
        self._waiting = deque(r for r in self._waiting if not r.gone)
        gone = [r for r in self._running.values() if r.gone]
        self.num_cancelled += len(gone)
        self._retire(gone)
        await self._admit()
        if not self._running:
            return
        round_ = asyncio.ensure_future(self.workers.round(list(self._running)))
        await asyncio.sleep(0)  # the round's task submits its work before the flush
        self._flush()
        try:
            results = await round_
        except Exception as e:  # noqa: BLE001 -- a failed round fails its requests, not the engine
            self._retire(list(self._running.values()), e)
            return
        self.num_rounds += 1
        finished = []
        for rid, result in results.items():
            r = self._running[rid]
            if self._commit(r, result):
                finished.append(r)
        self._retire(finished)

    async def _admit(self) -> None:
        batch = [self._waiting.popleft() for _ in range(min(len(self._waiting), self.workers.free_slots()))]
        if not batch:
            return
        try:
            await self.workers.add([r.req for r in batch])
        except Exception as e:  # noqa: BLE001 -- a failed admission fails its requests, not the engine
            self.workers.remove([r.req.rid for r in batch])
            self.num_failed += len(batch)
            for r in batch:
                r.queue.put_nowait(e)
            return
        self._running.update((r.req.rid, r) for r in batch)

    def _commit(self, r: _Request, result: RoundResult) -> bool:
        """Append one round's tokens to r (cut at EOS or max_tokens); True if r finished. A finished
        request, or one with stop strings (which need the text to finish), streams at once; the
        others' tokens wait for `_flush`, while the next round runs."""
        r.seq.stats.record(result.depth, result.outcome, result.stats)
        r.fresh += r.seq.extend(list(result.tokens))
        if r.seq.finish_reason or r.req.stop:
            self._emit(r)  # may finish r at a stop string
        return r.seq.finish_reason is not None

    def _flush(self) -> None:
        """Stream every running request's committed tokens not streamed yet."""
        for r in self._running.values():
            if r.fresh:
                self._emit(r)

    def _emit(self, r: _Request) -> None:
        """Detokenise r's fresh tokens, cut at a stop string, and stream them as one delta."""
        seq, kept, r.fresh = r.seq, r.fresh, []
        start = len(seq.output) - len(kept)
        if r.detok is not None:
            for i, token in enumerate(kept):
                seen = len(r.text)
                r.text += r.detok.push(token)
                if self._cut_at_stop(r, seen):
                    kept = kept[:i + 1]
                    del seq.output[start + i + 1:]
                    seq.finish_reason = "stop"
                    break
        end = len(r.text) if seq.finish_reason else max(r.sent, len(r.text) - r.holdback)
        text, r.sent = r.text[r.sent:end], end
        stats = copy.deepcopy(seq.stats) if seq.finish_reason else None
        r.queue.put_nowait(Delta(seq.rid, tuple(kept), text, seq.finish_reason, stats))

    @staticmethod
    def _cut_at_stop(r: _Request, seen: int) -> bool:
        """Cut r.text at the earliest stop string that ends after character `seen`; True if one did."""
        hits = [i for s in r.req.stop if (i := r.text.find(s, max(0, seen - len(s) + 1))) >= 0]
        if hits:
            r.text = r.text[:min(hits)]
        return bool(hits)

    def _retire(self, requests: list[_Request], error: BaseException | None = None) -> None:
        """Free the requests' slots; with an error, it is what their consumers receive."""
        if not requests:
            return
        for r in requests:
            del self._running[r.req.rid]
            if error is not None:
                r.queue.put_nowait(error)
                self.num_failed += 1
            elif r.seq.finish_reason:
                self.totals.merge(r.seq.stats)
                self.num_finished += 1
        self.workers.remove([r.req.rid for r in requests])
