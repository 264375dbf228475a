"""One-process serving (`server.runtime: process`): the engine, the HTTP routes and the gRPC service in
the `aptserve serve` process itself, without Ray Serve.

The same FastAPI app and gRPC servicer as a Ray Serve ingress replica, on the same listeners
(`cluster/direct_ingress.py`), over one in-process engine (`LocalGateway`): no Ray call between a
request and its engine, no Ray processes beside the model. On a small host the engine's step runs
faster this way (docs/DEPLOY.md, "Runtime", gives the measurement and what the Ray runtime adds in
exchange: engine replicas, restarts of a failed engine actor, KubeRay). With `parallel.executor: ray`
the engine drives tensor-parallel Ray worker actors from this process, as the offline `LLM` does.
"""

from __future__ import annotations

from cluster.config import AptServeConfig
from cluster.direct_ingress import DirectIngress
from cluster.engine_builder import build_async_engine
from cluster.gateways import LocalGateway
from cluster.grpc_servicer import AptServeRpcs
from cluster.http_server import build_app, build_frontend


class ProcessServer:
    """An engine and its HTTP and gRPC listeners in this process. `start` returns once both listen."""

    def __init__(self, config: AptServeConfig) -> None:
        if config.parallel.replicas != 1:
            raise ValueError(f"server.runtime=process serves one engine replica, not {config.parallel.replicas}: "
                             "use server.runtime=ray for replicas")
        self.config = config
        self.engine, tokenizer, _ = build_async_engine(config)
        try:
            self.frontend = build_frontend(config, LocalGateway(self.engine), tokenizer)
            server = config.server
            self.ingress = DirectIngress(build_app(self.frontend), AptServeRpcs(self.frontend), server.host,
                                         server.port, server.grpc_port,
                                         max_ongoing_requests=server.max_ongoing_requests)
        except BaseException:
            self.engine.shutdown()
            raise

    def start(self) -> None:
        try:
            self.ingress.start()
        except BaseException:
            self.engine.shutdown()
            raise

    def alive(self) -> bool:
        """Both listeners serve and the engine loop runs."""
        return self.ingress.alive() and self.engine.healthy

    def stop(self) -> None:
        """Close the listeners (open streams get the ingress's grace), then stop the engine."""
        try:
            self.ingress.stop()
        finally:
            self.engine.shutdown()
