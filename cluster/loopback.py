"""Keeps Ray Serve's gRPC listeners off the machine's external addresses.

Ray Serve opens two gRPC servers on every interface (`[::]`) and has no setting for their address:
the gRPC proxy (`server.grpc_port`) and each replica's inter-deployment server (a random port).
`ensure_ray` installs `setup_worker` as Ray's `worker_process_setup_hook` when it starts a local Ray,
with `server.host` in `HOST_ENV`; in every Ray worker process it makes a Python gRPC server asked to
listen on every interface listen on that host instead. A host that is itself every interface (an
operator who means to expose the server) rewrites nothing. Joining an existing cluster (KubeRay)
installs nothing: there the network policy decides, see docs/RELIABILITY.md.
"""

from __future__ import annotations

import os

HOST_ENV = "APTSERVE_GRPC_HOST"
_EVERY_INTERFACE = ("[::]", "0.0.0.0", "::", "")


def rebind(address: str, host: str) -> str:
    """`address` (`host:port`) moved to `host` if it names every interface."""
    where, sep, port = address.rpartition(":")
    if not sep or where not in _EVERY_INTERFACE or host in _EVERY_INTERFACE:
        return address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_grpc_servers_to(host: str) -> None:
    """Make every `grpc.aio` server of this process that asks for every interface listen on `host`."""
    from grpc.aio._server import Server

    if getattr(Server, "_aptserve_host", None) is not None:
        Server._aptserve_host = host
        return
    insecure, secure = Server.add_insecure_port, Server.add_secure_port

    def add_insecure_port(self, address: str) -> int:  # noqa: ANN001
        return insecure(self, rebind(address, Server._aptserve_host))

    def add_secure_port(self, address: str, credentials) -> int:  # noqa: ANN001
        return secure(self, rebind(address, Server._aptserve_host), credentials)

    Server._aptserve_host = host
    Server.add_insecure_port, Server.add_secure_port = add_insecure_port, add_secure_port


def setup_worker() -> None:
    """Ray's `worker_process_setup_hook`: runs in every worker process before it runs any task."""
    host = os.environ.get(HOST_ENV)
    if host:
        bind_grpc_servers_to(host)
