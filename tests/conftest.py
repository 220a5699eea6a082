"""Shared fixtures: tiny random target/draft pairs saved as HF checkpoints (nothing downloaded)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

# The test models are tiny: one thread avoids thread hand-off costs that dominate on a busy 2-core box.
torch.set_num_threads(1)


def make_pair(path, vocab: int, seed: int, noise: float, layers: int = 2, hidden: int = 32, scale: float = 4.0):
    """A random Llama target and a draft = target weights + noise; returns (target_dir, draft_dir)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, eos_token_id=None, bos_token_id=None)
    target = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(scale)  # peakier next-token distributions than a fresh init
    draft = LlamaForCausalLM(cfg).eval()
    draft.load_state_dict(target.state_dict())
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(noise * p.std() * torch.randn_like(p))
    dirs = path / "target", path / "draft"
    target.save_pretrained(dirs[0])
    draft.save_pretrained(dirs[1])
    return str(dirs[0]), str(dirs[1])


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """Vocab 97, 2 layers: for greedy equality and engine tests."""
    return make_pair(tmp_path_factory.mktemp("tiny"), vocab=97, seed=0, noise=0.3)


@pytest.fixture(scope="session")
def small_vocab_pair(tmp_path_factory):
    """Vocab 8: small enough to enumerate the target's joint law of three tokens."""
    return make_pair(tmp_path_factory.mktemp("v8"), vocab=8, seed=1, noise=0.5, scale=2.0)


@torch.no_grad()
def target_greedy(prompt_ids: list[int], n: int, path: str | None = None) -> list[int]:
    """The target's own greedy continuation (transformers, fp32, no EOS handling): n tokens.
    path: an HF checkpoint (default: the embedded demo target)."""
    from specray.assets import DEMO_TARGET
    model = AutoModelForCausalLM.from_pretrained(path or DEMO_TARGET, dtype=torch.float32).eval()
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    tokens = []
    for _ in range(n):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens
