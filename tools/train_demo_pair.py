"""Train the embedded demo model pair (a small code model and its draft) from scratch on CPU.

The corpus is the Python standard library of the running interpreter (``*.py`` files under
``sysconfig.get_paths()["stdlib"]``, its test suite included, without site-packages and data
tables). The modules in ``HELD_OUT`` and their tests are never trained on; every figure in
``metrics.json`` is measured on those modules.

Phases (all seeded, single process, ``torch.set_num_threads``; training under bf16 autocast):

1. a byte-level BPE tokenizer (``VOCAB_SIZE`` ids, ``<|endoftext|>`` as EOS/BOS, every newline
   its own token so that a prompt may end at a line break), shared by both;
2. the target, a ~6.5 M-parameter ``LlamaForCausalLM``, trained with cross-entropy;
3. the draft, a ~1.4 M-parameter Llama, trained with cross-entropy on the same data;
4. target samples: continuations of held-in code prompts, sampled from the target at T=0.8;
5. distillation: the draft minimises KL(target || draft) on the target's full next-token
   distributions, half on target samples and half on held-in code;
6. both saved as bf16 Hugging Face checkpoints and evaluated from the saved files (in fp32).

Usage::

    python tools/train_demo_pair.py                 # train, save, write metrics.json (~45 min on 2 cores)
    python tools/train_demo_pair.py --eval-only     # recompute the metrics of the shipped pair
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "specray" / "assets" / "demo"
HELD_OUT = ("json/", "textwrap.py", "csv.py", "pprint.py", "difflib.py")  # relative to stdlib
HELD_OUT_TESTS = ("test/test_json/", "test/test_textwrap.py", "test/test_csv.py",
                  "test/test_pprint.py", "test/test_difflib.py")  # neither trained on nor evaluated
SKIP_DIRS = {"site-packages", "encodings", "pydoc_data"}
VOCAB_SIZE = 8192
EOS = "<|endoftext|>"

TARGET_SHAPE = {"hidden_size": 256, "num_hidden_layers": 6, "num_attention_heads": 8,
                "num_key_value_heads": 4, "intermediate_size": 704}
DRAFT_SHAPE = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "intermediate_size": 320}


# ----------------------------------------------------------------------------- data

def stdlib_files() -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of the running interpreter's stdlib, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if SKIP_DIRS & set(rel.split("/")[:-1]) or rel.startswith(HELD_OUT_TESTS):
            continue
        is_held = any(rel.startswith(h) if h.endswith("/") else rel == h for h in HELD_OUT)
        (held if is_held else train).append(path)
    return train, held


def read_texts(paths: list[Path]) -> list[str]:
    """File contents; files that are not valid UTF-8 are skipped."""
    texts = []
    for path in paths:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
    return texts


def token_stream(tok, texts: list[str]) -> torch.Tensor:
    """One long int64 stream: each text's ids followed by EOS.  Shape: [n_tokens]."""
    ids = []
    for enc in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def heldout_tokens(tok) -> torch.Tensor:
    """The held-out modules of this interpreter as one token stream."""
    return token_stream(tok, read_texts(stdlib_files()[1]))


def random_windows(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator):
    """`batch` random windows of seq_len + 1 tokens.  Shape: [batch, seq_len + 1]."""
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
    return torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()])


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE with VOCAB_SIZE ids; any text (code whitespace included) round-trips."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),  # "\n" never merges with indentation
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS,
                                   pad_token=EOS, clean_up_tokenization_spaces=False,
                                   model_max_length=1024)


# ----------------------------------------------------------------------------- models

def make_model(shape: dict, tok) -> LlamaForCausalLM:
    """A Llama with tied embeddings, 1024 positions and the tokenizer's special ids."""
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=1024, rope_theta=10000.0,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **shape)
    return LlamaForCausalLM(config)


def n_params(model) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def save_pair_member(model, tok, out: Path) -> None:
    """Write a bf16 Hugging Face checkpoint plus the tokenizer to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.to(torch.bfloat16).save_pretrained(out)
    model.float()
    tok.save_pretrained(out)
    # Name the class every transformers version knows (v5 would write its alias TokenizersBackend).
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def load_pair(out: Path = DEFAULT_OUT):
    """(target, draft, tokenizer) from the saved files, weights upcast to fp32, eval mode."""
    tok = AutoTokenizer.from_pretrained(out / "target")
    target = AutoModelForCausalLM.from_pretrained(out / "target", dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(out / "draft", dtype=torch.float32).eval()
    return target, draft, tok


# ----------------------------------------------------------------------------- training

def cosine_lr(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_loop(name: str, model, loss_fn, steps: int, peak_lr: float, tokens_per_step: int,
               log_every: int) -> list[float]:
    """AdamW + cosine schedule over `steps` calls of loss_fn(step); prints progress; losses."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=peak_lr, betas=(0.9, 0.95))
    model.train()
    losses, start, last, last_step = [], time.time(), time.time(), 0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, peak_lr, warmup=max(1, steps // 20))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 master weights, bf16 matmuls
            loss = loss_fn(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            now = time.time()
            tok_s = tokens_per_step * (step + 1 - last_step) / (now - last)
            eta = (now - start) / (step + 1) * (steps - step - 1)
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            print(f"[{name}] step {step + 1}/{steps}  loss {recent:.3f}  {tok_s:,.0f} tok/s  "
                  f"elapsed {now - start:5.0f}s  eta {eta:5.0f}s", flush=True)
            last, last_step = now, step + 1
    model.eval()
    return losses


def lm_loss(model, windows: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on windows [B, T + 1]."""
    logits = model(input_ids=windows[:, :-1]).logits  # [B, T, V]
    return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())


def kl_loss(draft, target, inputs: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(target || draft) on inputs [B, T]."""
    with torch.no_grad():
        log_p = F.log_softmax(target(input_ids=inputs).logits, dim=-1)  # [B, T, V]
    log_q = F.log_softmax(draft(input_ids=inputs).logits, dim=-1)  # [B, T, V]
    return F.kl_div(log_q.flatten(0, 1), log_p.flatten(0, 1), log_target=True,
                    reduction="batchmean")


@torch.no_grad()
def sample_target(target, stream: torch.Tensor, n: int, prompt_len: int, seq_len: int,
                  temperature: float, gen: torch.Generator, batch: int = 64) -> torch.Tensor:
    """n target continuations of random held-in prompts.  Shape: [n, seq_len]."""
    out = []
    for i in range(0, n, batch):
        prompts = random_windows(stream, min(batch, n - i), prompt_len - 1, gen)
        new = seq_len - prompt_len
        out.append(target.generate(prompts, attention_mask=torch.ones_like(prompts),
                                   do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                   max_new_tokens=new, min_new_tokens=new))
        print(f"[samples] {i + len(prompts)}/{n}", flush=True)
    return torch.cat(out)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_pair(target, draft, stream: torch.Tensor, seq_len: int = 256,
                  max_tokens: int | None = None) -> dict:
    """Teacher-forced held-out figures of both models (fp32 maths).

    The stream is cut into non-overlapping windows of seq_len predicted tokens; with
    max_tokens, max_tokens // seq_len windows spread evenly over the stream are used.
    Agreement is the fraction of positions where argmax draft == argmax target.
    """
    n_windows = (len(stream) - 1) // seq_len
    picks = range(n_windows)
    if max_tokens is not None and max_tokens // seq_len < n_windows:
        k = max(1, max_tokens // seq_len)
        picks = torch.linspace(0, n_windows - 1, k).round().long().tolist()
    nll_t = nll_d = agree = count = 0.0
    for i in picks:
        w = stream[i * seq_len:(i + 1) * seq_len + 1].unsqueeze(0)  # [1, T + 1]
        lt = target(input_ids=w[:, :-1]).logits.float()[0]  # [T, V]
        ld = draft(input_ids=w[:, :-1]).logits.float()[0]  # [T, V]
        labels = w[0, 1:]
        nll_t += F.cross_entropy(lt, labels, reduction="sum").item()
        nll_d += F.cross_entropy(ld, labels, reduction="sum").item()
        agree += (lt.argmax(-1) == ld.argmax(-1)).sum().item()
        count += len(labels)
    return {
        "target_loss": nll_t / count,
        "target_ppl": math.exp(nll_t / count),
        "draft_loss": nll_d / count,
        "draft_ppl": math.exp(nll_d / count),
        "greedy_agreement": agree / count,
        "n_tokens": int(count),
    }


def eval_shipped(out: Path, max_tokens: int | None) -> dict:
    """Recompute the held-out figures from the files in `out`."""
    target, draft, tok = load_pair(out)
    return evaluate_pair(target, draft, heldout_tokens(tok), max_tokens=max_tokens)


# ----------------------------------------------------------------------------- main

def train(args) -> None:
    """Run every phase and write the pair and metrics.json under args.out."""
    t0 = time.time()
    times = {}
    train_paths, held_paths = stdlib_files()
    train_texts, held_texts = read_texts(train_paths), read_texts(held_paths)
    print(f"corpus: {len(train_texts)} training files ({sum(map(len, train_texts)):,} chars), "
          f"{len(held_texts)} held-out files", flush=True)

    tok = train_tokenizer(train_texts)
    for text in held_texts:
        ids = tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text, "tokenizer round trip failed"
    stream, held = token_stream(tok, train_texts), token_stream(tok, held_texts)
    times["tokenizer_s"] = time.time() - t0
    print(f"tokenizer: {len(tok)} ids, round trip ok; {len(stream):,} training tokens, "
          f"{len(held):,} held-out tokens ({times['tokenizer_s']:.0f}s)", flush=True)

    B, T = args.batch_size, args.seq_len
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    target = make_model(TARGET_SHAPE, tok)
    t = time.time()
    train_loop("target", target, lambda s: lm_loss(target, random_windows(stream, B, T, gen)),
               args.target_steps, args.target_lr, B * T, args.log_every)
    times["target_s"] = time.time() - t

    torch.manual_seed(args.seed + 1)
    draft = make_model(DRAFT_SHAPE, tok)
    t = time.time()
    train_loop("draft", draft, lambda s: lm_loss(draft, random_windows(stream, B, T, gen)),
               args.draft_steps, args.draft_lr, B * T, args.log_every)
    times["draft_s"] = time.time() - t
    before = evaluate_pair(target, draft, held)["greedy_agreement"]
    print(f"agreement before distillation: {before:.3f}", flush=True)

    torch.manual_seed(args.seed + 2)
    t = time.time()
    samples = sample_target(target, stream, args.num_samples, 32, T + 1, args.temperature, gen)
    times["samples_s"] = time.time() - t

    def distill_step(step: int) -> torch.Tensor:
        half = B // 2
        idx = torch.randint(0, len(samples), (half,), generator=gen)
        real = random_windows(stream, B - half, T, gen)
        return kl_loss(draft, target, torch.cat([samples[idx], real])[:, :-1])

    t = time.time()
    target.eval()
    train_loop("distill", draft, distill_step, args.distill_steps, args.distill_lr, B * T,
               args.log_every)
    times["distill_s"] = time.time() - t

    save_pair_member(target, tok, args.out / "target")
    save_pair_member(draft, tok, args.out / "draft")
    times["total_s"] = time.time() - t0
    figures = eval_shipped(args.out, max_tokens=None)
    metrics = {
        "target": {"params": n_params(target), "held_out_loss": figures["target_loss"],
                   "held_out_ppl": figures["target_ppl"], **TARGET_SHAPE},
        "draft": {"params": n_params(draft), "held_out_loss": figures["draft_loss"],
                  "held_out_ppl": figures["draft_ppl"], **DRAFT_SHAPE},
        "greedy_agreement": figures["greedy_agreement"],
        "greedy_agreement_before_distillation": before,
        "eval_tokens": figures["n_tokens"],
        "eval_note": "teacher-forced, non-overlapping 256-token windows, bf16 weights in fp32",
        "vocab_size": len(tok),
        "training_tokens": len(stream),
        "train_wall_time_s": {k: round(v, 1) for k, v in times.items()},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seeds": {"data": args.seed, "target_init": args.seed, "draft_init": args.seed + 1,
                  "sampling": args.seed + 2},
        "threads": torch.get_num_threads(),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "held_out_modules": list(HELD_OUT),
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    p.add_argument("--eval-only", action="store_true", help="recompute metrics of --out and exit")
    p.add_argument("--max-eval-tokens", type=int, default=None, help="eval-only: sample size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--target-steps", type=int, default=3300)
    p.add_argument("--draft-steps", type=int, default=500)
    p.add_argument("--distill-steps", type=int, default=1100)
    p.add_argument("--num-samples", type=int, default=192, help="target samples for distillation")
    p.add_argument("--temperature", type=float, default=0.8, help="target sampling temperature")
    p.add_argument("--target-lr", type=float, default=4e-3)
    p.add_argument("--draft-lr", type=float, default=4e-3)
    p.add_argument("--distill-lr", type=float, default=1.5e-3)
    p.add_argument("--log-every", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    if args.eval_only:
        print(json.dumps(eval_shipped(args.out, args.max_eval_tokens), indent=2))
    else:
        train(args)


if __name__ == "__main__":
    main()
