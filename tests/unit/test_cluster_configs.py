"""cluster/: the deployment files are valid for the tools that read them and agree with specray.

Each Serve config (serve_config.yaml, serve_config_gpu.yaml, the serveConfigV2 inside
rayservice.yaml) validates as Ray Serve's ServeDeploySchema with no key Serve would silently ignore,
its import paths and gRPC servicer functions resolve the way Serve resolves them, its builder binds
the application from its `args`, and those build specray's AppConfig. ray-cluster.yaml validates
against the launcher's JSON schema and passes its checks. No Ray cluster is started and no model
is loaded (AppConfig does not open the paths)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from pydantic import BaseModel
from ray import serve
from ray._common.utils import import_attr
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from specray.assets import DEMO_DRAFT, DEMO_TARGET
from specray.deployments.config import GRPC_SERVICER, AppConfig

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
SERVE_CONFIGS = ["serve_config.yaml", "serve_config_gpu.yaml", "rayservice.yaml"]
PLACEHOLDER_MODELS = {"serve_config_gpu.yaml", "rayservice.yaml"}  # checkpoints that exist on a cluster only
TORCH_PIN = re.search(r'"(torch==[^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)


def documents(name: str) -> list[dict]:
    return list(yaml.safe_load_all((CLUSTER / name).read_text()))


def rayservice() -> dict:
    return next(d for d in documents("rayservice.yaml") if d["kind"] == "RayService")


def serve_config(name: str) -> dict:
    """The Serve config in cluster/<name>: the file itself, or a RayService's serveConfigV2 string."""
    if name == "rayservice.yaml":
        return yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    return documents(name)[0]


def ignored_keys(data: dict, model: type[BaseModel], where: str) -> list[str]:
    """Keys of `data` that are no field of `model`, recursively: Serve's schemas accept and drop them."""
    out = []
    for key, value in data.items():
        if key not in model.model_fields:
            out.append(f"{where}.{key}")
            continue
        sub = model.model_fields[key].annotation
        if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
            out += ignored_keys(value, sub, f"{where}.{key}")
    return out


def local_args(name: str, args: dict) -> dict:
    """An app's args, its placeholder checkpoints (if any) swapped for the demo pair."""
    if name not in PLACEHOLDER_MODELS:
        return args
    assert {"target", "draft"} <= set(args), "the GPU configs should name their checkpoints"
    return {**args, "target": DEMO_TARGET, "draft": DEMO_DRAFT}


def app_config(name: str, args: dict) -> AppConfig:
    return AppConfig.from_args(local_args(name, args))


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_serve_config_validates_with_no_ignored_keys(name):
    config = serve_config(name)
    schema = ServeDeploySchema.model_validate(config)
    assert [app.name for app in schema.applications] == ["specray"]
    problems = ignored_keys(config, ServeDeploySchema, name)
    for i, app in enumerate(config["applications"]):
        problems += ignored_keys(app, ServeApplicationSchema, f"{name}.applications[{i}]")
        assert "deployments" not in app, "the builder sets deployment options; configure through args"
    assert not problems, f"keys Serve would ignore: {problems}"


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_import_paths_resolve_to_builders(name):
    """As Serve does it: import the builder and call it with the args (it only binds; nothing starts)."""
    for app in serve_config(name)["applications"]:
        builder = import_attr(app["import_path"])
        assert callable(builder), app["import_path"]
        assert isinstance(builder(local_args(name, app.get("args", {}))), serve.Application)


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_grpc_servicer_functions_resolve(name):
    functions = serve_config(name)["grpc_options"]["grpc_servicer_functions"]
    assert functions == [GRPC_SERVICER]
    assert all(callable(import_attr(f)) for f in functions)


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_app_args_build_an_app_config(name):
    for app in serve_config(name)["applications"]:
        config = app_config(name, app.get("args", {}))
        assert config.deployment_options()["name"] == "SpecDecode"
        if name not in PLACEHOLDER_MODELS:
            assert Path(config.target).exists() and Path(config.draft).exists()


def test_cpu_config_fits_a_two_core_machine():
    app = serve_config("serve_config.yaml")["applications"][0]
    config = app_config("serve_config.yaml", app["args"])
    assert sum(b.get("CPU", 0) for b in config.bundles()) * config.max_replicas <= 2
    assert not any(b.get("GPU") for b in config.bundles())


def test_rayservice_embeds_the_gpu_serve_config():
    assert serve_config("rayservice.yaml") == serve_config("serve_config_gpu.yaml")


def test_rayservice_exposes_the_serve_ports_and_fits_a_replica():
    spec = rayservice()["spec"]["rayClusterConfig"]
    config = serve_config("rayservice.yaml")
    http, grpc = config["http_options"]["port"], config["grpc_options"]["port"]
    head = spec["headGroupSpec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    assert ports["serve"] == http and grpc in ports.values()  # KubeRay's HTTP Service: the port named serve
    service = next(d for d in documents("rayservice.yaml") if d["kind"] == "Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [grpc]
    labels = {k: v for k, v in service["spec"]["selector"].items() if not k.startswith("ray.io/")}
    for template in [head, *(g["template"] for g in spec["workerGroupSpecs"])]:
        assert labels.items() <= template["metadata"]["labels"].items(), "the gRPC Service selects no pod"
    bundles = app_config("rayservice.yaml", config["applications"][0]["args"]).bundles()
    limits = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert float(limits["nvidia.com/gpu"]) >= sum(b.get("GPU", 0) for b in bundles)
    assert float(limits["cpu"]) >= sum(b.get("CPU", 0) for b in bundles)
    assert spec["rayVersion"] == ray.__version__


def test_ray_cluster_yaml_matches_the_launcher_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(documents("ray-cluster.yaml")[0], schema)


def test_ray_cluster_yaml_passes_the_launcher_checks_and_pins_versions():
    config = prepare_config(documents("ray-cluster.yaml")[0])  # fills in the AWS defaults, offline
    validate_config(config)  # the schema, plus head_node_type among the node types and min <= max workers
    assert any(TORCH_PIN in c for c in config["setup_commands"]), f"setup should install {TORCH_PIN}"
    images = [v for k, v in config["docker"].items() if k.endswith("image")]
    assert images and all(f":{ray.__version__}-" in i for i in images)
