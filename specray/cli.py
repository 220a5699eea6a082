"""`specray` command line: generate (in process), and the subcommands the later layers add."""
from __future__ import annotations

import argparse
import json
import sys
import time

from specray.assets import DEMO_DRAFT, DEMO_TARGET


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=DEMO_TARGET, help="target: HF checkpoint directory or .gguf file")
    p.add_argument("--draft", default=DEMO_DRAFT, help="draft: HF checkpoint directory or .gguf file")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def add_request_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True)
    p.add_argument("--mode", default="chain", choices=["off", "chain", "tree"])
    p.add_argument("-k", "--num-speculative-tokens", type=int, default=4)
    p.add_argument("--branching", type=_int_list, default=(), help="tree branching, e.g. 3,2,1")
    p.add_argument("--with-replacement", action="store_true")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true", help='print one JSON object {"text", "token_ids", "stats"}')


def cmd_generate(args: argparse.Namespace) -> int:
    from specray.core.device import pick_device
    from specray.core.generate import generate
    from specray.core.loader import load_shard, load_tokenizer
    from specray.core.sampling import SamplingParams
    from specray.core.speculation import SpeculationConfig

    spec = SpeculationConfig(args.mode, args.num_speculative_tokens if args.mode != "tree" or not args.branching
                             else len(args.branching), args.branching, args.with_replacement)
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    device = pick_device(args.device)
    tokenizer = load_tokenizer(args.target)
    target = load_shard(args.target, dtype=args.dtype, device=device)
    draft = load_shard(args.draft, dtype=args.dtype, device=device) if spec.mode != "off" else None
    prompt = tokenizer.encode(args.prompt, add_special_tokens=False)
    if not prompt:
        raise ValueError("prompt must not be empty")
    start = time.perf_counter()
    (out,) = generate([target], draft, [prompt], params, spec, args.max_tokens, target.cfg.eos_token_ids)
    seconds = time.perf_counter() - start
    text = tokenizer.decode(out.token_ids, skip_special_tokens=True)
    stats = {**out.stats.to_dict(), "finish_reason": out.finish_reason, "seconds": seconds,
             "output_tokens_per_s": len(out.token_ids) / seconds}
    if args.json:
        print(json.dumps({"text": text, "token_ids": out.token_ids, "stats": stats}))
    else:
        print(args.prompt + text)
        print(f"\n[{len(out.token_ids)} tokens in {seconds:.2f}s, {stats['output_tokens_per_s']:.1f} tok/s; "
              f"steps {stats['num_steps']}, acceptance rate {stats['acceptance_rate']:.3f}, "
              f"mean acceptance length {stats['mean_acceptance_length']:.2f}, "
              f"accepted per position {stats['accepted_per_position']}]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specray", description="speculative-decoding LLM serving on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate one completion and print speculation statistics")
    add_model_args(g)
    add_request_args(g)
    g.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"specray: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
