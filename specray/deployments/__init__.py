"""Ray Serve: the application builder, the replica deployment, gRPC and OpenAI-style HTTP ingress.
The only package that imports ray.serve or the generated protobuf modules."""
from specray.deployments.config import GRPC_SERVICER, AppConfig

__all__ = ["GRPC_SERVICER", "AppConfig"]
