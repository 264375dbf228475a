"""Serving without Ray (`server.runtime: process`): the HTTP routes and the gRPC service in the
`aptserve serve` process, the engine in one child process (`cluster/engine_process.py`).

The same FastAPI app and gRPC servicer as a Ray Serve ingress replica, on the same listeners
(`cluster/direct_ingress.py`), over the same `EngineClient` and `ReplicaRouter` as the Ray runtime's
ingress, here with one engine reached over a Unix socket: no Ray call between a request and its engine,
no Ray processes beside the model. docs/DEPLOY.md ("Runtime") gives the measurements and what the Ray
runtime adds in exchange (engine replicas, restarts of a failed engine actor, KubeRay). With
`parallel.executor: ray` the engine process drives tensor-parallel Ray worker actors, as the offline
`LLM` does.
"""

from __future__ import annotations

from cluster.config import AptServeConfig
from cluster.direct_ingress import DirectIngress
from cluster.engine_client import EngineClient
from cluster.engine_process import EngineProcess
from cluster.grpc_servicer import AptServeRpcs
from cluster.http_server import build_app, build_frontend
from cluster.router import ReplicaRouter
from cluster.tokenizer import Tokenizer


class ProcessServer:
    """An engine process and this process's HTTP and gRPC listeners. `start` returns once both listen."""

    def __init__(self, config: AptServeConfig) -> None:
        if config.parallel.replicas != 1:
            raise ValueError(f"server.runtime=process serves one engine replica, not {config.parallel.replicas}: "
                             "use server.runtime=ray for replicas")
        self.config = config
        server = config.server
        self.engine = EngineProcess(config)
        try:
            client = EngineClient(self.engine.connection, call_timeout_s=server.replica_call_timeout_s)
            router = ReplicaRouter([client], self.engine.info["max_model_len"], self.engine.info["vocab_size"],
                                   server.replica_probe_interval_s)
            self.frontend = build_frontend(config, router, Tokenizer(config.model.path))
            self.ingress = DirectIngress(build_app(self.frontend), AptServeRpcs(self.frontend), server.host,
                                         server.port, server.grpc_port,
                                         max_ongoing_requests=server.max_ongoing_requests)
        except BaseException:
            self.engine.stop()
            raise

    def start(self) -> None:
        try:
            self.ingress.start()
        except BaseException:
            self.engine.stop()
            raise

    def alive(self) -> bool:
        """Both listeners serve and the engine process runs (it exits when its engine loop stops)."""
        return self.ingress.alive() and self.engine.alive()

    def stop(self) -> None:
        """Close the listeners (open streams get the ingress's grace), then stop the engine process."""
        try:
            self.ingress.stop()
        finally:
            self.engine.stop()
