"""A Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) cut into layer-range shards.

A `Shard` holds layers [start, stop): the first shard also holds the token embeddings, the last
the final norm and the LM head. Chaining every shard's `forward` gives the whole model. Each
forward appends its new tokens' K/V rows to the shard's `KVCache` and lets every new token see the
committed prefix plus whatever rows its window mask allows, so one call serves prefill, plain
decoding, chain verification and tree verification alike. Knows nothing of sampling or Ray."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from specray.core.config import ModelConfig
from specray.core.device import to_device
from specray.core.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised in fp32, scaled by the weight after the cast back (as transformers' Llama): one
        fused op in fp32, four in other dtypes (eight as separate pow, mean, rsqrt ... ops)."""
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE (half-split convention): x * cos + rotate_half(x) * sin, with rotate_half(x) =
    [-x2, x1]. x: [B, n, heads, hd]; cos, sin: [B, n, heads, hd] (or broadcastable) with sin's first
    half negated (Shard.forward builds it so), which makes rotate_half(x) * sin = roll(x, hd/2) * sin:
    four ops instead of six, bit for bit the same. A head with cos 1 and sin 0 passes unchanged."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class Attention(nn.Module):
    """Grouped-query attention over the KV cache. q, k and v come from one fused projection (the
    checkpoint's q_proj, k_proj and v_proj stacked by the loader), are rotated in one go (v heads with
    cos 1, sin 0, bit for bit unchanged) and k, v are written to the layer's cache in one op."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.nh + 2 * self.nkv) * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, kv_cache, where, mask):
        # x: [B, n, H]; cos, sin: [B, n, nh + 2 nkv, hd]; kv_cache: [slots, 2 nkv, max_len, hd] (k heads,
        # then v heads); where: (slots [B, 1], rows [B, n], slots [B]) on x's device; mask: [B, 1, n, L] bool
        b, n, _ = x.shape
        qkv = self.qkv_proj(x).view(b, n, self.nh + 2 * self.nkv, self.hd)
        if self.qk_norm:
            q, k, v = qkv.split((self.nh, self.nkv, self.nkv), dim=2)
            qkv = torch.cat((self.q_norm(q), self.k_norm(k), v), dim=2)
        q, kv = rotate(qkv, cos, sin).split((self.nh, 2 * self.nkv), dim=2)  # [B, n, nh | 2 nkv, hd]
        slot_col, rows, slots = where
        kv_cache[slot_col, :, rows] = kv
        k, v = kv_cache[:, :, :mask.shape[-1]][slots].chunk(2, dim=1)  # [B, nkv, L, hd] each
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask,
                                             enable_gqa=self.nh != self.nkv)  # [B, nh, n, hd]
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.nh * self.hd))


class MLP(nn.Module):
    """SwiGLU with gate_proj and up_proj fused into one projection (stacked by the loader)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv_cache, where, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, where, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def rope_buffers(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """What Shard.forward rotates with: inv_freq [hd] (the frequencies twice, as rotate_half pairs the
    halves) and, per head of the fused q|k|v layout, qk_heads [nh + 2 nkv, 1] (1 on q and k heads, 0
    on v heads), v_heads = 1 - qk_heads, and sin_sign [nh + 2 nkv, hd] (qk_heads with the first half
    negated)."""
    qk = (torch.arange(cfg.num_heads + 2 * cfg.num_kv_heads) < cfg.num_heads + cfg.num_kv_heads)[:, None].float()
    half = cfg.head_dim // 2
    sign = torch.cat((-torch.ones(half), torch.ones(half)))
    return {"inv_freq": cfg.inv_freq().repeat(2), "qk_heads": qk, "v_heads": 1 - qk, "sin_sign": qk * sign}


HostArray = np.ndarray | torch.Tensor


def _numpy(a: HostArray) -> np.ndarray:
    return a if isinstance(a, np.ndarray) else a.numpy()


class Shard(nn.Module):
    """Layers [start, stop) of the decoder; parameter names follow transformers (`model.` prefix dropped)."""

    def __init__(self, cfg: ModelConfig, start: int = 0, stop: int | None = None):
        super().__init__()
        stop = cfg.num_layers if stop is None else stop
        if not 0 <= start < stop <= cfg.num_layers:
            raise ValueError(f"layer range [{start}, {stop}) is not inside [0, {cfg.num_layers})")
        self.cfg, self.start, self.stop = cfg, start, stop
        self.is_first, self.is_last = start == 0, stop == cfg.num_layers
        if self.is_first:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(start, stop))
        if self.is_last:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        for name, buffer in rope_buffers(cfg).items():
            self.register_buffer(name, buffer, persistent=False)

    def new_cache(self, num_slots: int, max_len: int) -> KVCache:
        p = next(self.parameters())
        return KVCache(len(self.layers), num_slots, max_len, self.cfg.num_kv_heads, self.cfg.head_dim,
                       p.dtype, p.device)

    @torch.inference_mode()
    def forward(self, x: np.ndarray | torch.Tensor, cache: KVCache, slots: HostArray, positions: HostArray,
                base: HostArray, window: HostArray, num_valid: HostArray | None = None) -> torch.Tensor:
        """Run n new tokens per sequence through this shard and append their K/V rows.

        x:         [B, n] token ids (first shard; a HostArray) or [B, n, H] hidden states.
        slots:     [B] KV slots.
        positions: [B, n] RoPE positions.
        base, window: visibility, as `KVCache.attention_mask` defines them.
        num_valid: [B] how many of the n tokens are real (the rest is padding); default all n.
        Every HostArray is numpy or a CPU tensor (batch.pack builds numpy, which launches nothing).
        Returns hidden states [B, n, H], normalised by the final norm on the last shard.
        """
        slots, base, window = _numpy(slots), _numpy(base), _numpy(window)
        n, device = window.shape[1], self.inv_freq.device
        h = self.embed_tokens(to_device(_numpy(x), device)) if self.is_first else x
        angles = to_device(_numpy(positions).astype(np.float32)[..., None, None], device) * self.inv_freq  # [B, n, 1, hd]
        # per head of [B, n, nh + 2 nkv, hd]: v heads cos 1, sin 0; sin's first half negated (rotate)
        cos = torch.addcmul(self.v_heads, angles.cos(), self.qk_heads)
        sin = angles.sin() * self.sin_sign
        if h.dtype != cos.dtype:
            cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        mask, rows = cache.attention_mask(slots, base, window, n)
        dev_slots = to_device(slots, device)
        where = (dev_slots[:, None], rows, dev_slots)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, cache.kv[i], where, mask)
        cache.advance(slots, n if num_valid is None else _numpy(num_valid))
        return self.norm(h) if self.is_last else h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """LM head in fp32 over chosen rows. h: [..., H] -> [..., V]."""
        return head_logits(self.lm_head, h)


@torch.inference_mode()
def head_logits(head: nn.Linear, h: torch.Tensor) -> torch.Tensor:
    """An LM head in fp32: h [..., H] -> [..., V]. The draft's logits, on the draft and when the last
    target stage recomputes its law from the draft's hidden states, come from here."""
    return head(h).float()
