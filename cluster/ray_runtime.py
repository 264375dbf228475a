"""Starting (or joining) Ray so that everything it opens stays on 127.0.0.1 unless told otherwise.

The environment that keeps Ray on loopback is set by `cluster/__init__.py`, which runs before this;
Ray Serve's gRPC listeners, which no Ray setting moves, are moved by `cluster/loopback.py`.
"""

from __future__ import annotations

import ray
from ray._private import ray_constants
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from cluster.loopback import HOST_ENV

LOOPBACK = "127.0.0.1"

# What a call to an actor raises when the actor is dead or restarting.
ACTOR_FAILURES: tuple[type[BaseException], ...] = (RayActorError, ActorUnavailableError)


def unwrap_remote(err: BaseException) -> BaseException:
    """The exception an actor raised, out of Ray's `RayTaskError` wrappers (whose text is the remote traceback)."""
    while isinstance(err, RayTaskError) and err.cause is not None and err.cause is not err:
        err = err.cause
    return err


def ensure_ray(num_cpus: float | None = None, address: str | None = None, grpc_host: str = LOOPBACK) -> None:
    """Join `address` (e.g. a KubeRay head) if given, else start a local Ray on loopback once, whose
    workers' gRPC servers listen on `grpc_host` (`server.host`) rather than on every interface."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # `cluster/__init__.py` turns Ray's cluster mode off (services on loopback), but Ray reads the switch
    # when it is imported: a process that imported Ray first would start its services on every interface.
    ray_constants.ENABLE_RAY_CLUSTER = ray_constants.env_bool(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, True)
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address=LOOPBACK,
        log_to_driver=True,
        runtime_env={"worker_process_setup_hook": "cluster.loopback.setup_worker", "env_vars": {HOST_ENV: grpc_host}},
    )
