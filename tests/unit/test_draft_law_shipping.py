"""The draft's law crosses to the last target stage as the draft's hidden states: the stage recomputes,
with its copy of the draft's LM head, exactly the law every child was drawn from (Saguaro weights,
top-p and the SSD branches' laws included), and a greedy request ships none."""
from __future__ import annotations

import pytest
import torch

from specray.actors.wire import specs_from_wire, specs_nbytes, specs_to_wire
from specray.core import drafter as drafter_mod
from specray.core.drafter import Drafter
from specray.core.loader import load_lm_head, load_shard
from specray.core.sampling import SamplingParams
from specray.core.speculation import SpeculationConfig
from specray.core.step import Admission, Work
from specray.core.target import TargetStage


@pytest.fixture
def drawn(monkeypatch) -> list[torch.Tensor]:
    """Every law the drafter draws children from: on the host (draw_children, trees) or where the law
    is (draw_rows, one child per row)."""
    laws, children, rows = [], drafter_mod.draw_children, drafter_mod.draw_rows
    monkeypatch.setattr(drafter_mod, "draw_children", lambda probs, *args: laws.append(probs.clone()) or children(probs, *args))
    monkeypatch.setattr(drafter_mod, "draw_rows", lambda probs, *args: laws.extend(probs.clone()) or rows(probs, *args))
    return laws


def law_rows(specs, laws: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The recomputed law of every row that has children (leaf rows are unused)."""
    return [laws[s.rid][row] for s in specs for row in range(1 + s.tree.num_nodes)
            if s.tree.children(row - 1)]


def assert_same_laws(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for law in want:
        assert any(torch.allclose(law, row, atol=1e-6, rtol=0) for row in got)


def test_the_last_stage_recomputes_the_law_every_child_was_drawn_from(tiny_pair, drawn):
    target_dir, draft_dir = tiny_pair
    drafter = Drafter(load_shard(draft_dir), 2, 256)
    work = Work(add=(Admission("a", (5, 17, 3), SamplingParams(0.9, top_p=0.95, seed=1),
                               SpeculationConfig("async", 3, saguaro_c=0.3)),
                     Admission("b", (4, 4), SamplingParams(1.2, seed=2), SpeculationConfig("tree", 2, (2, 2)))),
                rids=("a", "b"))
    specs = specs_from_wire(specs_to_wire(drafter.propose(work)))
    stage = TargetStage(load_shard(target_dir), 2, 256, draft_head=load_lm_head(draft_dir))
    stage.apply(work, None)
    assert specs[0].fan_out and any(specs[0].row_fans())  # Saguaro is at work on a's rows
    assert_same_laws(law_rows(specs, stage._draft_laws(specs)), drawn)

    drawn.clear()
    drafter.prepare(work)  # SSD: the next round for a's likely outcomes, each with its own laws
    branches = drafter.seqs["a"].cache.branches
    assert branches
    rows = [row for b in branches for row in law_rows([b], stage._draft_laws([b]))]  # they share a's rid
    assert_same_laws(rows, drawn)


def test_greedy_ships_no_law_and_sampled_needs_the_head(tiny_pair):
    target_dir, draft_dir = tiny_pair
    drafter = Drafter(load_shard(draft_dir), 2, 256)
    work = Work(add=(Admission("g", (5, 17), SamplingParams(), SpeculationConfig("chain", 4)),
                     Admission("s", (5, 17), SamplingParams(1.0, seed=0), SpeculationConfig("chain", 4))),
                rids=("g", "s"))
    greedy, sampled = specs_to_wire(drafter.propose(work))
    hidden = drafter.shard.cfg.hidden_size
    assert specs_nbytes([greedy]) < 200 and specs_nbytes([sampled]) >= 5 * hidden * 4  # [1+K, H] fp32
    stage = TargetStage(load_shard(target_dir), 2, 256)  # no draft head
    stage.apply(work, None)
    assert stage._draft_laws(specs_from_wire([greedy])) == {}
    with pytest.raises(RuntimeError, match="LM head"):
        stage._draft_laws(specs_from_wire([sampled]))


def test_a_mixed_batch_verifies_each_request_as_it_would_alone(tiny_pair):
    """Greedy rows take the argmax fast path, sampled ones the full walk, in one verification."""
    target_dir, draft_dir = tiny_pair
    admit = {"g": Admission("g", (5, 17), SamplingParams(), SpeculationConfig("tree", 2, (2, 1))),
             "s": Admission("s", (5, 17), SamplingParams(1.0, seed=0), SpeculationConfig("chain", 3))}

    def verify(rids):
        drafter = Drafter(load_shard(draft_dir), 2, 256)
        stage = TargetStage(load_shard(target_dir), 2, 256, draft_head=load_lm_head(draft_dir))
        work = Work(add=tuple(admit[r] for r in rids), rids=rids)
        return stage.verify(work, specs_from_wire(specs_to_wire(drafter.propose(work))))

    both = verify(("g", "s"))
    assert both["g"] == verify(("g",))["g"] and both["s"] == verify(("s",))["s"]
