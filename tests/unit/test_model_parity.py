"""specray's `Shard` gives transformers' logits on tiny random checkpoints of every supported family.

Each case builds a randomly initialised transformers model (every weight, norm and bias redrawn so
that none is a trivial 0 or 1), saves it, loads it with `load_shard`, and runs a batch of two
sequences of different lengths: one right-padded prefill call (`num_valid`), then one-token
decode calls. transformers runs each full sequence alone, unpadded, as the reference. Also:
sharded safetensors, tied embeddings, bf16/fp16, and a GGUF round trip written with `gguf`."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from specray.core.loader import checkpoint_names, load_shard, load_tokenizer

TINY = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CASES = {
    "llama": ("LlamaForCausalLM", {}),
    "llama3_rope": ("LlamaForCausalLM", {"head_dim": 16, "rope_parameters": LLAMA3_ROPE}),
    "llama_bias": ("LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True}),
    "mistral": ("MistralForCausalLM", {}),
    "qwen2": ("Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3ForCausalLM", {"head_dim": 16, "num_key_value_heads": 1}),
}
PROMPT_LENS = (7, 3)  # two sequences of different lengths, prefilled together
DECODE_STEPS = 3
ATOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: extra intra-op threads only add overhead (20x on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_hf_model(class_name: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A tiny transformers model with every parameter redrawn: weights ~ N(0, 0.2), norms ~ 1 + N(0, 0.2)."""
    cls = getattr(transformers, class_name)
    torch.manual_seed(seed)
    model = cls(cls.config_class(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model


def make_sequences(vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n + DECODE_STEPS,), generator=g).tolist() for n in PROMPT_LENS]


@torch.no_grad()
def hf_logits(model, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Reference: each sequence alone, whole, no padding.  Each [T_b, V] fp32."""
    return [model(torch.tensor([s])).logits[0].float() for s in seqs]


def specray_logits(shard, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Prefill the prompts in one padded call, then feed the remaining tokens one per call.  Each [T_b, V]."""
    cache = shard.new_cache(num_slots=3, max_len=32)
    cache.allocate()  # keep slot 0 busy so the sequences sit in slots other than 0..B-1
    slots = torch.tensor([cache.allocate() for _ in seqs])  # [B]
    lens = torch.tensor(PROMPT_LENS)  # [B]
    n = int(lens.max())
    x = torch.zeros(len(seqs), n, dtype=torch.long)  # [B, n], right-padded with token 0
    for b, s in enumerate(seqs):
        x[b, :lens[b]] = torch.tensor(s[:lens[b]])
    positions = torch.arange(n).expand(len(seqs), n)  # [B, n]
    causal = torch.ones(n, n, dtype=torch.bool).tril().expand(len(seqs), n, n)  # [B, n, n]
    h = shard(x, cache, slots, positions, cache.lengths[slots].clone(), causal, num_valid=lens)
    out = [[shard.logits(h[b, :lens[b]])] for b in range(len(seqs))]
    for t in range(DECODE_STEPS):
        x = torch.tensor([[s[lens[b] + t]] for b, s in enumerate(seqs)])  # [B, 1]
        base = cache.lengths[slots].clone()  # [B]
        h = shard(x, cache, slots, base[:, None], base, torch.ones(len(seqs), 1, 1, dtype=torch.bool))
        for b in range(len(seqs)):
            out[b].append(shard.logits(h[b]))
    return [torch.cat(o) for o in out]


def assert_parity(shard, model, atol: float = ATOL) -> None:
    seqs = make_sequences(model.config.vocab_size)
    for got, want in zip(specray_logits(shard, seqs), hf_logits(model, seqs)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=atol, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    class_name, overrides = CASES[case]
    model = make_hf_model(class_name, **overrides)
    model.save_pretrained(tmp_path)
    shard = load_shard(str(tmp_path))
    assert shard.cfg.family == model.config.model_type
    assert_parity(shard, model)


def test_sharded_checkpoint(tmp_path):
    model = make_hf_model("LlamaForCausalLM")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert_parity(load_shard(str(tmp_path)), model)


@pytest.mark.parametrize("class_name", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_tied_embeddings(class_name, tmp_path):
    model = make_hf_model(class_name, tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    shard = load_shard(str(tmp_path))
    assert shard.cfg.tie_word_embeddings
    assert torch.equal(shard.lm_head.weight, shard.embed_tokens.weight)
    assert_parity(shard, model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_fp32(dtype, tmp_path):
    model = make_hf_model("Qwen3ForCausalLM", **CASES["qwen3"][1])
    model.save_pretrained(tmp_path)
    seqs = make_sequences(model.config.vocab_size)
    full = specray_logits(load_shard(str(tmp_path)), seqs)
    shard = load_shard(str(tmp_path), dtype=dtype)
    assert next(shard.parameters()).dtype == dtype and shard.new_cache(1, 4).kv[0].dtype == dtype
    half = specray_logits(shard, seqs)
    for got, want in zip(half, full):
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        assert (got - want).abs().max() < 0.1 * want.abs().max()
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8


# --- GGUF ---------------------------------------------------------------------------------------

GGUF_LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                    "post_attention_layernorm": "ffn_norm"}
GGUF_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                  "lm_head.weight": "output.weight"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (interleaved RoPE halves); transformers' GGUF loader undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, path) -> None:
    """Export a transformers Llama to an F32 GGUF file, with the metadata and a toy tokenizer section."""
    gguf = pytest.importorskip("gguf")
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_rope_dimension_count(c.head_dim)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(c.vocab_size)])
    w.add_token_scores([0.0] * c.vocab_size)
    w.add_token_types([1] * c.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # a tied GGUF has no output.weight
        a = t.float().numpy()
        if name in GGUF_TOP_NAMES:
            gguf_name = GGUF_TOP_NAMES[name]
        else:
            _, _, layer, rest = name.split(".", 3)  # model.layers.{i}.{module}.{weight|bias}
            module, suffix = rest.rsplit(".", 1)
            gguf_name = f"blk.{layer}.{GGUF_LAYER_NAMES[module]}.{suffix}"
            if module == "self_attn.q_proj":
                a = llama_cpp_permute(a, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                a = llama_cpp_permute(a, c.num_key_value_heads)
        w.add_tensor(gguf_name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_round_trip(tied, tmp_path):
    model = make_hf_model("LlamaForCausalLM", tie_word_embeddings=tied)
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(model, path)
    shard = load_shard(str(path))
    assert shard.cfg.family == "llama" and shard.cfg.tie_word_embeddings == tied
    state = model.state_dict()
    for name, t in shard.state_dict().items():  # fused projections: their parts stacked
        torch.testing.assert_close(t, torch.cat([state[hf] for hf in checkpoint_names(name, 0)]),
                                   atol=0, rtol=0, msg=name)
    assert_parity(shard, model)
    tokenizer = load_tokenizer(str(path))  # built from the GGUF tokenizer section
    assert tokenizer.convert_ids_to_tokens([5, 17]) == ["<t5>", "<t17>"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)


def test_a_gguf_stage_dequantises_only_its_own_layers(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    model = make_hf_model("LlamaForCausalLM", num_hidden_layers=3)
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(model, path)
    dequantised, dequantize = [], gguf.dequantize

    def counting(data, kind):
        dequantised.append(data.shape)
        return dequantize(data, kind)
    monkeypatch.setattr(gguf, "dequantize", counting)
    shard = load_shard(str(path), 1, 2)  # a middle stage: layer 1 only, 9 tensors
    assert len(dequantised) == 9 and not hasattr(shard, "embed_tokens") and not hasattr(shard, "lm_head")
    state = model.state_dict()
    for name, t in shard.state_dict().items():
        torch.testing.assert_close(t, torch.cat([state[hf] for hf in checkpoint_names(name, 1)]), atol=0, rtol=0)
