"""The Ray Serve application: an OpenAI-compatible HTTP ingress that is also the gRPC servicer.

    serveConfigV2 import path:  cluster.serve_app:app_builder   (arguments: see `app_builder`)

The ingress reserves no CPU. It validates and tokenizes requests and routes them to the engine
replicas, which are named detached scheduler actors (`cluster/ray_cluster.py`). Every ingress replica
finds the same engines. It also renders `/metrics` from every replica's statistics.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve
from ray.serve.config import gRPCOptions
from ray.serve.grpc_util import RayServegRPCContext

from cluster.config import AptServeConfig, load_config
from cluster.engine_client import EngineClient
from cluster.errors import Failure, InvalidField, Kind, ModelNotFound, classify
from cluster.gateways import UP, serving
from cluster.grpc_gen import aptserve_pb2 as pb
from cluster.http_server import Frontend, build_app, install_frontend
from cluster.ray_cluster import find_engine_replicas, start_engine_replicas, stop_engine_replicas
from cluster.ray_runtime import ensure_ray
from cluster.request_params import sampling_params
from cluster.router import ReplicaRouter
from cluster.streams import Deadline, TextDeltas
from cluster.tokenizer import Tokenizer
from hybrid_cache.plan import SamplingParams

GRPC_SERVICER = "cluster.grpc_gen.aptserve_pb2_grpc.add_AptServeServicer_to_server"
APP_NAME = "aptserve"

fastapi_app = build_app()  # serves the frontend each ingress replica installs in its process


@serve.ingress(fastapi_app)
class AptServeIngress:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = AptServeConfig.model_validate(config)
        server = self.config.server
        handles = start_engine_replicas(self.config)
        info = ray.get(handles[0].model_info.remote())
        clients = [EngineClient(h, call_timeout_s=server.replica_call_timeout_s) for h in handles]
        router = ReplicaRouter(clients, info["max_model_len"], info["vocab_size"], server.replica_probe_interval_s)
        self.tokenizer = Tokenizer(self.config.model.path)
        self.model_name = self.config.model_name
        self.frontend = Frontend(router, self.tokenizer, self.model_name, server.request_timeout_s,
                                 retry_after_s=server.retry_after_s, max_body_bytes=server.max_body_bytes)
        install_frontend(self.frontend)

    # -- gRPC (aptserve.v1.AptServe): the same checks, answers and streams as HTTP ----------------------
    async def Generate(  # noqa: N802 - the RPC's name
        self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        received_at = time.time()
        f, gateway = self.frontend, self.frontend.gateway
        try:
            prompt, params = self._grpc_request(request)
        except Exception as err:  # noqa: BLE001 - refused before any engine saw it
            _fail(grpc_context, f.refused(err))
        request_id = request.request_id or f"grpc-{uuid.uuid4().hex}"
        try:
            stream = await gateway.generate(
                prompt, params, request_id, request.cache_type or None,
                request.ttft_slo_ms / 1000 if request.HasField("ttft_slo_ms") else None,
                request.tbt_slo_ms / 1000 if request.HasField("tbt_slo_ms") else None,
                received_at=received_at,
            )
        except Exception as err:  # noqa: BLE001 - refused by the router or at admission
            _fail(grpc_context, f.refused(err, engine_checked=True, param="prompt"))

        async def timed_out() -> None:
            await gateway.abort(request_id, reason="timeout")

        outputs = Deadline(stream, f.request_timeout_s, on_timeout=timed_out)
        deltas = TextDeltas(tuple(request.stop))
        try:
            async for output in outputs:
                if output.finish_reason in _ENDED_BY:
                    _fail(grpc_context, _ENDED_BY[output.finish_reason])
                yield pb.GenerateResponse(
                    request_id=request_id, new_token_ids=output.new_token_ids, text_delta=deltas.next(output),
                    finished=output.finished, finish_reason=output.finish_reason or "",
                    prompt_tokens=len(output.prompt_token_ids), completion_tokens=len(output.token_ids),
                )
        except GrpcRequestError:
            raise
        except Exception as err:  # noqa: BLE001 - a timeout, an Abort, or the engine failed under it
            _fail(grpc_context, classify(err))
        finally:
            await outputs.aclose()  # a client that cancelled its call (or any early end) aborts the request

    def _grpc_request(self, request: pb.GenerateRequest) -> tuple[list[int], SamplingParams]:
        if request.model != self.model_name:
            raise ModelNotFound(f"the model `{request.model}` does not exist (serving `{self.model_name}`)")
        if bool(request.prompt) == bool(request.prompt_token_ids):
            raise InvalidField("prompt", "give exactly one of prompt and prompt_token_ids")
        prompt = self.frontend.encode(request.prompt) if request.prompt else list(request.prompt_token_ids)
        given = {name: getattr(request, name) for name in _OPTIONAL if request.HasField(name)}
        params = sampling_params(
            len(prompt), self.frontend.gateway.max_model_len, stop=tuple(request.stop),
            ignore_eos=request.ignore_eos, **given,
        )
        return prompt, params

    async def Abort(self, request: pb.AbortRequest, grpc_context: RayServegRPCContext) -> pb.AbortResponse:  # noqa: N802
        try:
            await self.frontend.gateway.abort(request.request_id)
        except Exception as err:  # noqa: BLE001 - answered by its kind, never a traceback
            _fail(grpc_context, classify(err))
        return pb.AbortResponse(aborted=True)

    async def Health(self, request: pb.HealthRequest) -> pb.HealthResponse:  # noqa: N802
        states = await self.frontend.gateway.health()
        status = ("ok" if all(s == UP for s in states.values()) else "degraded") if serving(states) else "unavailable"
        return pb.HealthResponse(status=status)

    async def ModelInfo(self, request: pb.ModelInfoRequest) -> pb.ModelInfoResponse:  # noqa: N802
        gateway = self.frontend.gateway
        return pb.ModelInfoResponse(model=self.model_name, max_model_len=gateway.max_model_len,
                                    vocab_size=gateway.vocab_size, replicas=gateway.num_replicas)


# Optional GenerateRequest fields that map one to one onto sampling fields (unset: the default).
_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "seed")

# Streams the engine ended without a result: the status the RPC ends with.
_ENDED_BY = {
    "error": Failure(Kind.UNAVAILABLE, "the model's engine failed while running this request"),
    "abort": Failure(Kind.CANCELLED, "the request was aborted"),
}


class GrpcRequestError(Exception):
    """Ends an RPC with the status code set on its context (Serve's proxy keeps a code set before raising)."""


def _fail(context: RayServegRPCContext, failure: Failure) -> None:
    context.set_code(failure.kind.grpc_code)
    context.set_details(failure.message)
    raise GrpcRequestError(failure.message)


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
    ensure_ray(grpc_host=config.server.host)
    serve.start(
        http_options={"host": config.server.host, "port": config.server.port},
        grpc_options=grpc_options(config),
    )
    serve.run(build_application(config), name=APP_NAME, route_prefix="/", blocking=False)


def stop_serving(config: AptServeConfig) -> None:
    """Shut Serve down, then the engine replicas (detached: Serve does not own them)."""
    serve.shutdown()
    stop_engine_replicas(find_engine_replicas(config))
