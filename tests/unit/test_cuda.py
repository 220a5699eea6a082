"""The runtime on a GPU: logits against transformers in fp32 and bf16, greedy equality in every mode
(trees included), seeded sampled replay. Marked `gpu`; skipped where CUDA is not available.

SPECRAY_TEST_DEVICE=cpu runs the same checks on the CPU (to check the tests themselves)."""
from __future__ import annotations

import os

import pytest
import torch
from test_model_parity import CASES, hf_logits, make_hf_model, make_sequences, specray_logits

from specray.core.generate import generate
from specray.core.loader import load_shard
from specray.core.sampling import SamplingParams
from specray.core.speculation import SpeculationConfig

DEVICE = torch.device(os.environ.get("SPECRAY_TEST_DEVICE", "cuda"))
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")]

MODES = [
    SpeculationConfig("off"),
    SpeculationConfig("chain", 4),
    SpeculationConfig("tree", 3, (3, 2, 1)),
    SpeculationConfig("tree", 2, (2, 2), with_replacement=True),
    SpeculationConfig("async", 3),
]


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.bfloat16, None)])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_logits_match_transformers_on_the_device(family, dtype, atol, tmp_path):
    class_name, overrides = CASES[family]
    model = make_hf_model(class_name, **overrides)
    model.save_pretrained(tmp_path)
    seqs = make_sequences(model.config.vocab_size)
    want = hf_logits(model, seqs)  # fp32 on the CPU, the reference
    shard = load_shard(str(tmp_path), dtype=dtype, device=DEVICE)
    assert next(shard.parameters()).device.type == DEVICE.type and shard.new_cache(1, 4).kv[0].device.type == DEVICE.type
    for got, ref in zip(specray_logits(shard, seqs), want):
        got = got.float().cpu()
        if atol is not None:
            torch.testing.assert_close(got, ref, atol=atol, rtol=0)
        else:  # bf16: close in scale, same argmax almost everywhere
            assert (got - ref).abs().max() < 0.1 * ref.abs().max()
            assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8


@pytest.mark.parametrize("spec", MODES, ids=lambda s: f"{s.mode}-{s.num_speculative_tokens}-{s.branching}")
def test_greedy_equals_target_greedy_on_the_device(spec, tiny_pair):
    target, draft = (load_shard(p, dtype=torch.float32, device=DEVICE) for p in tiny_pair)
    prompts = [[3, 14, 15, 92], [65, 35], [8, 97 - 1, 2, 7, 1, 8, 28]]
    want = generate([target], None, prompts, SamplingParams(), SpeculationConfig("off"), 12)
    got = generate([target], draft, prompts, SamplingParams(), spec, 12)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


@pytest.mark.parametrize("spec", MODES[1:], ids=lambda s: f"{s.mode}-{s.num_speculative_tokens}-{s.branching}")
def test_seeded_sampling_replays_on_the_device(spec, tiny_pair):
    target, draft = (load_shard(p, dtype=torch.float32, device=DEVICE) for p in tiny_pair)
    params = [SamplingParams(0.9, seed=s) for s in (1, 2)]
    runs = [generate([target], draft, [[5, 6, 7], [9, 10]], params, spec, 16) for _ in range(2)]
    assert [c.token_ids for c in runs[0]] == [c.token_ids for c in runs[1]]
    assert all(len(c.token_ids) == 16 for c in runs[0])
