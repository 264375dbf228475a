"""Engine replicas on Ray: each a central scheduler actor (no CPU reserved) with its own TP group."""

from __future__ import annotations

import functools

import ray

from cluster.config import AptServeConfig
from cluster.engine_builder import build_engine
from cluster.ray_runtime import ensure_ray
from scheduler_service.engine import Engine
from scheduler_service.engine_service import EngineService


def _engine_for(config: AptServeConfig) -> Engine:
    return build_engine(config)[0]


def start_engine_replicas(config: AptServeConfig, name_prefix: str = "aptserve-engine") -> list:
    """`config.parallel.replicas` scheduler actors, each driving `tensor_parallel_size` worker actors.

    The scheduler actors reserve no CPU (DESIGN §9): only the ranks that compute do. With the local
    executor a replica runs its model inside the scheduler actor's process.
    """
    ensure_ray()
    actor = ray.remote(EngineService)
    handles = []
    for index in range(config.parallel.replicas):
        handles.append(
            actor.options(name=f"{name_prefix}-{index}", num_cpus=0, max_concurrency=10_000).remote(
                functools.partial(_engine_for, config)
            )
        )
    ray.get([h.health.remote() for h in handles])  # wait until every replica has built its engine
    return handles
