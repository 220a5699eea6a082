"""`specray` command line: serve (Ray Serve, gRPC + HTTP), generate (in process, through Ray actors, or
against a running server), bench."""
from __future__ import annotations

import argparse
import json
import sys
import time

from specray.assets import DEMO_DRAFT, DEMO_TARGET
from specray.cli_server import add_serve_args, cmd_serve, generate_remote


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=DEMO_TARGET, help="target: HF checkpoint directory or .gguf file")
    p.add_argument("--draft", default=DEMO_DRAFT, help="draft: HF checkpoint directory or .gguf file")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on a GPU, float32 on the CPU) | float32 | bfloat16 | float16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--num-target-stages", type=int, default=1, help="split the target's layers over N stages")
    p.add_argument("--transport", choices=["graph", "calls"], default=None,
                   help="Ray actors: a step as a compiled graph or as actor calls (default: the engine's; "
                        "README: Choosing a transport)")


SPEC_DEFAULTS = {"mode": "chain", "num_speculative_tokens": 4, "saguaro_c": 1.0, "backup": "auto"}


def add_speculation_args(p: argparse.ArgumentParser) -> None:
    """Unset flags stay None: in process they take SPEC_DEFAULTS, against a server its defaults."""
    p.add_argument("--mode", choices=["off", "chain", "tree", "async"], help="default: chain")
    p.add_argument("-k", "--num-speculative-tokens", type=int, help="draft depth (default: 4; tree: its depth)")
    p.add_argument("--branching", type=_int_list, default=(), help="tree branching, e.g. 3,2,1")
    p.add_argument("--with-replacement", action="store_true")
    p.add_argument("--fan-out", type=_int_list, default=(),
                   help="async: guesses per outcome position k = 0..K, e.g. 2,2,1,1,3 (default: geometric)")
    p.add_argument("--saguaro-c", type=float, help="async: Saguaro down-weight in (0, 1]; 1 (default) is off")
    p.add_argument("--backup", choices=["neural", "fast", "auto"], help="async: on a cache miss (default: auto)")


def add_request_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True)
    add_speculation_args(p)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true", help='print one JSON object {"text", "token_ids", "stats"}')


def speculation_settings(args: argparse.Namespace) -> dict:
    """SpeculationConfig's fields from the flags, unset ones from SPEC_DEFAULTS."""
    spec = {name: getattr(args, name) for name in SPEC_DEFAULTS}
    spec = {name: SPEC_DEFAULTS[name] if value is None else value for name, value in spec.items()}
    if spec["mode"] == "tree" and args.num_speculative_tokens is None:
        spec["num_speculative_tokens"] = len(args.branching)
    return {**spec, "branching": args.branching, "with_replacement": args.with_replacement,
            "fan_out": args.fan_out}


def speculation_config(args: argparse.Namespace):
    from specray.core.speculation import SpeculationConfig
    return SpeculationConfig(**speculation_settings(args))


def engine_settings(args: argparse.Namespace) -> dict:
    """The engine settings --transport gives ({} when unset: the engine's default)."""
    return {"transport": args.transport} if args.transport else {}


def engine_config(args: argparse.Namespace, **overrides):
    from specray.engine import EngineConfig
    return EngineConfig(target=args.target, draft=args.draft, dtype=args.dtype, device=args.device,
                        num_target_stages=args.num_target_stages, **engine_settings(args), **overrides)


def cmd_generate(args: argparse.Namespace) -> int:
    if args.server:
        return generate_remote(args)
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

    from specray.bench.engine_bench import bench, dump, markdown
    from specray.bench.engine_runner import mode_spec

    modes = args.modes.split(",")
    for mode in modes:
        mode_spec(mode)  # raises on an unknown mode
    config = engine_config(args, max_context=args.max_tokens + 512)
    rows = asyncio.run(bench(config, modes, list(args.batch), args.engines.split(","), args.requests,
                             args.max_tokens, args.temperature, args.repeat))
    print(markdown(rows))
    dump(rows, args.json_out)
    return 0


def cmd_bench_round(args: argparse.Namespace) -> int:
    from specray.bench.round_profile import markdown, run
    from specray.core.device import pick_device
    from specray.core.loader import load_config, load_shard, load_tokenizer

    device = pick_device(args.device)
    layers = engine_config(args).stage_layers(load_config(args.target).num_layers)
    target = [load_shard(args.target, start, stop, args.dtype, device) for start, stop in layers]
    draft = load_shard(args.draft, dtype=args.dtype, device=device)
    print(markdown(run(target, draft, load_tokenizer(args.target), args.modes.split(","), list(args.batch),
                       args.rounds, args.temperature)))
    return 0


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def cmd_bench(args: argparse.Namespace) -> int:
    from specray.bench.compare import main as compare
    from specray.bench.settings import BenchConfig

    config = BenchConfig.build(
        args.quick, target=args.target, draft=args.draft, dtype=args.dtype, device=args.device,
        num_target_stages=args.num_target_stages, prompt_sets=args.prompts, num_prompts=args.num_prompts,
        max_tokens=args.max_tokens, temperature=args.temperature, concurrency=args.concurrency,
        modes=args.modes, systems=args.systems, max_batch=args.max_batch, seed=args.seed, out=args.out)
    print(compare(config))
    return 0


def add_bench_args(b: argparse.ArgumentParser) -> None:
    """`specray bench` (no subcommand): unset flags take the full or the --quick defaults."""
    add_model_args(b)
    b.add_argument("--prompts", type=_str_list, help="prompt sets (default: code,prose)")
    b.add_argument("--num-prompts", type=_int_list, help="prompts per set, one value or one per set "
                   "(default: all, 48 code and 32 prose; quick: 8,4)")
    b.add_argument("--max-tokens", type=int, help="tokens per request (default: 64; quick: 32)")
    b.add_argument("--temperature", type=float, help="0 (default) is greedy, checked against transformers")
    b.add_argument("--concurrency", type=_int_list, help="gRPC client concurrency (default: 1,4,16,64; quick: 1,4,16)")
    b.add_argument("--modes", type=_str_list, help="specray modes (default: off,chain,tree,async; chain:K and "
                   "async:K set another draft length than 4, async:c=C a Saguaro weight)")
    b.add_argument("--systems", type=_str_list, help="hf,assisted,local,ray,grpc (default: all)")
    b.add_argument("--max-batch", type=int, help="the gRPC replica's batch (default: 8)")
    b.add_argument("--seed", type=int, help="request i is seeded seed + i (default: 0)")
    b.add_argument("--quick", action="store_true", help="a run of a few minutes: fewer prompts, tokens, settings")
    b.add_argument("--out", default=None, help="output folder (default: bench_results/<timestamp>/)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specray", description="speculative-decoding LLM serving on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate one completion and print speculation statistics")
    add_model_args(g)
    g.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="run draft and target stages in this process, or as Ray actors")
    g.add_argument("--server", default=None, metavar="HOST:PORT",
                   help="send the request to a running specray server over gRPC instead (model flags ignored)")
    add_request_args(g)
    g.set_defaults(func=cmd_generate)
    s = sub.add_parser("serve", help="serve the models over gRPC and OpenAI-style HTTP with Ray Serve")
    add_model_args(s)
    add_speculation_args(s)
    add_serve_args(s)
    s.set_defaults(func=cmd_serve)
    b = sub.add_parser("bench", help="compare transformers and specray systems (or a benchmark subcommand)")
    add_bench_args(b)
    b.set_defaults(func=cmd_bench)
    bsub = b.add_subparsers(dest="bench", required=False)
    e = bsub.add_parser("engine", help="every mode, in process and through Ray actors, at several batch sizes")
    add_model_args(e)
    e.add_argument("--modes", default="off,chain,tree,async", help="as `specray bench --modes`")
    e.add_argument("--batch", type=_int_list, default=(1, 8), help="batch sizes, e.g. 1,8")
    e.add_argument("--engines", default="local,ray:graph,ray:calls",
                   help="local, ray (with --transport), ray:graph, ray:calls")
    e.add_argument("--requests", type=int, default=48,
                   help="requests per setting (default: all 48 code prompts; 16 leave a rate of 0.3 +- 0.025)")
    e.add_argument("--max-tokens", type=int, default=64)
    e.add_argument("--temperature", type=float, default=0.0)
    e.add_argument("--repeat", type=int, default=1,
                   help="run the whole sweep N times in turn and report each row's median")
    e.add_argument("--json-out", default=None, help="also write the rows as JSON here")
    e.set_defaults(func=cmd_bench_engine)
    r = bsub.add_parser("round", help="one round in process: ms, torch ops and host reads per round (no Ray)")
    add_model_args(r)
    r.add_argument("--modes", default="off,chain,tree,async", help="as `specray bench --modes`")
    r.add_argument("--batch", type=_int_list, default=(1, 8), help="batch sizes, e.g. 1,8")
    r.add_argument("--rounds", type=int, default=16, help="rounds measured after one warm-up round")
    r.add_argument("--temperature", type=float, default=0.0)
    r.set_defaults(func=cmd_bench_round)
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
