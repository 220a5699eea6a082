"""What one `specray bench` comparison runs: a frozen, validated configuration, with full and quick defaults.

Systems: `hf` (transformers target-only generate, greedy and sampled), `assisted` (transformers
assisted generation with the same draft, its `num_assistant_tokens` swept on a calibration subset),
`local` (the specray engine in process), `ray` (the engine over Ray actors), `grpc` (the Serve app
over gRPC, swept over client concurrency). `local` and `ray` run one request at a time (batch 1,
as the transformers baselines); `grpc` runs at every concurrency level."""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from specray.assets import DEMO_DRAFT, DEMO_TARGET
from specray.bench.engine_runner import MODES, mode_spec
from specray.bench.workload import SETS

SYSTEMS = ("hf", "assisted", "local", "ray", "grpc")


@dataclass(frozen=True)
class AssistSetting:
    """Assisted generation's draft length: a constant K, or transformers' schedules. threshold: the
    assistant's confidence early stop (0 = off: exactly K drafted tokens per round)."""
    label: str
    num_assistant_tokens: int
    schedule: str = "constant"
    threshold: float = 0.0


ASSIST_FULL = (*(AssistSetting(f"K={k}", k) for k in (2, 4, 6, 8)),
               AssistSetting("heuristic", 5, "heuristic"),             # transformers 4.x's default
               AssistSetting("library default", 20, "constant", 0.4))  # transformers 5's default
QUICK_PROMPTS = {"code": 8, "prose": 4}
ASSIST_QUICK = (AssistSetting("K=2", 2), AssistSetting("K=4", 4), AssistSetting("heuristic", 5, "heuristic"))


@dataclass(frozen=True)
class BenchConfig:
    """num_prompts: per prompt set (one value for all sets; empty: every prompt). temperature: the
    workload's (0 = greedy, then greedy outputs are checked against transformers' target-only greedy
    output); the `hf` sampled baseline uses it, or `sampled_temperature` when it is 0.
    calibration_prompts: per set, for the assisted sweep. max_batch / ray_cpus: the gRPC replica's
    batch and the CPUs the local Ray instance advertises. threads: torch threads of every in-process
    system (the local engine's stages take as many)."""
    target: str = DEMO_TARGET
    draft: str = DEMO_DRAFT
    dtype: str = "auto"
    device: str = "auto"
    num_target_stages: int = 1
    prompt_sets: tuple[str, ...] = SETS
    num_prompts: tuple[int, ...] = ()
    max_tokens: int = 64
    temperature: float = 0.0
    sampled_temperature: float = 0.8
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    modes: tuple[str, ...] = tuple(MODES)
    systems: tuple[str, ...] = SYSTEMS
    assist: tuple[AssistSetting, ...] = ASSIST_FULL
    calibration_prompts: int = 4
    max_batch: int = 8
    ray_cpus: int = 4
    threads: int = 1
    seed: int = 0
    out: Path | None = None  # None: bench_results/<timestamp>/

    def __post_init__(self):
        for name, allowed in (("prompt_sets", SETS), ("systems", SYSTEMS)):
            unknown = sorted(set(getattr(self, name)) - set(allowed))
            if unknown or not getattr(self, name):
                raise ValueError(f"{name}: unknown {unknown} or none given; choose from {list(allowed)}")
        if not self.modes:
            raise ValueError(f"modes: none given; choose from {list(MODES)}, or chain:K / async:K / async:c=C")
        for mode in self.modes:
            mode_spec(mode)
        if self.max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2 (TPOT needs two tokens), got {self.max_tokens}")
        if self.temperature < 0 or self.sampled_temperature <= 0:
            raise ValueError("temperature must be >= 0 and sampled_temperature > 0")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency levels must be >= 1, got {list(self.concurrency)}")
        for name in ("calibration_prompts", "max_batch", "ray_cpus", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def hf_sampled_temperature(self) -> float:
        return self.temperature or self.sampled_temperature

    @classmethod
    def build(cls, quick: bool = False, **given) -> BenchConfig:
        """Given settings (None: unset) over the quick or full defaults. Quick: 8 code + 4 prose prompts,
        32 tokens, concurrency 1,4,16, three assisted settings on 2 calibration prompts per set."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(f"unknown bench settings {unknown}")
        given = {k: v for k, v in given.items() if v is not None}
        defaults = {}
        if quick:
            sets = given.get("prompt_sets", SETS)
            defaults = {"num_prompts": tuple(QUICK_PROMPTS.get(s, 8) for s in sets), "max_tokens": 32,
                        "concurrency": (1, 4, 16), "assist": ASSIST_QUICK, "calibration_prompts": 2}
        return cls(**{**defaults, **given})
