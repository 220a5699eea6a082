"""The specray systems under test, configured from one BenchConfig: the engine in process (`local`), over
Ray actors (`ray`), and the Serve app over gRPC (`grpc`), with the Ray instance they share.

The engines run one request at a time (max_batch 1, as the transformers baselines); the app runs one
replica with small CPU bundles (replica 0.2, draft 0.8, stage 1.0) so it fits beside the driver and
the client threads on a small machine."""
from __future__ import annotations

from contextlib import contextmanager

from specray.bench.engine_runner import drive, engine_requests, mode_spec
from specray.bench.settings import BenchConfig
from specray.engine import ActorResources, Engine, EngineConfig


def max_context(cfg: BenchConfig, prompt_lens: list[int]) -> int:
    """KV rows per slot: the longest prompt + max_tokens + the largest round's speculation."""
    return max(prompt_lens) + cfg.max_tokens + max(mode_spec(m).draft_rows for m in cfg.modes)


def engine_config(cfg: BenchConfig, kind: str, context: int) -> EngineConfig:
    res = ActorResources(num_cpus=cfg.threads)
    return EngineConfig(target=cfg.target, draft=cfg.draft, dtype=cfg.dtype, device=cfg.device,
                        num_target_stages=cfg.num_target_stages, max_batch=1, max_context=context,
                        kind=kind, draft_resources=res, stage_resources=res)


def app_config(cfg: BenchConfig, context: int):
    """One replica, batch cfg.max_batch, a queue that holds the highest concurrency level."""
    from specray.deployments.config import AppConfig
    return AppConfig(target=cfg.target, draft=cfg.draft, dtype=cfg.dtype, device=cfg.device,
                     num_target_stages=cfg.num_target_stages, max_batch=cfg.max_batch, max_context=context,
                     max_waiting=max(64, *cfg.concurrency), max_tokens_limit=max(64, cfg.max_tokens),
                     replica_cpus=0.2, draft_cpus=0.8, stage_cpus=1.0, min_replicas=1, max_replicas=1)


async def warm_up(engine: Engine, modes: tuple[str, ...], prompt: list[int], temperature: float) -> None:
    """One short request per mode, untimed: first calls allocate and load lazily."""
    for mode in modes:
        await drive(engine, engine_requests(f"warm-{mode}", [prompt], mode, 8, temperature), 1)


@contextmanager
def ray_session(num_cpus: int):
    """Ray started here with num_cpus (unless already running) and shut down after the block, so the
    Ray engine and the Serve app see the same instance."""
    import ray
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=num_cpus, include_dashboard=False)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
