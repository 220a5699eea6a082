"""The serving engine: scheduler and step loop over a draft worker and target stages (local or Ray actors).

`build_engine(config)` loads what the engine needs and starts its workers; `complete(engine, req)`
collects one request's output. Knows nothing of Serve or gRPC."""
from __future__ import annotations

from specray.core.loader import load_config, load_tokenizer
from specray.core.sequence import SpecStats
from specray.engine.engine import Engine, EngineStopped
from specray.engine.requests import ActorResources, Delta, EngineConfig, EngineRequest
from specray.engine.workers import LocalWorkers, RayWorkers, make_workers

__all__ = ["ActorResources", "Delta", "Engine", "EngineConfig", "EngineRequest", "EngineStopped",
           "LocalWorkers", "RayWorkers", "build_engine", "complete"]


def build_engine(config: EngineConfig, tokenizer=None, placement_group=None, first_bundle: int = 0,
                 name: str | None = None) -> Engine:
    """An engine with its workers started. tokenizer: None loads config.tokenizer (default: the
    target's). With a placement group, the draft worker takes bundle `first_bundle` and stage i
    bundle `first_bundle + 1 + i`. name: Ray actors are named `{name}-draft`, `{name}-stage{i}`."""
    model = load_config(config.target)
    layers = config.stage_layers(model.num_layers)
    if tokenizer is None:
        tokenizer = load_tokenizer(config.tokenizer or config.target)
    workers = make_workers(config, layers, placement_group, first_bundle, name)
    return Engine(workers, config, tokenizer, model.eos_token_ids, model.vocab_size)


async def complete(engine: Engine, req: EngineRequest) -> tuple[list[int], str, SpecStats]:
    """Run one request to the end: (token ids, finish reason, speculation statistics)."""
    tokens, reason, stats = [], None, None
    async for delta in engine.generate(req):
        tokens += delta.token_ids
        reason, stats = delta.finish_reason, delta.stats
    return tokens, reason, stats
