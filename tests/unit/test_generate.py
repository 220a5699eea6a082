"""End to end, in process: every mode is lossless.

Greedy: each mode's output equals transformers' own greedy decoding of the target, token for token,
for a batch of prompts of different lengths. Sampling: the joint law of the first three generated
tokens equals the target's exact law (chi-square), and a broken rule is caught."""
from __future__ import annotations

import itertools

import pytest
import torch
from conftest import make_pair
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM

from specray.core import verify as verify_mod
from specray.core.generate import generate
from specray.core.loader import load_shard
from specray.core.sampling import SamplingParams
from specray.core.speculation import SpeculationConfig

MODES = [
    SpeculationConfig("off"),
    SpeculationConfig("chain", 4),
    SpeculationConfig("chain", 1),
    SpeculationConfig("tree", 3, (3, 2, 1)),
    SpeculationConfig("tree", 2, (2, 2), with_replacement=True),
    SpeculationConfig("async", 3),
    SpeculationConfig("async", 2, fan_out=(0, 0, 0), backup="fast"),
]


def hf_greedy(path: str, prompt: list[int], n: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("spec", MODES, ids=lambda s: f"{s.mode}-{s.num_speculative_tokens}-{s.branching}")
def test_greedy_equals_target_greedy(tiny_pair, spec):
    target_dir, draft_dir = tiny_pair
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (1, 5, 12, 30)]
    expected = [hf_greedy(target_dir, p, 64) for p in prompts]
    target, draft = load_shard(target_dir), load_shard(draft_dir)
    outs = generate([target], draft, prompts, SamplingParams(), spec, max_tokens=64)
    for out, want in zip(outs, expected):
        assert out.token_ids == want
        assert out.finish_reason == "length"
    if spec.mode != "off":
        assert sum(o.stats.num_accepted_tokens for o in outs) > 0  # the draft really helped somewhere


def test_greedy_with_split_target(tiny_pair):
    target_dir, draft_dir = tiny_pair
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    whole = generate([load_shard(target_dir)], load_shard(draft_dir), prompts, SamplingParams(),
                     SpeculationConfig("tree", 2, (2, 2)), max_tokens=40)
    split = generate([load_shard(target_dir, 0, 1), load_shard(target_dir, 1, 2)], load_shard(draft_dir), prompts,
                     SamplingParams(), SpeculationConfig("tree", 2, (2, 2)), max_tokens=40)
    assert [o.token_ids for o in whole] == [o.token_ids for o in split]


def exact_joint(target_dir: str, prompt: list[int], params: SamplingParams, n: int = 3) -> dict:
    """P(first n tokens) under the target with the request's temperature/top-p, by enumeration."""
    from specray.core.sampling import target_probs
    model = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    vocab = model.config.vocab_size
    law = {(): 1.0}
    for _ in range(n):
        prefixes = list(law)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + list(p) for p in prefixes])).logits[:, -1:]
        probs = target_probs(logits.float(), [params] * len(prefixes))[:, 0]
        law = {p + (t,): law[p] * probs[i, t].item() for i, p in enumerate(prefixes) for t in range(vocab)}
    return law


def sample_first_tokens(pair, spec, params, runs=3000):
    target_dir, draft_dir = pair
    prompt = [1, 2, 3]
    outs = generate([load_shard(target_dir)], load_shard(draft_dir), [prompt] * runs,
                    [SamplingParams(params.temperature, params.top_k, params.top_p, seed=i) for i in range(runs)],
                    spec, max_tokens=3)
    return [tuple(o.token_ids[:3]) for o in outs], exact_joint(target_dir, prompt, params)


def chi2_pvalue(samples, law) -> float:
    counts = {k: 0 for k in law}
    for s in samples:
        counts[s] += 1
    n = len(samples)
    cells = sorted(law, key=law.get, reverse=True)
    obs, exp, rest_o, rest_e = [], [], 0, 0.0
    for c in cells:
        if law[c] * n >= 5:
            obs.append(counts[c])
            exp.append(law[c] * n)
        else:
            rest_o += counts[c]
            rest_e += law[c] * n
    if rest_e > 0:
        obs.append(rest_o)
        exp.append(rest_e)
    total = sum(exp)
    return chisquare(obs, [e * n / total for e in exp]).pvalue


SAMPLED = [
    (SpeculationConfig("chain", 2), SamplingParams(1.0)),
    (SpeculationConfig("chain", 3), SamplingParams(1.0, top_k=3)),
    (SpeculationConfig("tree", 2, (2, 2)), SamplingParams(0.8, top_p=0.9)),
    (SpeculationConfig("tree", 2, (3, 1), with_replacement=True), SamplingParams(1.0)),
    (SpeculationConfig("off"), SamplingParams(1.0, top_k=5)),
    (SpeculationConfig("async", 2), SamplingParams(1.0)),
    (SpeculationConfig("async", 2, saguaro_c=0.5), SamplingParams(1.0)),
    (SpeculationConfig("async", 2, fan_out=(1, 0, 0), backup="fast"), SamplingParams(1.0)),
    (SpeculationConfig("async", 2, fan_out=(0, 1, 0), backup="neural"), SamplingParams(0.7, top_p=0.9)),
]


@pytest.mark.parametrize("spec,params", SAMPLED, ids=lambda x: str(getattr(x, "mode", "")) or None)
def test_first_three_tokens_follow_target_law(small_vocab_pair, spec, params):
    samples, law = sample_first_tokens(small_vocab_pair, spec, params)
    assert chi2_pvalue(samples, law) > 1e-3


def test_broken_rule_is_caught(tmp_path, monkeypatch):
    """Accepting every draft token (ignoring p/q) must fail the same test, for a draft that differs
    from the target as much as a real one does."""
    pair = make_pair(tmp_path, vocab=8, seed=1, noise=2.0, scale=2.0)
    class AlwaysAccept(verify_mod.TorchRng):  # trees: the host walk
        def accept(self, prob: float) -> bool:
            return True
    monkeypatch.setattr("specray.core.target.TorchRng", AlwaysAccept)
    chains = verify_mod.verify_chains  # chains: on the device, uniforms of 0 accept every token with p > 0
    monkeypatch.setattr("specray.core.target.verify_chains", lambda tokens, p, q, u: chains(tokens, p, q, 0 * u))
    for spec in (SpeculationConfig("chain", 2), SpeculationConfig("tree", 2, (2, 1))):
        samples, law = sample_first_tokens(pair, spec, SamplingParams(1.0))
        assert chi2_pvalue(samples, law) < 1e-6


def test_stats_are_consistent(tiny_pair):
    target_dir, draft_dir = tiny_pair
    (out,) = generate([load_shard(target_dir)], load_shard(draft_dir), [[1, 2, 3]], SamplingParams(),
                      SpeculationConfig("chain", 3), max_tokens=50)
    s = out.stats
    assert s.num_draft_tokens == 3 * s.num_steps
    assert sum(s.accepted_per_position) == s.num_accepted_tokens
    assert all(a >= b for a, b in itertools.pairwise(s.accepted_per_position))
    assert s.num_steps + s.num_accepted_tokens >= 50  # every round commits accepted + 1 tokens


def test_ssd_hits_everything_when_draft_is_target(tiny_pair):
    """With the target as its own draft at temperature 0, every outcome is the predicted full accept."""
    target_dir, _ = tiny_pair
    outs = generate([load_shard(target_dir)], load_shard(target_dir), [[1, 2, 3], [7, 8]], SamplingParams(),
                    SpeculationConfig("async", 3), max_tokens=40)
    for out in outs:
        s = out.stats
        assert s.cache_lookups == s.num_steps - 1  # every round after the first looks up
        assert s.cache_hits == s.cache_lookups and s.cache_hit_rate == 1.0
        assert s.num_accepted_tokens == s.num_draft_tokens


def test_ssd_misses_are_counted(tiny_pair):
    target_dir, draft_dir = tiny_pair
    (out,) = generate([load_shard(target_dir)], load_shard(draft_dir), [[1, 2, 3]], SamplingParams(1.0, seed=3),
                      SpeculationConfig("async", 3, fan_out=(1, 1, 1, 1), backup="neural"), max_tokens=60)
    s = out.stats
    assert 0 < s.cache_lookups and 0 <= s.cache_hits < s.cache_lookups
