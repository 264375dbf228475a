"""Builds a running engine from the typed config: the one place that wires the layers together."""

from __future__ import annotations

from cluster.config import AptServeConfig
from cluster.executor_local import LocalExecutor
from cluster.tokenizer import Tokenizer
from scheduler_service.async_engine import AsyncEngine
from scheduler_service.engine import Engine
from scheduler_service.executor import Executor


def build_executor(config: AptServeConfig) -> Executor:
    """The in-process executor (TP=1), or tensor-parallel Ray worker actors."""
    parallel = config.parallel
    if parallel.executor == "local":
        if parallel.tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size > 1 needs the ray executor (parallel.executor=ray)")
        return LocalExecutor(config.model, config.cache)
    from cluster.executor_ray import RayExecutor  # Ray only when asked for
    from cluster.ray_runtime import ensure_ray

    ensure_ray()
    return RayExecutor(
        config.model, config.cache, parallel.tensor_parallel_size, parallel.cpus_per_worker,
        parallel.collective_timeout_s, parallel.step_timeout_s,
    )


def build_engine(config: AptServeConfig) -> tuple[Engine, Tokenizer | None]:
    """An engine (its executor per `config.parallel`) and the model's tokenizer (None if it has none)."""
    path = config.model.path
    tokenizer = Tokenizer(path) if Tokenizer.available(path) else None
    engine = Engine(config.scheduler, build_executor(config), detokenizer=tokenizer)
    return engine, tokenizer


def build_async_engine(config: AptServeConfig) -> tuple[AsyncEngine, Tokenizer, str]:
    """An engine loop for serving, its tokenizer, and the model name clients must use."""
    engine, tokenizer = build_engine(config)
    if tokenizer is None:
        raise ValueError(f"{config.model.path} has no tokenizer: serving needs one")
    name = config.model_name
    return AsyncEngine(engine), tokenizer, name
