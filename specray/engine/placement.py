"""Where the worker actors go, and a check that they can go there before anything waits.

Inside a placement group (a Serve replica) each actor takes its bundle. Otherwise the actors ask
the cluster for their `ActorResources`; on a local Ray that this module started, the CPU requests
are first scaled down to fit the machine (torch still gets max(1, int(num_cpus)) threads), so
`specray generate --engine ray --num-target-stages 2` runs on a 2-core box instead of waiting
forever. A request no node or the cluster as a whole can satisfy fails at once with a message
naming what was asked and what is available."""
from __future__ import annotations

import os

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from specray.engine.requests import ActorResources, EngineConfig


def start_local_ray() -> None:
    """Start a local Ray on this machine, for engines built without a running one."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(include_dashboard=False)


def _fit_cpus(asked: list[ActorResources]) -> list[ActorResources]:
    """Scale the CPU requests down (never up) so that together they fit the cluster's CPUs."""
    total = ray.cluster_resources().get("CPU", 0)
    need = sum(r.num_cpus for r in asked)
    if need <= total or need == 0:
        return asked
    return [ActorResources(r.num_cpus * total / need, r.num_gpus, r.resources) for r in asked]


def _check_feasible(names: list[str], asked: list[ActorResources]) -> None:
    """ValueError if an actor fits no node, or all of them together exceed what the cluster has."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    cluster = ray.cluster_resources()
    total: dict[str, float] = {}
    for name, res in zip(names, asked):
        want = {"CPU": res.num_cpus, "GPU": res.num_gpus, **res.resources}
        want = {k: v for k, v in want.items() if v}
        for k, v in want.items():
            total[k] = total.get(k, 0) + v
        if not any(all(node.get(k, 0) >= v for k, v in want.items()) for node in nodes):
            raise ValueError(f"the {name} actor asks for {want}, which no node of this Ray cluster has "
                             f"(nodes: {[{k: v for k, v in n.items() if not k.startswith('node:')} for n in nodes]}); "
                             "lower its resources or add a node that has them")
    short = {k: (v, cluster.get(k, 0)) for k, v in total.items() if v > cluster.get(k, 0) + 1e-9}
    if short:
        raise ValueError("the engine's actors together ask for more than this Ray cluster has: "
                         + ", ".join(f"{k} {v:g} asked, {f:g} in the cluster" for k, (v, f) in short.items())
                         + "; lower the draft and stage resources (e.g. --draft-cpus, --stage-cpus) or add nodes")


def actor_options(config: EngineConfig, num_stages: int, placement_group=None, first_bundle: int = 0,
                  name: str | None = None, fit: bool = False) -> tuple[dict, list[dict]]:
    """`ray.remote(...).options(**)` for the draft worker and for each stage. fit: scale the CPU
    requests to the cluster first (for a local Ray this process started)."""
    names = ["draft"] + [f"stage{i}" for i in range(num_stages)]
    asked = [config.draft_resources] + [config.stage_resources] * num_stages
    if placement_group is None:
        asked = _fit_cpus(asked) if fit else asked
        _check_feasible(names, asked)
    options = []
    for i, (actor, res) in enumerate(zip(names, asked)):
        opts = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus, "resources": dict(res.resources),
                "name": name and f"{name}-{actor}"}
        if placement_group is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group, placement_group_bundle_index=first_bundle + i)
        options.append(opts)
    return options[0], options[1:]
