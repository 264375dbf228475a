"""Builds a running engine from the typed config: the one place that wires the layers together."""

from __future__ import annotations

from pathlib import Path

from cluster.config import AptServeConfig
from cluster.executor_local import LocalExecutor
from cluster.tokenizer import Tokenizer
from scheduler_service.async_engine import AsyncEngine
from scheduler_service.engine import Engine


def build_engine(config: AptServeConfig) -> tuple[Engine, Tokenizer | None]:
    """An in-process engine and the model's tokenizer (None for token-id-only checkpoints)."""
    path = config.model.path
    tokenizer = Tokenizer(path) if Tokenizer.available(path) else None
    engine = Engine(config.scheduler, LocalExecutor(config.model, config.cache), detokenizer=tokenizer)
    return engine, tokenizer


def build_async_engine(config: AptServeConfig) -> tuple[AsyncEngine, Tokenizer, str]:
    """An engine loop for serving, its tokenizer, and the model name clients must use."""
    engine, tokenizer = build_engine(config)
    if tokenizer is None:
        raise ValueError(f"{config.model.path} has no tokenizer: serving needs one")
    name = config.server.served_model_name or Path(config.model.path).name
    return AsyncEngine(engine), tokenizer, name
