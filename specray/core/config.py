"""Model configuration: the subset of a Hugging Face config.json that a Llama-family decoder needs.

Covers Llama, Mistral, Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm). Knows nothing of
weights or devices."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FAMILIES = {"llama", "mistral", "qwen2", "qwen3"}


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_llama3: tuple[float, float, float, int] | None = None  # factor, low, high, original max pos
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"model_type {self.family!r} is not supported; supported: {sorted(FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads {self.num_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_kv_heads}")

    @classmethod
    def from_hf(cls, d: dict) -> ModelConfig:
        """Parse a transformers config.json dictionary (4.x or 5.x layout)."""
        family = d.get("model_type", "")
        if family not in FAMILIES:
            raise ValueError(f"model_type {family!r} is not supported; supported: {sorted(FAMILIES)}")
        window = d.get("sliding_window") or 0
        if (d.get("use_sliding_window") or family == "mistral") and 0 < window < d.get("max_position_embeddings", 0):
            raise ValueError(f"sliding-window attention is not supported; sliding_window={window}")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        llama3 = None
        if rope_type == "llama3":
            llama3 = (float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                      int(rope["original_max_position_embeddings"]))
        elif rope_type != "default":
            raise ValueError(f"rope type {rope_type!r} is not supported (default and llama3 are)")
        eos = d.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        heads = d["num_attention_heads"]
        attention_bias = d.get("attention_bias", False)
        return cls(
            family=family,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
            rope_llama3=llama3,
            qkv_bias=True if family == "qwen2" else attention_bias,
            o_bias=attention_bias and family != "qwen2",
            mlp_bias=d.get("mlp_bias", False),
            qk_norm=family == "qwen3",
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos,
        )

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies, fp32.  # [head_dim // 2]"""
        inv = 1.0 / self.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
        if self.rope_llama3 is None:
            return inv
        factor, low, high, old_max = self.rope_llama3
        low_wavelen, high_wavelen = old_max / low, old_max / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_max / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(mid, smoothed, scaled)
