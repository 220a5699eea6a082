"""`specray bench round`: what one verification round costs the pure-torch runtime, in process, no Ray.

For each mode and batch size it drafts and verifies `rounds` rounds of the held-out code prompts
(core.step.run_step over a Drafter and the target stages, as core.generate does) and prints the
milliseconds, the torch ops and the host reads per round, and tokens per round. Ops are counted at
the dispatcher: every aten call a round makes, each a kernel launch on a GPU. Host reads are the
calls that make the host wait for a device value (`.item()`, `int(t)`, a copy to the host); on a GPU
each is a synchronisation, on the CPU only the scalar reads show (a copy to the host is then no copy).
These are the figures the GPU runtime is judged by: launches and syncs per step."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from specray.bench.engine_runner import mode_spec
from specray.bench.workload import load_set
from specray.core.drafter import Drafter
from specray.core.generate import SequentialDraft
from specray.core.model import Shard
from specray.core.sampling import SamplingParams
from specray.core.step import Admission, Work, direct, run_step
from specray.core.target import TargetStage

_SCALAR_READ = torch.ops.aten._local_scalar_dense.default
_COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)


class OpCounter(TorchDispatchMode):
    """Counts the aten calls made while active, and those that read a device value on the host."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if func is _SCALAR_READ or (func in _COPIES and _to_host(func, args, kwargs)):
            self.host_reads += 1
        return func(*args, **kwargs)


def _to_host(func, args, kwargs) -> bool:
    """A copy from a device tensor into host memory."""
    if func is torch.ops.aten._to_copy.default:
        src, dst = args[0], kwargs.get("device")
        return dst is not None and torch.device(dst).type == "cpu" and src.device.type != "cpu"
    dst, src = args[0], args[1]
    return dst.device.type == "cpu" and isinstance(src, torch.Tensor) and src.device.type != "cpu"


@dataclass
class RoundCost:
    mode: str
    batch: int
    ms: float             # wall time per round
    ops: float            # aten calls per round
    host_reads: float     # device values read on the host per round
    tokens: float         # tokens committed per round and sequence


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile(target: list[Shard], draft: Shard, prompts: list[list[int]], mode: str, batch: int, rounds: int,
            temperature: float) -> RoundCost:
    """`rounds` timed rounds of `batch` sequences in `mode` after one warm-up round (which admits them),
    then `rounds` counted ones (counting at the dispatcher costs host time of its own)."""
    spec = mode_spec(mode)
    device = next(target[0].parameters()).device
    prompts = [prompts[b % len(prompts)] for b in range(batch)]
    max_len = max(map(len, prompts)) + (2 * rounds + 1) * (spec.tree.depth + 1) + spec.draft_rows
    drafter = Drafter(draft, batch, max_len)
    stages = [TargetStage(s, batch, max_len, draft_head=draft.lm_head if s.is_last else None) for s in target]
    rids = tuple(str(b) for b in range(batch))
    add = tuple(Admission(rid, tuple(p), SamplingParams(temperature, seed=b), spec)
                for b, (rid, p) in enumerate(zip(rids, prompts)))
    draft_side = SequentialDraft(drafter)
    results = run_step(direct, draft_side, stages, Work(add=add, rids=rids))
    tokens = 0

    def step():
        nonlocal results, tokens
        results = run_step(direct, draft_side, stages, Work({r: x.outcome for r, x in results.items()}, rids=rids))
        tokens += sum(len(x.tokens) for x in results.values())

    _sync(device)
    start = time.perf_counter()
    for _ in range(rounds):
        step()
    _sync(device)
    ms = (time.perf_counter() - start) * 1e3 / rounds
    with OpCounter() as counter:
        for _ in range(rounds):
            step()
    return RoundCost(mode, batch, ms, counter.ops / rounds, counter.host_reads / rounds, tokens / (2 * rounds) / batch)


def run(target: list[Shard], draft: Shard, tokenizer, modes: list[str], batches: list[int], rounds: int,
        temperature: float) -> list[RoundCost]:
    prompts = [tokenizer.encode(p.text, add_special_tokens=False) for p in load_set("code")]
    return [profile(target, draft, prompts, mode, batch, rounds, temperature) for batch in batches for mode in modes]


def markdown(rows: list[RoundCost]) -> str:
    lines = ["| mode | batch | ms / round | torch ops / round | host reads / round | tokens / round |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r.mode} | {r.batch} | {r.ms:.2f} | {r.ops:.0f} | {r.host_reads:.1f} | {r.tokens:.2f} |" for r in rows]
    return "\n".join(lines)
