"""Tree and chain verification over the KV cache, checked against plain sequential decoding.

The reference for any token is the same model fed its own path one token per call in a fresh
cache. Covered: one-call tree verification (window = `Tree.mask`), draft-style depth-by-depth tree
forwards over tentative rows, rollback (`truncate`) and compaction (`compact`) of accepted rows,
layer shards chained through `load_shard(path, start, stop)`, and independence of batched slots.
Tiny random weights built directly as a `Shard`; nothing from transformers is needed."""
from __future__ import annotations

import json
from itertools import pairwise

import pytest
import torch
from safetensors.torch import save_file

from specray.core.config import ModelConfig
from specray.core.loader import checkpoint_names, load_shard
from specray.core.model import Shard
from specray.core.tree import Tree

HF_CONFIG = {"model_type": "llama", "vocab_size": 80, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
             "max_position_embeddings": 128, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
ATOL = 1e-4
KV_ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: extra intra-op threads only add overhead (20x on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(seed: int = 0, **overrides) -> Shard:
    """The whole tiny model with every weight redrawn: weights ~ N(0, 0.2), norms ~ 1 + N(0, 0.2)."""
    torch.manual_seed(seed)
    model = Shard(ModelConfig.from_hf({**HF_CONFIG, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
        if model.cfg.tie_word_embeddings:
            model.lm_head.weight.copy_(model.embed_tokens.weight)
    return model


@pytest.fixture(scope="module")
def model() -> Shard:
    return make_model()


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, HF_CONFIG["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def causal(b: int, n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril().expand(b, n, n)  # [B, n, n]


def forward(shard: Shard, cache, slots, x, window=None, positions=None, base=None, num_valid=None):
    """One shard call. Defaults: base = committed length, positions follow it, causal window.

    x: [B, n] ids or [B, n, H] hidden states.  Returns hidden states [B, n, H]."""
    b, n = x.shape[:2]
    base = cache.lengths[slots].clone() if base is None else base  # [B]
    positions = base[:, None] + torch.arange(n) if positions is None else positions  # [B, n]
    window = causal(b, n) if window is None else window
    return shard(x, cache, slots, positions, base, window, num_valid)


def new_slot(shard: Shard, num_slots: int = 1):
    cache = shard.new_cache(num_slots, 64)
    return cache, torch.tensor([cache.allocate()])


def sequential_logits(shard: Shard, seq: list[int]) -> torch.Tensor:
    """Reference: feed `seq` one token per call into a fresh cache.  [T, V]"""
    cache, slots = new_slot(shard)
    return torch.cat([shard.logits(forward(shard, cache, slots, torch.tensor([[t]]))[0]) for t in seq])


def leaves(tree: Tree) -> list[int]:
    return [i for i in range(tree.num_nodes) if not tree.children(i)]


def path_reference(shard: Shard, tree: Tree, prefix: list[int], nodes: list[int]) -> dict[int, torch.Tensor]:
    """Each node's logits computed sequentially along its own path after `prefix`.  node -> [V]"""
    out = {}
    for leaf in leaves(tree):
        path = tree.path(leaf)
        ref = sequential_logits(shard, prefix + [nodes[i] for i in path])[len(prefix):]
        out.update({node: ref[d] for d, node in enumerate(path)})
    return out


def verify_tree(shard: Shard, cache, slots, t0: int, nodes: list[int], tree: Tree) -> torch.Tensor:
    """Forward [t0] + every tree node in one call; returns logits [1+N, V] (row 0 = t0)."""
    base = cache.lengths[slots].clone()  # [1]
    depths = torch.tensor((0,) + tree.depths)  # [1+N]
    h = forward(shard, cache, slots, torch.tensor([[t0] + nodes]), tree.mask[None], base[:, None] + depths)
    return shard.logits(h[0])


@pytest.mark.parametrize("branching", [(3, 2, 1), (2, 2)])
def test_tree_verify_matches_sequential_paths(model, branching):
    tree = Tree.from_branching(branching)
    prompt, t0, nodes = tokens(6, 1), 7, tokens(tree.num_nodes, 2)
    cache, slots = new_slot(model)
    forward(model, cache, slots, torch.tensor([prompt]))
    logits = verify_tree(model, cache, slots, t0, nodes, tree)  # [1+N, V]
    assert int(cache.lengths[slots]) == len(prompt) + 1 + tree.num_nodes
    torch.testing.assert_close(logits[0], sequential_logits(model, prompt + [t0])[-1], atol=ATOL, rtol=0)
    for node, ref in path_reference(model, tree, prompt + [t0], nodes).items():
        torch.testing.assert_close(logits[1 + node], ref, atol=ATOL, rtol=0, msg=f"node {node}")


@pytest.mark.parametrize("branching", [(3, 2, 1), (2, 2)])
def test_draft_depth_by_depth_matches_sequential_paths(model, branching):
    """A drafter writes one tree level per call; level d sees its ancestors among the tentative rows."""
    tree = Tree.from_branching(branching)
    prefix, nodes = tokens(6, 3) + [7], tokens(tree.num_nodes, 4)
    cache, slots = new_slot(model)
    forward(model, cache, slots, torch.tensor([prefix]))
    base = cache.lengths[slots].clone()  # [1], the committed prefix (t0 included)
    got = {}
    for depth, level in enumerate(tree.levels, start=1):
        lo, hi = level[0], level[-1] + 1
        assert level == tuple(range(lo, hi))  # breadth-first: a level is a contiguous block of rows
        window = tree.mask[1 + lo:1 + hi, 1:1 + hi][None]  # [1, n, W]: tentative rows lo.., then n new
        positions = torch.full((1, hi - lo), len(prefix) - 1 + depth)  # [1, n]
        h = forward(model, cache, slots, torch.tensor([nodes[lo:hi]]), window, positions, base)
        got.update(zip(level, model.logits(h[0])))
        assert int(cache.lengths[slots]) == len(prefix) + hi
    for node, ref in path_reference(model, tree, prefix, nodes).items():
        torch.testing.assert_close(got[node], ref, atol=ATOL, rtol=0, msg=f"node {node}")


def assert_cache_equals_fresh_prefill(shard: Shard, cache, slots, kept: list[int]) -> None:
    """K/V rows [0, len) equal a fresh one-call prefill of `kept`; the next 3-token chain gives equal logits."""
    assert int(cache.lengths[slots]) == len(kept)
    fresh, fresh_slots = new_slot(shard, num_slots=2)
    forward(shard, fresh, fresh_slots, torch.tensor([kept]))
    for got, want in zip(cache.kv, fresh.kv):
        torch.testing.assert_close(got[slots, :, :len(kept)], want[fresh_slots, :, :len(kept)],
                                   atol=KV_ATOL, rtol=0)
    nxt = torch.tensor([tokens(3, 99)])  # overwrites some stale rows; the rest must stay invisible
    got = shard.logits(forward(shard, cache, slots, nxt))
    want = shard.logits(forward(shard, fresh, fresh_slots, nxt))
    torch.testing.assert_close(got, want, atol=KV_ATOL, rtol=0)


@pytest.mark.parametrize("accepted", [0, 2, 4])
def test_rollback_equals_fresh_prefill(model, accepted):
    prompt, t0, chain = tokens(5, 5), 11, tokens(4, 6)
    cache, slots = new_slot(model)
    forward(model, cache, slots, torch.tensor([prompt]))
    forward(model, cache, slots, torch.tensor([[t0] + chain]))  # chain verification, causal window
    cache.truncate(int(slots), len(prompt) + 1 + accepted)
    assert_cache_equals_fresh_prefill(model, cache, slots, prompt + [t0] + chain[:accepted])


@pytest.mark.parametrize("leaf_index, keep", [(3, None), (5, None), (4, 2), (0, 1)])
def test_compaction_of_accepted_tree_path_equals_fresh_prefill(model, leaf_index, keep):
    tree = Tree.from_branching((3, 2, 1))
    prompt, t0, nodes = tokens(5, 7), 13, tokens(tree.num_nodes, 8)
    cache, slots = new_slot(model)
    forward(model, cache, slots, torch.tensor([prompt]))
    verify_tree(model, cache, slots, t0, nodes, tree)
    path = tree.path(leaves(tree)[leaf_index])[:keep]
    cache.compact(int(slots), len(prompt), [0] + [1 + i for i in path])
    assert_cache_equals_fresh_prefill(model, cache, slots, prompt + [t0] + [nodes[i] for i in path])


def save_checkpoint(model: Shard, path, tied: bool) -> None:
    """Write `model` as a minimal Hugging Face directory (config.json + model.safetensors)."""
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps({**HF_CONFIG, "tie_word_embeddings": tied}))
    cfg = model.cfg
    rows = {"q_proj": cfg.num_heads * cfg.head_dim, "k_proj": cfg.num_kv_heads * cfg.head_dim,
            "v_proj": cfg.num_kv_heads * cfg.head_dim, "gate_proj": cfg.intermediate_size,
            "up_proj": cfg.intermediate_size}  # fused projections split back into their parts
    state = {}
    for name, t in model.state_dict().items():
        names = checkpoint_names(name, 0)
        sizes = [rows[hf.split(".")[-2]] for hf in names] if len(names) > 1 else [t.shape[0]]
        state.update({hf: part.contiguous() for hf, part in zip(names, t.split(sizes))})
    if tied:
        del state["lm_head.weight"]
    save_file(state, str(path / "model.safetensors"))


def chained_logits(shards: list[Shard]) -> torch.Tensor:
    """Prefill, a tree verification and a decode step through chained shards.  [T, V]"""
    tree = Tree.from_branching((2, 2))
    caches = [s.new_cache(2, 64) for s in shards]
    slots = torch.tensor([caches[0].allocate()])
    for c in caches[1:]:
        assert c.allocate() == int(slots)
    steps = [(torch.tensor([tokens(6, 9)]), None, None),
             (torch.tensor([[3] + tokens(tree.num_nodes, 10)]), tree.mask[None], torch.tensor([(0,) + tree.depths])),
             (torch.tensor([[5]]), None, None)]
    out = []
    for x, window, depths in steps:
        base = caches[0].lengths[slots].clone()
        positions = None if depths is None else base[:, None] + depths
        for shard, cache in zip(shards, caches):
            x = forward(shard, cache, slots, x, window, positions, base)
        out.append(shards[-1].logits(x[0]))
    return torch.cat(out)


@pytest.mark.parametrize("tied", [False, True])
def test_layer_shards_chain_to_the_whole_model(tied, tmp_path):
    whole = make_model(seed=1, tie_word_embeddings=tied)
    save_checkpoint(whole, tmp_path, tied)
    want = chained_logits([whole])
    torch.testing.assert_close(chained_logits([load_shard(str(tmp_path))]), want, atol=KV_ATOL, rtol=0)
    for cuts in ([0, 2, 4], [0, 1, 3, 4]):
        shards = [load_shard(str(tmp_path), a, b) for a, b in pairwise(cuts)]
        assert [len(s.layers) for s in shards] == [b - a for a, b in pairwise(cuts)]
        assert hasattr(shards[0], "embed_tokens") and not hasattr(shards[0], "lm_head")
        assert not any(hasattr(s, "embed_tokens") for s in shards[1:])  # the last shard too, even if tied
        assert not any(hasattr(s, "norm") or hasattr(s, "lm_head") for s in shards[:-1])
        torch.testing.assert_close(shards[-1].lm_head.weight, whole.lm_head.weight, atol=0, rtol=0)
        torch.testing.assert_close(chained_logits(shards), want, atol=ATOL, rtol=0)


def test_slots_are_independent(model):
    """Two sequences batched (padded prefill, decode, tree verification) give the logits each gives alone."""
    tree = Tree.from_branching((2, 2))
    prompts, t0s, trees = [tokens(9, 20), tokens(4, 21)], [3, 4], [tokens(tree.num_nodes, s) for s in (22, 23)]

    def run(cache, slots, batch):
        b, n = len(batch), max(len(prompts[i]) for i in batch)
        x = torch.tensor([prompts[i] + [0] * (n - len(prompts[i])) for i in batch])  # [b, n] right-padded
        num_valid = torch.tensor([len(prompts[i]) for i in batch])  # [b]
        h = forward(model, cache, slots, x, num_valid=num_valid)
        out = [[model.logits(h[j, :num_valid[j]])] for j in range(b)]
        h = forward(model, cache, slots, torch.tensor([[t0s[i]] for i in batch]))
        for j in range(b):
            out[j].append(model.logits(h[j]))
        base = cache.lengths[slots].clone()  # [b]
        x = torch.tensor([[t0s[i] + 1] + trees[i] for i in batch])  # [b, 1+N]
        positions = base[:, None] + torch.tensor((0,) + tree.depths)  # [b, 1+N]
        h = forward(model, cache, slots, x, tree.mask.expand(b, -1, -1), positions, base)
        return [torch.cat(o + [model.logits(h[j])]) for j, o in enumerate(out)]

    cache = model.new_cache(3, 64)
    ids = [cache.allocate() for _ in range(3)]
    slots = torch.tensor([ids[2], ids[0]])  # non-adjacent, out of order, beside a busy empty slot
    together = run(cache, slots, [0, 1])
    for i in range(2):
        alone_cache, alone_slots = new_slot(model)
        torch.testing.assert_close(together[i], run(alone_cache, alone_slots, [i])[0], atol=ATOL, rtol=0)
