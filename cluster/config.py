"""The one typed configuration: YAML from `configs/`, overridden by `section.key=value` pairs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from hybrid_cache.config import CacheConfig
from scheduler_service.config import SchedulerConfig
from worker.config import ModelConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
# The environment variable that holds the API key when `server.api_key` is unset (vLLM's VLLM_API_KEY).
API_KEY_ENV = "APTSERVE_API_KEY"


class ServerConfig(BaseModel):
    """Where `aptserve serve` listens (loopback by default), the model name it answers to, its limits."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="HTTP listen address; loopback unless you mean to expose it")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port")
    grpc_port: int = Field(9000, ge=0, le=65535, description="gRPC port")
    runtime: Literal["ray", "process"] = Field(
        "ray", description="ray: Ray Serve ingress and engine replica actors; process: without Ray, HTTP and gRPC in "
        "the `aptserve serve` process and the engine in one child process (one replica; docs/DEPLOY.md, \"Runtime\")"
    )
    ingress: Literal["direct", "proxy"] = Field(
        "direct", description="direct: each ingress replica listens on the ports itself; proxy: Ray Serve's proxies do"
    )
    served_model_name: str | None = Field(None, description="default: the model directory's name")
    request_timeout_s: float = Field(600.0, gt=0, description="a request still running after this is aborted (504)")
    max_ongoing_requests: int = Field(
        1024, gt=0, description="concurrent requests per ingress replica (Serve's default of 5 would throttle streams)"
    )
    ingress_replicas: int = Field(1, gt=0, description="Ray Serve ingress replicas (they share the engine replicas)")
    max_body_bytes: int = Field(4 << 20, gt=0, description="larger request bodies are refused (HTTP 413)")
    retry_after_s: int = Field(1, gt=0, description="Retry-After of a 503 (full queue, or no engine replica up)")
    replica_probe_interval_s: float = Field(
        1.0, gt=0, description="a replica marked down is probed again at most this often (lazily, on traffic)"
    )
    replica_call_timeout_s: float = Field(
        5.0, gt=0, description="longest wait for a replica's health or stats (a restarting actor holds calls)"
    )
    api_key: str | None = Field(
        None, min_length=1, repr=False,
        description=f"clients must send `Authorization: Bearer <key>` (else 401); None: ${API_KEY_ENV}, if set",
    )
    generation_config: Literal["auto", "none"] = Field(
        "auto", description="auto: a request's unset sampling fields default to the model's generation_config.json"
    )

    def resolved_api_key(self) -> str | None:
        """The key clients must present: `api_key`, else the environment's `APTSERVE_API_KEY`, else None.

        Read where the routes run (an ingress replica's process inherits its node's environment), so a
        key given by a Kubernetes Secret as an environment variable never travels in the Serve config."""
        return self.api_key or os.environ.get(API_KEY_ENV) or None


class ParallelConfig(BaseModel):
    """How an engine's model runs: in this process, or over Ray as tensor-parallel worker actors."""

    model_config = ConfigDict(extra="forbid")

    executor: Literal["local", "ray"] = Field("local", description="local: in-process (TP=1); ray: worker actors")
    tensor_parallel_size: int = Field(1, gt=0, description="ranks per engine (ray executor)")
    replicas: int = Field(1, gt=0, description="engine replicas, each a scheduler actor with its own TP group")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each rank reserves (and its torch threads)")
    collective_timeout_s: float = Field(
        30.0, gt=0, description="a rank waiting longer than this in a collective fails (a peer died)"
    )
    step_timeout_s: float = Field(300.0, gt=0, description="longest wait for one step or for the group to start")
    max_replica_restarts: int = Field(
        -1, ge=-1, description="times Ray restarts a dead engine replica actor (-1: always; 0: never)"
    )


class AptServeConfig(BaseModel):
    """Model, cache, scheduler and parallel settings of an engine, and where it is served."""

    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = Field(default_factory=ModelConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)

    @property
    def model_name(self) -> str:
        """The name clients use: `server.served_model_name`, else the model directory's name."""
        return self.server.served_model_name or Path(self.model.path).name


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def with_overrides(config: AptServeConfig, overrides: dict[str, Any]) -> AptServeConfig:
    """A copy of `config` with dotted keys set to the given (typed) values, validated again."""
    tree = config.model_dump()
    for dotted, value in overrides.items():
        _set_dotted(tree, dotted, value)
    return AptServeConfig.model_validate(tree)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> AptServeConfig:
    """Read a YAML config (the default one when `path` is None) and apply dotted overrides.

    Override values given as strings are parsed as YAML scalars, so `cache.num_blocks=64` is an int.
    """
    source = Path(path) if path is not None else DEFAULT_CONFIG
    if not source.is_file():
        raise FileNotFoundError(f"config file {source} does not exist")
    tree = yaml.safe_load(source.read_text()) or {}
    for dotted, value in (overrides or {}).items():
        _set_dotted(tree, dotted, yaml.safe_load(value) if isinstance(value, str) else value)
    return AptServeConfig.model_validate(tree)
