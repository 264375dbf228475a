"""Engine replicas on Ray: each a central scheduler actor (no CPU reserved) with its own executor.

Replicas are named, detached actors (`<prefix>-<i>` in the `aptserve` namespace): every ingress
replica that starts finds the same engines, and they outlive any one of them. `stop_engine_replicas`
ends them. A replica actor that dies is restarted by Ray (`parallel.max_replica_restarts`): Ray runs its
constructor again, which builds a new engine; handles stay valid, and the router (`cluster/router.py`)
skips the replica until it answers again.
"""

from __future__ import annotations

import os

import ray

from cluster.config import AptServeConfig
from cluster.engine_builder import build_engine
from cluster.ray_runtime import ensure_ray
from scheduler_service.engine import Engine
from scheduler_service.engine_service import EngineService

NAMESPACE = "aptserve"


def _engine_for(config: AptServeConfig) -> Engine:
    if config.parallel.executor == "local" and config.model.num_threads is None:
        # The model runs inside this actor, which reserves no CPU, so Ray has set one OpenMP thread;
        # use the machine's cores explicitly, as an in-process engine would.
        model = config.model.model_copy(update={"num_threads": os.cpu_count() or 1})
        config = config.model_copy(update={"model": model})
    return build_engine(config)[0]


def start_engine_replicas(config: AptServeConfig, name_prefix: str = "aptserve-engine") -> list:
    """`config.parallel.replicas` scheduler actors (created, or found if they already run), each
    driving its own executor (`tensor_parallel_size` worker actors with the ray executor)."""
    ensure_ray()
    actor = ray.remote(EngineService)
    handles = [
        actor.options(
            name=f"{name_prefix}-{index}", namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
            num_cpus=0, max_concurrency=10_000, max_restarts=config.parallel.max_replica_restarts,
        ).remote(_engine_for, config)
        for index in range(config.parallel.replicas)
    ]
    ray.get([h.health.remote() for h in handles])  # wait until every replica has built its engine
    return handles


def find_engine_replicas(config: AptServeConfig, name_prefix: str = "aptserve-engine") -> list:
    """The running replicas of `config` (missing ones are skipped)."""
    handles = []
    for index in range(config.parallel.replicas):
        try:
            handles.append(ray.get_actor(f"{name_prefix}-{index}", namespace=NAMESPACE))
        except ValueError:
            continue
    return handles


def stop_engine_replicas(handles: list) -> None:
    """Stop each replica's loop and workers, then the actor."""
    for handle in handles:
        try:
            ray.get(handle.shutdown.remote(), timeout=60)
        finally:
            ray.kill(handle)


def restart_engine_replica(handle) -> None:  # noqa: ANN001 - a Ray actor handle
    """Kill the replica so that Ray restarts it (`parallel.max_replica_restarts`): its constructor runs
    again and builds a new engine; handles stay valid."""
    ray.kill(handle, no_restart=False)
