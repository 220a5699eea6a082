"""The Serve application builder: `serve run specray.deployments.app:build_app` or a config YAML
(cluster/serve_config.yaml) whose `args` are `AppConfig`'s fields."""
from __future__ import annotations

from ray import serve

from specray.deployments.config import AppConfig
from specray.deployments.server import SpecDecodeServer


def build_app(args: dict | AppConfig | None = None) -> serve.Application:
    """One deployment, `SpecDecode`: autoscaled replicas, each owning a placement group for itself,
    its draft worker and its target stages. args: an AppConfig or a mapping of its fields."""
    config = args if isinstance(args, AppConfig) else AppConfig.from_args(args)
    return serve.deployment(SpecDecodeServer).options(**config.deployment_options()).bind(config)
