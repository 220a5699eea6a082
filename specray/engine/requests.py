"""The engine's typed messages and its configuration, all frozen dataclasses validated on creation.

In: `EngineRequest`. Out: `Delta` (a request's newly committed tokens and text; the last one carries
the finish reason and the request's speculation statistics). `EngineConfig` says which models, how
the target is split into stages, how many slots, and where each actor runs. Bad values raise
`ValueError` with a message a user can act on."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from specray.core.loader import parse_dtype
from specray.core.sampling import SamplingParams
from specray.core.sequence import SpecStats
from specray.core.speculation import SpeculationConfig

KINDS = ("local", "ray")
TRANSPORTS = ("graph", "calls")


@dataclass(frozen=True)
class EngineRequest:
    rid: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    spec: SpeculationConfig | None = None  # None: the engine's default
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        object.__setattr__(self, "prompt_ids", tuple(int(t) for t in self.prompt_ids))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not self.rid:
            raise ValueError("request id must be a non-empty string")
        if not self.prompt_ids:
            raise ValueError("prompt must not be empty")
        if min(self.prompt_ids) < 0:
            raise ValueError("prompt token ids must be >= 0")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(self.stop)}")


@dataclass(frozen=True)
class Delta:
    rid: str
    token_ids: tuple[int, ...]      # committed this round (cut at EOS, a stop string or max_tokens)
    text: str                       # their text (held back while it may start a stop string)
    finish_reason: str | None = None  # "eos" | "length" | "stop" on the last delta
    stats: SpecStats | None = None    # on the last delta


@dataclass(frozen=True)
class ActorResources:
    """What one actor asks Ray for: CPUs (also its torch threads), GPUs, custom resources
    (e.g. {"draft_node": 1} to pin it to a node started with that resource)."""
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"num_cpus and num_gpus must be >= 0, got {self.num_cpus} and {self.num_gpus}")
        if any(not isinstance(v, (int, float)) or v < 0 for v in self.resources.values()):
            raise ValueError(f"custom resources must map names to amounts >= 0, got {self.resources}")


@dataclass(frozen=True)
class EngineConfig:
    """target/draft: HF checkpoint directories or .gguf files (no draft: every request must be `off`).
    layer_split: layers per stage, e.g. (1, 2); empty splits evenly. max_batch: KV slots, the most
    sequences running at once. max_context: KV rows per slot (prompt + output + one speculation).
    auto_backup_batch: b*, the running-batch size from which SSD's `auto` backup is `fast`.
    kind: `local` runs the workers in process (torch threads = stage_resources.num_cpus), `ray` as
    actors, each with its own resources (torch threads = its num_cpus). transport (ray only): how a
    step reaches the actors, `graph` (a compiled Ray graph) or `calls` (one actor call per worker)."""
    target: str
    draft: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    num_target_stages: int = 1
    layer_split: tuple[int, ...] = ()
    max_batch: int = 8
    max_context: int = 2048
    spec: SpeculationConfig = field(default_factory=SpeculationConfig)
    auto_backup_batch: int = 2
    kind: str = "local"
    transport: str = "graph"
    tokenizer: str | None = None  # None: the target's
    draft_resources: ActorResources = ActorResources()
    stage_resources: ActorResources = ActorResources()

    def __post_init__(self):
        object.__setattr__(self, "layer_split", tuple(int(n) for n in self.layer_split))
        parse_dtype(self.dtype)
        if self.num_target_stages < 1:
            raise ValueError(f"num_target_stages must be >= 1, got {self.num_target_stages}")
        split = self.layer_split
        if split and (len(split) != self.num_target_stages or min(split) < 1):
            raise ValueError(f"layer_split needs num_target_stages = {self.num_target_stages} positive layer "
                             f"counts, got {list(self.layer_split)}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_context < 2:
            raise ValueError(f"max_context must be >= 2, got {self.max_context}")
        if self.auto_backup_batch < 1:
            raise ValueError(f"auto_backup_batch must be >= 1, got {self.auto_backup_batch}")
        if self.kind not in KINDS:
            raise ValueError(f"engine kind must be one of {KINDS}, got {self.kind!r}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.draft is None and self.spec.mode != "off":
            raise ValueError(f"default mode {self.spec.mode!r} needs a draft model; give one or use "
                             "mode 'off'")

    def stage_layers(self, num_layers: int) -> list[tuple[int, int]]:
        """The [start, stop) layer range of each stage for a target with num_layers layers."""
        sizes = self.layer_split or tuple(num_layers // self.num_target_stages
                                          + (i < num_layers % self.num_target_stages)
                                          for i in range(self.num_target_stages))
        if sum(sizes) != num_layers or min(sizes) < 1:
            raise ValueError(f"cannot split {num_layers} target layers into stages of {list(sizes)} layers")
        bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        return list(itertools.pairwise(bounds))
