"""The Ray Serve application: an OpenAI-compatible HTTP ingress that is also the gRPC servicer.

    serveConfigV2 import path:  cluster.serve_app:app_builder   (arguments: see `app_builder`)

The ingress reserves no CPU. It validates and tokenizes requests and routes them to the engine
replicas, which are named detached scheduler actors (`cluster/ray_cluster.py`). Every ingress replica
finds the same engines. It also renders `/metrics` from every replica's statistics.

Requests reach an ingress replica one of two ways (`server.ingress`): `direct` (the default), where the
replica listens on the HTTP and gRPC ports itself (`cluster/direct_ingress.py`) and Serve starts no
proxy; or `proxy`, through Serve's proxy actors on every node (the way a multi-node KubeRay Service
reaches it). docs/DEPLOY.md compares the two.
"""

from __future__ import annotations

import functools
from typing import Any

import ray
from ray import serve
from ray.serve.config import gRPCOptions

from cluster.config import AptServeConfig, load_config
from cluster.direct_ingress import DirectIngress
from cluster.engine_client import EngineClient
from cluster.grpc_servicer import AptServeRpcs
from cluster.http_server import build_app, build_frontend, install_frontend
from cluster.ray_cluster import (
    find_engine_replicas,
    restart_engine_replica,
    start_engine_replicas,
    stop_engine_replicas,
)
from cluster.ray_runtime import ensure_ray
from cluster.router import ReplicaRouter
from cluster.tokenizer import Tokenizer

GRPC_SERVICER = "cluster.grpc_gen.aptserve_pb2_grpc.add_AptServeServicer_to_server"
APP_NAME = "aptserve"

fastapi_app = build_app()  # serves the frontend each ingress replica installs in its process


@serve.ingress(fastapi_app)
class AptServeIngress(AptServeRpcs):
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = AptServeConfig.model_validate(config)
        server = self.config.server
        handles = start_engine_replicas(self.config)
        info = ray.get(handles[0].model_info.remote())
        clients = [EngineClient(h, call_timeout_s=server.replica_call_timeout_s,
                                restart=functools.partial(restart_engine_replica, h)) for h in handles]
        router = ReplicaRouter(clients, info["max_model_len"], info["vocab_size"], server.replica_probe_interval_s)
        self.frontend = build_frontend(self.config, router, Tokenizer(self.config.model.path))
        install_frontend(self.frontend)
        super().__init__(self.frontend)
        self.direct: DirectIngress | None = None
        if server.ingress == "direct":  # this replica listens itself (Serve runs no proxy)
            self.direct = DirectIngress(fastapi_app, self, server.host, server.port, server.grpc_port,
                                        share_ports=server.ingress_replicas > 1,
                                        max_ongoing_requests=server.max_ongoing_requests)
            self.direct.start()

    def check_health(self) -> None:
        """Serve's health check: a replica whose own listeners stopped is restarted."""
        if self.direct is not None and not self.direct.alive():
            raise RuntimeError("the direct-ingress listeners stopped")

    def __del__(self) -> None:
        if getattr(self, "direct", None) is not None:
            self.direct.stop()


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
    """Start Serve on this Ray (started on loopback if needed) and the application (which starts the
    engine replicas): HTTP on `server.host:port` and gRPC on `server.grpc_port`, served by the ingress
    replicas themselves (`server.ingress: direct`) or by Serve's proxies (`proxy`)."""
    ensure_ray(grpc_host=config.server.host)
    if config.server.ingress == "direct":
        serve.start(proxy_location="Disabled")
    else:
        serve.start(
            http_options={"host": config.server.host, "port": config.server.port},
            grpc_options=grpc_options(config),
        )
    serve.run(build_application(config), name=APP_NAME, route_prefix="/", blocking=False)


def stop_serving(config: AptServeConfig) -> None:
    """Shut Serve down, then the engine replicas (detached: Serve does not own them)."""
    serve.shutdown()
    stop_engine_replicas(find_engine_replicas(config))
