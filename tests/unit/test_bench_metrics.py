"""`specray bench`'s pure parts: latency metrics from known timestamps, percentiles, speculation
metrics, the round split, the exactness check, the Goals ratios, and the shipped prompt sets."""
from __future__ import annotations

import ast
import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from specray.bench import make_prompts
from specray.bench.engine_runner import mode_spec
from specray.bench.metrics import (
    Measurement,
    Trace,
    identical,
    latency_metrics,
    percentile,
    round_split,
    row,
    speculation_metrics,
    summary_ms,
)
from specray.bench.report import goals, table
from specray.bench.settings import BenchConfig
from specray.bench.workload import load_set, select
from specray.core.sequence import SpecStats
from specray.core.speculation import SpeculationConfig

ROOT = Path(__file__).resolve().parents[2]


def trace(start: float, chunks: list[tuple[float, list[int]]]) -> Trace:
    t = Trace(start)
    for when, ids in chunks:
        t.add(when, ids)
    return t


@pytest.mark.parametrize("values, q, expected", [
    ([1, 2, 3, 4], 50, 2.5), ([1, 2, 3, 4], 90, 3.7), ([1, 2, 3, 4], 99, 3.97), ([4, 1, 3, 2], 0, 1),
    ([4, 1, 3, 2], 100, 4), ([7], 99, 7), ([10, 20], 25, 12.5),
])
def test_percentile_known_values(values, q, expected):
    assert percentile(values, q) == pytest.approx(expected)


def test_percentile_matches_numpy_and_is_nan_when_empty():
    xs = list(np.random.default_rng(0).exponential(size=101))
    for q in (1, 50, 90, 99):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert math.isnan(percentile([], 50))


def test_ttft_tpot_itl_e2e_of_one_trace():
    """Sent at 10.0; chunks of 1, 3 and 1 tokens at 10.1, 10.3, 10.4; an empty chunk is not a chunk."""
    t = trace(10.0, [(10.1, [5]), (10.2, []), (10.3, [6, 7, 8]), (10.4, [9])])
    assert t.token_ids == [5, 6, 7, 8, 9] and t.sizes == [1, 3, 1]
    assert t.ttft == pytest.approx(0.1)
    assert t.e2e == pytest.approx(0.4)
    assert t.tpot == pytest.approx(0.3 / 4)
    assert t.itls == pytest.approx([0.2, 0.1])
    assert trace(0.0, [(0.5, [1])]).tpot is None


def test_latency_metrics_pool_requests_and_skip_failed_ones():
    a = trace(0.0, [(0.1, [1]), (0.3, [2, 3])])           # ttft 100, tpot 100, itl [200], e2e 300
    b = trace(0.2, [(0.4, [1]), (0.5, [2]), (0.9, [3])])  # ttft 200, tpot 250, itl [100, 400], e2e 700
    failed = trace(0.0, [(0.2, [1])])
    failed.error = "UNAVAILABLE"
    m = latency_metrics([a, b, failed], wall_s=1.0)
    assert (m["requests"], m["errors"], m["output_tokens"]) == (3, 1, 6)
    assert m["output_tokens_per_s"] == pytest.approx(6.0) and m["requests_per_s"] == pytest.approx(2.0)
    assert m["tokens_per_chunk"] == pytest.approx(6 / 5)
    assert m["ttft_ms"]["mean"] == pytest.approx(150) and m["ttft_ms"]["p50"] == pytest.approx(150)
    assert m["tpot_ms"]["mean"] == pytest.approx(175)
    assert m["itl_ms"]["p50"] == pytest.approx(200) and m["itl_ms"]["mean"] == pytest.approx(700 / 3)
    assert m["e2e_ms"]["p99"] == pytest.approx(300 + 400 * 0.99)
    assert math.isnan(summary_ms([])["p50"])


def test_speculation_metrics_follow_the_serving_names():
    stats = SpecStats(num_steps=4, num_draft_tokens=16, num_accepted_tokens=6, accepted_per_position=[3, 2, 1, 0])
    m = speculation_metrics(stats)
    assert m["acceptance_rate"] == pytest.approx(6 / 16)
    assert m["mean_acceptance_length"] == pytest.approx(2.5)
    assert m["acceptance_by_position"] == pytest.approx([0.75, 0.5, 0.25, 0.0])
    assert m["cache_hit_rate"] is None
    stats.cache_lookups, stats.cache_hits = 8, 6
    assert speculation_metrics(stats)["cache_hit_rate"] == pytest.approx(0.75)
    none = speculation_metrics(SpecStats())
    assert none["acceptance_rate"] is None and none["mean_acceptance_length"] is None


def test_round_split_subtracts_the_draft_only_on_the_critical_path():
    inline = round_split(1.0, 10, draft_s=0.4, verify_s=0.5, draft_overlapped=False)
    assert inline == pytest.approx({"rounds": 10, "round_ms": 100, "draft_ms": 40, "verify_ms": 50, "other_ms": 10})
    assert round_split(1.0, 10, 0.4, 0.5, draft_overlapped=True)["other_ms"] == pytest.approx(50)


def test_exact_compares_every_output_token_for_token():
    assert identical([[1, 2], [3]], [[1, 2], [3]]) == 2
    assert identical([[1, 2], [4]], [[1, 2], [3]]) == 1
    with pytest.raises(ValueError):
        identical([[1, 2]], [[1, 2], [3]])
    m = Measurement([trace(0.0, [(0.1, [1]), (0.2, [2])])], 0.2)
    assert row({"system": "x"}, m)["identical"] is None
    assert row({"system": "x"}, m, [[1, 2]])["identical"] == 1
    assert row({"system": "x"}, m, [[1, 3]])["identical"] == 0
    assert "| 0/1 |" in table([row({"system": "x"}, m, [[1, 3]])])


def _row(system, setting, prompts, tok_s, concurrency=1, ttft=10.0, **extra):
    return {"system": system, "setting": setting, "prompts": prompts, "concurrency": concurrency,
            "output_tokens_per_s": tok_s, "ttft_ms": {"p50": ttft}, **extra}


def test_goals_ratios():
    rows = [_row("hf", "greedy", "code", 100.0), _row("assisted", "K=4", "code", 50.0),
            _row("local", "chain", "code", 150.0), _row("local", "off", "code", 120.0, ttft=8.0),
            _row("local", "async", "code", 40.0, round_ms=60.0, verify_ms=12.0),
            _row("grpc", "off", "code", 90.0, ttft=20.0)]
    text = "\n".join(goals(rows, "greedy"))
    assert "local chain 150.0 tok/s = 1.50x transformers target-only" in text
    assert "= 3.00x transformers assisted K=4" in text
    assert "60.00 ms = 5.00x verification" in text
    assert "20.0 ms vs 8.0 ms in process: +12.0 ms (2.50x)" in text


def test_prompt_sets_have_their_counts_and_no_empty_or_newline_ended_prompts():
    code, prose = load_set("code"), load_set("prose")
    assert (len(code), len(prose)) == (48, 32)
    for p in code + prose:
        assert p.text.strip() and p.text == p.text.rstrip(), p.id
    assert len({p.id for p in code + prose}) == 80
    assert all("def " not in p.text and "\n" not in p.text and p.text[0].isupper() for p in prose)
    chosen = select(("code", "prose"), (8, 4))
    assert [len(v) for v in chosen.values()] == [8, 4] and chosen["code"] == code[:8]
    with pytest.raises(ValueError):
        select(("code",), (49,))
    with pytest.raises(ValueError):
        select(("code", "prose"), (1, 2, 3))


def test_code_prompts_come_from_held_out_modules_only():
    """HELD_OUT equals the training script's, every source lies under it, and each prompt's lines
    are lines of that stdlib file (checked where the stdlib sources are installed)."""
    tree = ast.parse((ROOT / "tools" / "train_demo_pair.py").read_text())
    trained = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                   and any(getattr(t, "id", None) == "HELD_OUT" for t in n.targets))
    assert make_prompts.HELD_OUT == trained
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for p in load_set("code"):
        path = p.source.rsplit(":", 1)[0]
        assert any(path.startswith(h) if h.endswith("/") else path == h for h in trained), p.source
        assert p.text.lstrip().startswith(("def ", "async def ")) and len(p.text.splitlines()) <= 2
        if (stdlib / path).is_file():
            lines = set((stdlib / path).read_text().splitlines())
            assert all(line in lines for line in p.text.splitlines()), p.source


def test_bench_modes_take_a_draft_length_and_reject_the_rest():
    assert mode_spec("chain") == SpeculationConfig("chain", 4)
    assert mode_spec("chain:2") == SpeculationConfig("chain", 2)
    assert mode_spec("async:6") == SpeculationConfig("async", 6)
    for bad in ("tree:2", "off:1", "chain:0", "chain:x", "beam"):
        with pytest.raises(ValueError, match="mode"):
            mode_spec(bad)
    assert BenchConfig.build(modes=("chain:2", "off")).modes == ("chain:2", "off")
    with pytest.raises(ValueError, match="K must be"):
        BenchConfig.build(modes=("chain:-1",))
    with pytest.raises(ValueError, match="none given"):
        BenchConfig.build(modes=())
    rows = [_row("local", "async:2", "code", 10.0, round_ms=20.0, verify_ms=8.0)]
    assert any("SSD round through local = 20.00 ms = 2.50x" in line for line in goals(rows, "greedy"))


def test_engine_settings_and_repeated_rows():
    from specray.bench.engine_bench import _median, engine_name, engine_setting
    from specray.engine import EngineConfig
    base = EngineConfig("t", "d")
    assert [engine_name(engine_setting(base, n)) for n in ("local", "ray", "ray:calls")] == \
        ["local", "ray:graph", "ray:calls"]
    for bad in ("gpu", "local:graph", "ray:nccl"):
        with pytest.raises(ValueError, match="unknown engine"):
            engine_setting(base, bad)
    rows = [{"engine": "local", "output_tokens_per_s": v, "cache_hit_rate": None, "batch": 1} for v in (3.0, 1.0, 2.0)]
    assert _median(rows) == {"engine": "local", "output_tokens_per_s": 2.0, "cache_hit_rate": None, "batch": 1,
                             "runs": 3}
