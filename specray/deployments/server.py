"""The Serve deployment: one replica = one engine (a draft worker and target stages in the replica's
placement group), answering gRPC (`SpecDecode`, methods named as the RPCs) and OpenAI-style HTTP.

The replica loads the models in its constructor, so Serve routes nothing to it before they are
ready (a new autoscaled replica takes no traffic while loading). Both ingresses share `Service`."""

import ray
from fastapi import FastAPI, Request, Response
from ray import serve

import specray
from specray.core.loader import load_config, load_tokenizer
from specray.deployments import grpc_ingress, openai_routes
from specray.deployments.config import AppConfig
from specray.deployments.host import EngineHost
from specray.deployments.metrics import ServeMetrics
from specray.deployments.service import Models, Service
from specray.deployments.validation import Limits
from specray.engine import build_engine

api = FastAPI(title="specray", description="speculative-decoding LLM serving (OpenAI-style HTTP)")


def build_service(config: AppConfig, metrics: ServeMetrics | None = None, actor_name: str | None = None) -> Service:
    """The replica's service: tokenizer, limits and an engine whose actors take bundles 1, 2, ... of the
    current placement group (if any)."""
    model = load_config(config.target)
    tokenizer = load_tokenizer(config.tokenizer or config.target)
    engine_config = config.engine_config(config.context(model.max_position_embeddings))
    pg = ray.util.get_current_placement_group()

    def build(generation: int):
        name = actor_name and f"{actor_name}-g{generation}"
        return build_engine(engine_config, tokenizer, pg, first_bundle=1, name=name)

    limits = Limits(engine_config.max_context, config.max_tokens_limit, config.default_max_tokens, config.max_prompt_bytes,
                    config.max_stop_strings, model.vocab_size, config.default_speculation, config.tree_branching)
    return Service(EngineHost(build, config.max_waiting), tokenizer, limits,
                   Models(config.target, config.draft or ""), metrics)


@serve.ingress(api)
class SpecDecodeServer:
    def __init__(self, config: AppConfig):
        replica = serve.get_replica_context()
        actors = f"specray-{replica.app_name}-{replica.replica_tag}"  # e.g. specray-main-x1y2-g0-draft
        self.service = build_service(config, ServeMetrics(), actors)
        self.model_name = config.name

    # ---- gRPC: specray.v1.SpecDecode --------------------------------------------------------

    async def Generate(self, request, grpc_context):  # Serve routes gRPC calls by RPC name
        return await grpc_ingress.generate(self.service, request, grpc_context)

    async def GenerateStream(self, request, grpc_context):
        async for message in grpc_ingress.generate_stream(self.service, request, grpc_context):
            yield message

    async def GetServerInfo(self, request, grpc_context):
        return grpc_ingress.server_info(self.service)

    # ---- OpenAI-style HTTP -------------------------------------------------------------------

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await openai_routes.completions(self.service, self.model_name, await request.body())

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await openai_routes.chat_completions(self.service, self.model_name, await request.body())

    @api.get("/v1/models")
    async def models(self):
        return openai_routes.models(self.model_name)

    @api.post("/tokenize")
    async def tokenize(self, request: Request):
        return await openai_routes.tokenize(self.service, await request.body())

    @api.post("/detokenize")
    async def detokenize(self, request: Request):
        return await openai_routes.detokenize(self.service, await request.body())

    # ---- probes, as vLLM answers them: 200 with an empty body while the replica can serve -----

    @api.get("/health")
    async def health(self):
        return self._probe()

    @api.api_route("/ping", methods=["GET", "POST"])
    async def ping(self):
        return self._probe()

    @api.get("/version")
    async def version(self):
        return {"version": specray.__version__}

    def _probe(self) -> Response:
        try:
            self.service.host.check_health()
        except RuntimeError:
            return Response(status_code=503)
        return Response(status_code=200)

    # ---- Serve lifecycle ----------------------------------------------------------------------

    def check_health(self) -> None:
        self.service.host.check_health()

    async def __del__(self):
        await self.service.host.shutdown()
