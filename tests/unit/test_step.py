"""The step (core.step.run_step) through the worker classes in process: the deferred commit, removal
and admission in one `Work`, and hidden states kept on the device between stages (the graph
transport's NCCL path) give the same results as host arrays."""
from __future__ import annotations

import torch

from specray.actors.draft_worker import DraftWorker
from specray.actors.target_stage import TargetStageWorker
from specray.core.sampling import SamplingParams
from specray.core.speculation import SpeculationConfig
from specray.core.step import Admission, Work, direct, run_step


def _generate(pair, device_hidden: bool, mode: SpeculationConfig, n: int = 20) -> list[int]:
    target, draft = pair
    drafter = DraftWorker(draft, 2, 128, num_threads=1)
    stages = [TargetStageWorker(target, a, b, 2, 128, num_threads=1, device_hidden=device_hidden)
              for a, b in ((0, 1), (1, 2))]
    work, out = Work(add=(Admission("a", (3, 14, 15, 92), SamplingParams(), mode),), rids=("a",)), []
    while len(out) < n:
        results = run_step(direct, drafter, stages, work)
        out += results["a"].tokens
        work = Work({"a": results["a"].outcome}, rids=("a",))
    run_step(direct, drafter, stages, Work({"a": results["a"].outcome}, remove=("a",)))
    assert drafter.num_free() == 2 and [s.num_free() for s in stages] == [2, 2]
    return out[:n]


def test_device_hidden_states_equal_host_arrays(tiny_pair):
    for mode in (SpeculationConfig("chain", 3), SpeculationConfig("async", 2)):
        assert _generate(tiny_pair, True, mode) == _generate(tiny_pair, False, mode)


def test_tensors_pass_the_wire_as_they_are():
    from specray.actors.wire import hidden_from_wire, hidden_to_wire
    h = torch.randn(1, 3, 4)
    assert hidden_from_wire(h, torch.device("cpu")) is h
    assert torch.equal(hidden_from_wire(hidden_to_wire(h), torch.device("cpu")), h)
