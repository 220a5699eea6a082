"""The serving application's configuration: one frozen dataclass, built from a Serve config's `args`.

`AppConfig` says which models to serve and how (everything `EngineConfig` takes), what one request
may ask for, where each replica's actors run (its placement-group bundles), and how Serve scales
replicas. `AppConfig.from_args(dict)` is what `serve run cluster/serve_config.yaml` feeds it;
unknown keys are an error, not ignored. Knows nothing of protobuf or HTTP."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from specray.assets import DEMO_DRAFT, DEMO_TARGET
from specray.core.speculation import SpeculationConfig
from specray.engine import ActorResources, EngineConfig

GRPC_SERVICER = "specray.v1.specray_pb2_grpc.add_SpecDecodeServicer_to_server"
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
DEFAULT_MAX_CONTEXT = 8192  # KV rows per slot when the config names none and the model allows more


def _bundle(cpus: float, gpus: float) -> dict:
    """A placement-group bundle without zero entries (Ray rejects empty bundles)."""
    bundle = {k: v for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0}
    if not bundle:
        raise ValueError("every actor needs some CPU or GPU (a bundle cannot be empty)")
    return bundle


@dataclass(frozen=True)
class AppConfig:
    """target/draft: HF checkpoint directories or .gguf files (default: the embedded demo pair).
    speculation: the default speculation settings (SpeculationConfig's fields); `tree_branching` is
    the branching a tree request gets when it names none. max_context: KV rows per slot (None: the
    target's max_position_embeddings, at most DEFAULT_MAX_CONTEXT; the KV cache is allocated up front,
    and a replica whose cache does not fit its device refuses to start, naming what to lower). max_waiting: requests queued per replica beyond the running
    batch; past it a request gets RESOURCE_EXHAUSTED. transport: how a step reaches the replica's
    actors, `graph` (compiled Ray graph) or `calls` (actor calls). *_cpus / *_gpus: each actor's bundle (CPUs are
    also its torch threads). Autoscaling: min/max/initial replicas, target ongoing requests per
    replica (None: max_batch), up/downscale delays, the window over which load is averaged (longer than the
    interval at which replicas report it)."""
    target: str = DEMO_TARGET
    draft: str | None = DEMO_DRAFT
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    num_target_stages: int = 1
    transport: str = EngineConfig.transport
    layer_split: tuple[int, ...] = ()
    max_batch: int = 8
    max_context: int | None = None
    speculation: dict = field(default_factory=lambda: {"mode": "chain", "num_speculative_tokens": 4})
    tree_branching: tuple[int, ...] = (2, 2, 1)
    max_tokens_limit: int = 1024
    default_max_tokens: int = 64
    max_prompt_bytes: int = 1 << 20
    max_stop_strings: int = 16
    max_waiting: int = 56
    replica_cpus: float = 0.2
    draft_cpus: float = 0.8
    draft_gpus: float = 0.0
    stage_cpus: float = 1.0
    stage_gpus: float = 0.0
    placement_strategy: str = "PACK"
    min_replicas: int = 1
    max_replicas: int = 4
    initial_replicas: int | None = None
    target_ongoing_requests: float | None = None
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 120.0
    look_back_period_s: float = 30.0
    metrics_interval_s: float = 10.0
    name: str = "specray"

    def __post_init__(self):
        object.__setattr__(self, "layer_split", tuple(self.layer_split))
        object.__setattr__(self, "tree_branching", tuple(self.tree_branching))
        self.default_speculation  # noqa: B018 -- validates the speculation settings
        self.engine_config(self.max_context or 2)  # validates everything the engine takes
        for name in ("max_tokens_limit", "default_max_tokens", "max_prompt_bytes", "min_replicas"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit "
                             f"({self.max_tokens_limit})")
        if self.max_stop_strings < 0 or self.max_waiting < 0:
            raise ValueError("max_stop_strings and max_waiting must be >= 0")
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})")
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(f"initial_replicas ({initial}) must lie in [min_replicas, max_replicas]")
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError(f"look_back_period_s ({self.look_back_period_s}) must exceed metrics_interval_s "
                             f"({self.metrics_interval_s})")
        if self.placement_strategy not in STRATEGIES:
            raise ValueError(f"placement_strategy must be one of {STRATEGIES}, got {self.placement_strategy!r}")
        self.bundles()  # validates the resources

    @classmethod
    def from_args(cls, args: dict | None) -> AppConfig:
        """From a Serve config's `args` mapping; unknown keys raise ValueError naming them."""
        args = dict(args or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown specray app settings {unknown}; known: {sorted(known)}")
        return cls(**args)

    @property
    def default_speculation(self) -> SpeculationConfig:
        spec = dict(self.speculation)
        if spec.get("mode") == "tree":
            spec.setdefault("branching", self.tree_branching)
            spec.setdefault("num_speculative_tokens", len(spec["branching"]))
        try:
            return SpeculationConfig(**spec)
        except TypeError:
            raise ValueError(f"speculation takes {list(SpeculationConfig.__dataclass_fields__)}, "
                             f"got {sorted(spec)}") from None

    def context(self, max_position_embeddings: int) -> int:
        """KV rows per slot: max_context, else the target's context capped at DEFAULT_MAX_CONTEXT (a
        Llama-3.1 70B's 131,072 rows x 8 slots would ask for ~320 GiB of KV cache)."""
        return self.max_context or min(max_position_embeddings, DEFAULT_MAX_CONTEXT)

    def engine_config(self, max_context: int) -> EngineConfig:
        """The engine of one replica (Ray actors), given the resolved max_context."""
        return EngineConfig(
            target=self.target, draft=self.draft, dtype=self.dtype, device=self.device,
            num_target_stages=self.num_target_stages, layer_split=self.layer_split, max_batch=self.max_batch,
            max_context=max_context, spec=self.default_speculation, kind="ray", transport=self.transport,
            tokenizer=self.tokenizer,
            draft_resources=ActorResources(self.draft_cpus, self.draft_gpus),
            stage_resources=ActorResources(self.stage_cpus, self.stage_gpus))

    def bundles(self) -> list[dict]:
        """One replica's placement group: the replica itself, the draft worker, then each stage."""
        return [_bundle(self.replica_cpus, 0), _bundle(self.draft_cpus, self.draft_gpus),
                *[_bundle(self.stage_cpus, self.stage_gpus)] * self.num_target_stages]

    @property
    def max_ongoing(self) -> int:
        """Requests Serve lets into one replica: the batch, its queue, and room for info calls."""
        return self.max_batch + self.max_waiting + 8

    def deployment_options(self) -> dict:
        """Options for `serve.deployment(...).options(**)`: placement group, autoscaling, limits."""
        autoscaling = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                       "target_ongoing_requests": self.target_ongoing_requests or self.max_batch,
                       "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
                       "look_back_period_s": self.look_back_period_s, "metrics_interval_s": self.metrics_interval_s}
        if self.initial_replicas is not None:
            autoscaling["initial_replicas"] = self.initial_replicas
        return {
            "name": "SpecDecode",
            "ray_actor_options": {"num_cpus": self.replica_cpus},
            "placement_group_bundles": self.bundles(),
            "placement_group_strategy": self.placement_strategy,
            "autoscaling_config": autoscaling,
            "max_ongoing_requests": self.max_ongoing,
            "logging_config": {"enable_access_log": False},
            "health_check_period_s": 5,
        }
