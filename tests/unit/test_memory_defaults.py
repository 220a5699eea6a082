"""Defaults that load on real hardware: a context capped by default, a KV cache that refuses to start
when it cannot fit (naming what to lower) instead of crashing out of memory, bf16 by default on a GPU,
and a tied LM head kept as one tensor."""
from __future__ import annotations

import pytest
import torch

from specray.assets import DEMO_DRAFT, DEMO_TARGET
from specray.core.device import free_memory
from specray.core.kv_cache import KVCache
from specray.core.loader import load_shard, parse_dtype
from specray.deployments.config import DEFAULT_MAX_CONTEXT, AppConfig


def test_a_70b_shaped_cache_is_refused_with_what_to_lower():
    """Llama-3.1-70B's shape (80 layers, 8 KV heads of 128) at its 131,072-row context, 8 slots, bf16:
    ~320 GiB of KV cache. The check runs before any allocation."""
    with pytest.raises(ValueError, match="needs 320.0 GiB .* lower max_batch or max_context"):
        KVCache(80, 8, 131_072, 8, 128, torch.bfloat16, "cpu")


def test_a_cache_that_fits_is_allocated():
    cache = KVCache(2, 2, 64, 2, 16, torch.float32, "cpu")
    assert cache.kv[0].shape == (2, 4, 64, 16) and cache.num_free == 2  # k heads, then v heads
    assert free_memory("cpu") is None or free_memory("cpu") > 0


def test_the_default_context_is_capped():
    assert AppConfig().context(131_072) == DEFAULT_MAX_CONTEXT == 8192
    assert AppConfig().context(1024) == 1024  # the demo pair's own limit
    assert AppConfig(max_context=65_536).context(131_072) == 65_536  # named explicitly: as asked


def test_auto_dtype_is_bf16_on_a_gpu_and_fp32_on_the_cpu():
    assert parse_dtype("auto", "cpu") == torch.float32 and parse_dtype("auto", "cuda:0") == torch.bfloat16
    assert parse_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="auto"):
        parse_dtype("int4")


def test_a_tied_head_stays_one_tensor():
    draft = load_shard(DEMO_DRAFT)  # the demo pair ties its embeddings
    assert draft.lm_head.weight is draft.embed_tokens.weight
    assert draft.lm_head.weight.dtype == torch.float32
    last = load_shard(DEMO_TARGET, 3, 6)  # a last stage alone holds the head, read from the embeddings
    assert not hasattr(last, "embed_tokens") and last.lm_head.weight.shape == (8192, 256)
