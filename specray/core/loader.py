"""Load model shards and tokenizers from a Hugging Face checkpoint directory or a GGUF file.

HF directories hold config.json plus model.safetensors or sharded safetensors with an index; a
shard reads only the tensors of its own layer range. GGUF files (the `gguf` package) likewise: a
shard dequantises only its own tensors. Knows nothing of sampling or Ray."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from specray.core.config import ModelConfig
from specray.core.model import Shard, rope_buffers

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
EMBED = "model.embed_tokens.weight"
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}  # Shard's fused projections: their parts


def parse_dtype(name: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype by name; `auto` is bfloat16 on a GPU and float32 on the CPU (whose bf16 matmuls are slow)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {['auto', *sorted(DTYPES)]}")
    return DTYPES[name]


def _is_gguf(path: str) -> bool:
    return str(path).endswith(".gguf")


def _gguf_tensors(path: str, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The named tensors of a GGUF file (every one if names is None), named as transformers names
    them and dequantised to fp32: only these are dequantised, so a stage reads its own layers.

    Uses transformers' GGUF name map and tensor processors (e.g. Llama's q/k un-permute) directly:
    `from_pretrained(gguf_file=...)` would dequantise everything and also need `accelerate`."""
    from gguf import GGUFReader, dequantize
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )
    path = os.path.abspath(path)
    d, f = os.path.split(path)
    with torch.device("meta"):  # only for the tensor-name mapping; holds no weights
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d, gguf_file=f))
    reader = GGUFReader(path)
    processor = TENSOR_PROCESSORS.get(read_field(reader, "general.architecture")[0], TensorProcessor)(
        config=load_gguf_checkpoint(path, return_tensors=False)["config"])
    hf_names = get_gguf_hf_weights_map(model, processor)  # GGUF tensor name -> transformers name
    wanted = None if names is None else set(names)
    out = {}
    for tensor in reader.tensors:
        name = hf_names.get(tensor.name)
        if name is None or wanted is not None and name not in wanted:
            continue
        weights = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                    tensor_key_mapping=hf_names, parsed_parameters={}).weights
        out[name] = torch.from_numpy(np.copy(weights)).float()
    return out


def load_transformers_model(path: str):
    """The checkpoint as a transformers causal LM (fp32, the reference specray is checked against):
    an HF directory, or a GGUF file dequantised without `accelerate` (a missing output head is tied
    to the embeddings, as load_shard does)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if not _is_gguf(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    d, f = os.path.split(os.path.abspath(path))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d, gguf_file=f))
    missing = model.load_state_dict(_gguf_tensors(path), strict=False).missing_keys
    if set(missing) - {"lm_head.weight"}:
        raise ValueError(f"{path}: checkpoint lacks {missing[:3]}")
    if missing:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    return model


def load_config(path: str) -> ModelConfig:
    if _is_gguf(path):
        from transformers import AutoConfig
        d, f = os.path.split(os.path.abspath(path))
        return ModelConfig.from_hf(AutoConfig.from_pretrained(d, gguf_file=f).to_dict())
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path}: not a GGUF file and no config.json in it")
    return ModelConfig.from_hf(json.loads(config_file.read_text()))


def _hf_tensors(path: str, names: list[str]) -> dict[str, torch.Tensor]:
    """Read the named tensors from single or sharded safetensors."""
    from safetensors import safe_open
    index = Path(path) / "model.safetensors.index.json"
    if index.is_file():
        where = json.loads(index.read_text())["weight_map"]
    else:
        where = {name: "model.safetensors" for name in names}
    out: dict[str, torch.Tensor] = {}
    for file in sorted({where[n] for n in names if n in where}):
        with safe_open(str(Path(path) / file), framework="pt") as f:
            present = set(f.keys())
            for name in names:
                if where.get(name) == file and name in present:
                    out[name] = f.get_tensor(name)
    return out


def _tensors(path: str, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a safetensors checkpoint or a GGUF file (those present)."""
    return _gguf_tensors(path, names) if _is_gguf(path) else _hf_tensors(path, names)


def _head_name(cfg: ModelConfig, source: dict[str, torch.Tensor]) -> str:
    """Where the LM head's weight is: the token embeddings when tied or when no lm_head is stored."""
    return EMBED if cfg.tie_word_embeddings or "lm_head.weight" not in source else "lm_head.weight"


def load_lm_head(path: str, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> nn.Linear:
    """The LM head alone of the model at `path` (the last target stage recomputes the draft's law with it)."""
    cfg = load_config(path)
    source = {} if cfg.tie_word_embeddings else _tensors(path, ["lm_head.weight"])
    name = _head_name(cfg, source)
    if name == EMBED:
        source = _tensors(path, [EMBED])
    if name not in source:
        raise ValueError(f"{path}: checkpoint lacks {name}")
    with torch.device("meta"):
        head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
    head.load_state_dict({"weight": _to(source[name], dtype, device)}, assign=True)
    return head.eval()


def _to(t: torch.Tensor, dtype: str | torch.dtype, device: str | torch.device) -> torch.Tensor:
    """A checkpoint tensor straight onto `device` in `dtype`. On CPU it is copied: weights left on the
    safetensors file's mapped pages run ~20% slower (a 1.5B bf16 decode step: 240 vs 195 ms)."""
    return t.to(device=device, dtype=parse_dtype(dtype, device), copy=torch.device(device).type == "cpu")


def load_shard(path: str, start: int = 0, stop: int | None = None, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "cpu") -> Shard:
    """Layers [start, stop) of the model at `path`, on `device` in `dtype` (parse_dtype), ready for
    inference. Each tensor goes straight to the device; a head tied to the embeddings stays one tensor."""
    cfg = load_config(path)
    with torch.device("meta"):
        shard = Shard(cfg, start, stop)
    wanted = {name: checkpoint_names(name, shard.start) for name in shard.state_dict()}
    source = _tensors(path, [hf for names in wanted.values() for hf in names])
    if shard.is_last:
        wanted["lm_head.weight"] = (_head_name(cfg, source),)
        if wanted["lm_head.weight"] == (EMBED,) and EMBED not in source:  # tied, on a stage without the embeddings
            source.update(_tensors(path, [EMBED]))
    missing = [hf for names in wanted.values() for hf in names if hf not in source]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    loaded = {names: _to(source[names[0]] if len(names) == 1 else torch.cat([source[hf] for hf in names]), dtype, device)
              for names in set(wanted.values())}  # one copy per tensor: no cat of a single part
    shard.load_state_dict({name: loaded[names] for name, names in wanted.items()}, assign=True)
    if shard.is_first and shard.is_last and wanted["lm_head.weight"] == (EMBED,):
        shard.lm_head.weight = shard.embed_tokens.weight  # one parameter, not two copies
    for name, buffer in rope_buffers(cfg).items():
        setattr(shard, name, buffer.to(device))
    return shard.eval()


def checkpoint_names(name: str, start: int) -> tuple[str, ...]:
    """The checkpoint tensors (transformers' names) that make up a Shard tensor, stacked along dim 0:
    one, or q|k|v and gate|up for the fused projections. Layer i of a shard is layer start + i."""
    if name.startswith("lm_head"):
        return (name,)
    if not name.startswith("layers."):
        return ("model." + name,)
    _, i, rest = name.split(".", 2)
    owner, param = rest.rsplit(".", 1)
    return tuple(f"model.layers.{int(i) + start}.{part}.{param}" for part in FUSED.get(owner, (owner,)))


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    if _is_gguf(path):
        d, f = os.path.split(os.path.abspath(path))
        return AutoTokenizer.from_pretrained(d, gguf_file=f)
    return AutoTokenizer.from_pretrained(path)
