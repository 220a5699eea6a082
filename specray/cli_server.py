"""`specray serve` (Ray + Serve + the app, until Ctrl-C) and `specray generate --server` (a gRPC client
that streams to the terminal). The argument parser lives in cli.py."""
from __future__ import annotations

import argparse
import json
import sys
import time


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="join this Ray cluster (default: start a local one)")
    p.add_argument("--grpc-port", type=int, default=9000, help="gRPC proxy port (binds all interfaces)")
    p.add_argument("--http-host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="KV slots: sequences running at once per replica")
    p.add_argument("--max-context", type=int, default=None, help="KV rows per slot (default: the target's)")
    p.add_argument("--max-waiting", type=int, default=56, help="requests queued per replica beyond the batch")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="the most max_tokens one request may ask")
    p.add_argument("--replica-cpus", type=float, default=0.2)
    p.add_argument("--draft-cpus", type=float, default=0.8, help="draft worker CPUs (also its torch threads)")
    p.add_argument("--draft-gpus", type=float, default=0.0)
    p.add_argument("--stage-cpus", type=float, default=1.0, help="CPUs per target stage (also torch threads)")
    p.add_argument("--stage-gpus", type=float, default=0.0, help="GPUs per target stage")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=1, help="autoscaling bound (each replica needs its "
                                                                "own placement group)")
    p.add_argument("--name", default="specray", help="Serve application name (also the HTTP model name)")


def app_config(args: argparse.Namespace):
    from specray.cli import engine_settings, speculation_settings
    from specray.deployments import AppConfig
    spec = speculation_settings(args)
    if spec["mode"] == "tree" and not spec["branching"]:
        del spec["branching"], spec["num_speculative_tokens"]  # the app's tree_branching
    return AppConfig(
        target=args.target, draft=args.draft, dtype=args.dtype, device=args.device,
        num_target_stages=args.num_target_stages, **engine_settings(args), max_batch=args.max_batch, max_context=args.max_context,
        speculation=spec, max_tokens_limit=args.max_tokens_limit, max_waiting=args.max_waiting,
        replica_cpus=args.replica_cpus, draft_cpus=args.draft_cpus, draft_gpus=args.draft_gpus,
        stage_cpus=args.stage_cpus, stage_gpus=args.stage_gpus, min_replicas=args.min_replicas,
        max_replicas=args.max_replicas, name=args.name)


def cmd_serve(args: argparse.Namespace) -> int:
    from specray.deployments.run import serve_forever
    serve_forever(app_config(args), args.address, args.grpc_port, args.http_host, args.http_port)
    return 0


def generate_remote(args: argparse.Namespace) -> int:
    """Stream one completion from a running server to stdout; statistics to stderr at the end."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    from specray.client import Client

    fields = {"mode": args.mode, "backup": args.backup, "temperature": args.temperature, "top_p": args.top_p,
              "top_k": args.top_k, "seed": args.seed, "max_tokens": args.max_tokens,
              "num_speculative_tokens": args.num_speculative_tokens,
              "branching": args.branching, "with_replacement": args.with_replacement, "fan_out": args.fan_out,
              "saguaro_c": args.saguaro_c}
    text, ids, last, start = [], [], None, time.perf_counter()
    try:
        with Client(args.server) as client:
            if not args.json:
                print(args.prompt, end="", flush=True)
            for part in client.stream(args.prompt, **fields):
                text.append(part.text)
                ids += part.token_ids
                last = part
                if not args.json:
                    print(part.text, end="", flush=True)
    except grpc.RpcError as e:
        print(f"\nspecray: server error {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    summary = MessageToDict(last, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    if args.json:
        print(json.dumps({"text": "".join(text), "token_ids": ids, "finish_reason": summary["finish_reason"],
                          "usage": summary["usage"], "stats": summary["stats"], "seconds": seconds}))
    else:
        print(f"\n[{len(ids)} tokens in {seconds:.2f}s, {len(ids) / seconds:.1f} tok/s, "
              f"{summary['finish_reason']}; " + ", ".join(f"{k} {v}" for k, v in summary["stats"].items()) + "]",
              file=sys.stderr)
    return 0
