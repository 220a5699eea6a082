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
    p.add_argument("--num-target-stages", type=int, default=1, help="split the target's layers over N stages")


def add_request_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True)
    p.add_argument("--mode", default="chain", choices=["off", "chain", "tree", "async"])
    p.add_argument("-k", "--num-speculative-tokens", type=int, default=4)
    p.add_argument("--branching", type=_int_list, default=(), help="tree branching, e.g. 3,2,1")
    p.add_argument("--with-replacement", action="store_true")
    p.add_argument("--fan-out", type=_int_list, default=(),
                   help="async: guesses per outcome position k = 0..K, e.g. 2,2,1,1,3 (default: geometric)")
    p.add_argument("--saguaro-c", type=float, default=1.0, help="async: Saguaro down-weight in (0, 1]; 1 is off")
    p.add_argument("--backup", default="auto", choices=["neural", "fast", "auto"], help="async: on a cache miss")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true", help='print one JSON object {"text", "token_ids", "stats"}')


def speculation_config(args: argparse.Namespace):
    from specray.core.speculation import SpeculationConfig
    k = len(args.branching) if args.mode == "tree" and args.branching else args.num_speculative_tokens
    return SpeculationConfig(args.mode, k, args.branching, args.with_replacement, args.fan_out, args.saguaro_c,
                             args.backup)


def engine_config(args: argparse.Namespace, **overrides):
    from specray.engine import EngineConfig
    return EngineConfig(target=args.target, draft=args.draft, dtype=args.dtype, device=args.device,
                        num_target_stages=args.num_target_stages, **overrides)


def cmd_generate(args: argparse.Namespace) -> int:
    import asyncio

    from specray.core.loader import load_tokenizer
    from specray.core.sampling import SamplingParams
    from specray.engine import EngineRequest, build_engine, complete

    spec = speculation_config(args)
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    tokenizer = load_tokenizer(args.target)
    prompt = tokenizer.encode(args.prompt, add_special_tokens=False)
    config = engine_config(args, kind=args.engine, max_batch=1, spec=spec,
                           max_context=len(prompt) + args.max_tokens + spec.draft_rows)

    async def run():
        engine = build_engine(config, tokenizer)
        try:
            start = time.perf_counter()
            out = await complete(engine, EngineRequest("cli", tuple(prompt), params, spec, args.max_tokens))
            return out, time.perf_counter() - start
        finally:
            await engine.shutdown()

    (token_ids, finish_reason, stats), seconds = asyncio.run(run())
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    stats = {**stats.to_dict(), "finish_reason": finish_reason, "seconds": seconds,
             "output_tokens_per_s": len(token_ids) / seconds}
    if args.json:
        print(json.dumps({"text": text, "token_ids": token_ids, "stats": stats}))
    else:
        print(args.prompt + text)
        print(f"\n[{len(token_ids)} tokens in {seconds:.2f}s, {stats['output_tokens_per_s']:.1f} tok/s; "
              f"steps {stats['num_steps']}, acceptance rate {stats['acceptance_rate']:.3f}, "
              f"mean acceptance length {stats['mean_acceptance_length']:.2f}, "
              f"accepted per position {stats['accepted_per_position']}, "
              f"cache hit rate {stats['cache_hit_rate']:.3f}]", file=sys.stderr)
    return 0


def cmd_bench_engine(args: argparse.Namespace) -> int:
    import asyncio

    from specray.bench.engine_bench import MODES, bench, dump, markdown

    modes = args.modes.split(",")
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; choose from {list(MODES)}")
    config = engine_config(args, max_context=args.max_tokens + 512)
    rows = asyncio.run(bench(config, modes, list(args.batch), args.engines.split(","), args.requests,
                             args.max_tokens, args.temperature))
    print(markdown(rows))
    dump(rows, args.json_out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specray", description="speculative-decoding LLM serving on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate one completion and print speculation statistics")
    add_model_args(g)
    g.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="run draft and target stages in this process, or as Ray actors")
    add_request_args(g)
    g.set_defaults(func=cmd_generate)
    b = sub.add_parser("bench", help="benchmarks that print figures")
    bsub = b.add_subparsers(dest="bench", required=True)
    e = bsub.add_parser("engine", help="every mode, in process and through Ray actors, at several batch sizes")
    add_model_args(e)
    e.add_argument("--modes", default="off,chain,tree,async")
    e.add_argument("--batch", type=_int_list, default=(1, 8), help="batch sizes, e.g. 1,8")
    e.add_argument("--engines", default="local,ray", help="local,ray")
    e.add_argument("--requests", type=int, default=16, help="requests per setting (code prompts)")
    e.add_argument("--max-tokens", type=int, default=64)
    e.add_argument("--temperature", type=float, default=0.0)
    e.add_argument("--json-out", default=None, help="also write the rows as JSON here")
    e.set_defaults(func=cmd_bench_engine)
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
