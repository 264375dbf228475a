"""The Ray Serve application: an OpenAI-compatible HTTP ingress that is also the gRPC servicer.

    serveConfigV2 import path:  cluster.serve_app:app_builder   (arguments: see `app_builder`)

The ingress reserves no CPU. It validates and tokenizes requests and routes them to the engine
replicas, which are named detached scheduler actors (`cluster/ray_cluster.py`). Every ingress replica
finds the same engines. It also renders `/metrics` from every replica's statistics.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import ray
from ray import serve
from ray.serve.config import gRPCOptions
from ray.serve.grpc_util import RayServegRPCContext

from cluster.config import AptServeConfig, load_config
from cluster.engine_client import EngineClient
from cluster.gateways import ENGINE_FAILURES, ReplicaRouter
from cluster.grpc_gen import aptserve_pb2 as pb
from cluster.http_server import Frontend, build_app, install_frontend
from cluster.ray_cluster import find_engine_replicas, start_engine_replicas, stop_engine_replicas
from cluster.ray_runtime import ensure_ray
from cluster.tokenizer import Tokenizer
from hybrid_cache.plan import SamplingParams
from scheduler_service.engine import QueueFull

GRPC_SERVICER = "cluster.grpc_gen.aptserve_pb2_grpc.add_AptServeServicer_to_server"
APP_NAME = "aptserve"

fastapi_app = build_app()  # serves the frontend each ingress replica installs in its process


@serve.ingress(fastapi_app)
class AptServeIngress:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = AptServeConfig.model_validate(config)
        handles = start_engine_replicas(self.config)
        info = ray.get(handles[0].model_info.remote())
        router = ReplicaRouter([EngineClient(h) for h in handles], info["max_model_len"], info["vocab_size"])
        self.tokenizer = Tokenizer(self.config.model.path)
        self.model_name = self.config.model_name
        self.frontend = Frontend(router, self.tokenizer, self.model_name, self.config.server.request_timeout_s)
        install_frontend(self.frontend)

    # -- gRPC (aptserve.v1.AptServe) --------------------------------------------------------------
    async def Generate(  # noqa: N802 - the RPC's name
        self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            prompt, params = self._grpc_request(request)
            request_id = request.request_id or f"grpc-{uuid.uuid4().hex}"
            stream = await self.frontend.gateway.generate(
                prompt, params, request_id, request.cache_type or None,
                request.ttft_slo_ms / 1000 if request.HasField("ttft_slo_ms") else None,
                request.tbt_slo_ms / 1000 if request.HasField("tbt_slo_ms") else None,
            )
        except QueueFull as err:
            _fail(grpc_context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except LookupError as err:
            _fail(grpc_context, grpc.StatusCode.NOT_FOUND, str(err).strip("'\""))
        except ValueError as err:
            _fail(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        sent = 0
        try:
            async for output in stream:
                if output.finish_reason == "error":
                    _fail(grpc_context, grpc.StatusCode.UNAVAILABLE, output.error or "the model workers failed")
                delta, sent = output.text[sent:], len(output.text)
                yield pb.GenerateResponse(
                    request_id=request_id, new_token_ids=output.new_token_ids, text_delta=delta,
                    finished=output.finished, finish_reason=output.finish_reason or "",
                    prompt_tokens=len(output.prompt_token_ids), completion_tokens=len(output.token_ids),
                )
        except ENGINE_FAILURES as err:
            _fail(grpc_context, grpc.StatusCode.UNAVAILABLE, str(err))

    def _grpc_request(self, request: pb.GenerateRequest) -> tuple[list[int], SamplingParams]:
        if request.model != self.model_name:
            raise LookupError(f"the model `{request.model}` does not exist (serving `{self.model_name}`)")
        if bool(request.prompt) == bool(request.prompt_token_ids):
            raise ValueError("give exactly one of prompt and prompt_token_ids")
        prompt = self.tokenizer.encode(request.prompt) if request.prompt else list(request.prompt_token_ids)
        max_model_len = self.frontend.gateway.max_model_len
        room = max_model_len - len(prompt)
        if room <= 0:
            raise ValueError(f"the prompt has {len(prompt)} tokens but the model's context is {max_model_len} tokens")
        max_tokens = request.max_tokens if request.HasField("max_tokens") else room
        if max_tokens > room:
            raise ValueError(f"max_tokens ({max_tokens}) exceeds what the context leaves ({room})")
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=request.temperature if request.HasField("temperature") else 1.0,
            top_p=request.top_p if request.HasField("top_p") else 1.0,
            top_k=request.top_k if request.HasField("top_k") else 0,
            seed=request.seed if request.HasField("seed") else None,
            stop=tuple(request.stop),
            ignore_eos=request.ignore_eos,
        )
        return prompt, params

    async def Abort(self, request: pb.AbortRequest) -> pb.AbortResponse:  # noqa: N802
        await self.frontend.gateway.abort(request.request_id)
        return pb.AbortResponse(aborted=True)

    async def Health(self, request: pb.HealthRequest) -> pb.HealthResponse:  # noqa: N802
        return pb.HealthResponse(status="ok" if await self.frontend.gateway.healthy() else "engine stopped")

    async def ModelInfo(self, request: pb.ModelInfoRequest) -> pb.ModelInfoResponse:  # noqa: N802
        gateway = self.frontend.gateway
        return pb.ModelInfoResponse(model=self.model_name, max_model_len=gateway.max_model_len,
                                    vocab_size=gateway.vocab_size, replicas=gateway.num_replicas)


class GrpcRequestError(Exception):
    """Ends an RPC with the status code set on its context (Serve's proxy keeps a code set before raising)."""


def _fail(context: RayServegRPCContext, code: grpc.StatusCode, message: str) -> None:
    context.set_code(code)
    context.set_details(message)
    raise GrpcRequestError(message)


def build_application(config: AptServeConfig) -> serve.Application:
    """The Serve application for `config` (ingress replicas and limits from `config.server`)."""
    deployment = serve.deployment(
        AptServeIngress,
        name="AptServeIngress",
        num_replicas=config.server.ingress_replicas,
        max_ongoing_requests=config.server.max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
    )
    return deployment.bind(config.model_dump())


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for `serveConfigV2` (and `serve run cluster.serve_app:app_builder key=value ...`).

    Arguments (all optional): `config` (a YAML path), `model`, `tensor_parallel_size`, `replicas`,
    `policy`, `cache_mode`, `ttft_slo_s`, `tbt_slo_s`, `num_blocks`, `memory_bytes`, and `set`
    (a mapping of any dotted config key to its value).
    """
    args = dict(args)
    shortcuts = {
        "model": "model.path", "tensor_parallel_size": "parallel.tensor_parallel_size",
        "replicas": "parallel.replicas", "policy": "scheduler.policy", "cache_mode": "scheduler.cache_mode",
        "ttft_slo_s": "scheduler.ttft_slo_s", "tbt_slo_s": "scheduler.tbt_slo_s",
        "num_blocks": "cache.num_blocks", "memory_bytes": "cache.memory_bytes",
    }
    overrides = {dotted: args.pop(key) for key, dotted in shortcuts.items() if key in args}
    overrides |= dict(args.pop("set", {}) or {})
    config_path = args.pop("config", None)
    if args:
        raise ValueError(f"unknown app_builder arguments: {', '.join(sorted(args))}")
    if int(overrides.get("parallel.tensor_parallel_size", 1) or 1) > 1:
        overrides.setdefault("parallel.executor", "ray")
    return build_application(load_config(config_path, overrides))


def grpc_options(config: AptServeConfig) -> gRPCOptions:
    return gRPCOptions(port=config.server.grpc_port, grpc_servicer_functions=[GRPC_SERVICER])


def start_serving(config: AptServeConfig) -> None:
    """Start Serve on this Ray (started on loopback if needed): HTTP on `server.host:port`, gRPC on
    `server.grpc_port`, and the application (which starts the engine replicas)."""
    ensure_ray()
    serve.start(
        http_options={"host": config.server.host, "port": config.server.port},
        grpc_options=grpc_options(config),
    )
    serve.run(build_application(config), name=APP_NAME, route_prefix="/", blocking=False)


def stop_serving(config: AptServeConfig) -> None:
    """Shut Serve down, then the engine replicas (detached: Serve does not own them)."""
    serve.shutdown()
    stop_engine_replicas(find_engine_replicas(config))
