"""The shape of a model, read from a Hugging Face `config.json` in a local directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED = {"opt": "OPT", "llama": "Llama"}


@dataclass(frozen=True)
class ModelSpec:
    """Everything the model code and the cache need to know about an architecture."""

    arch: str  # "opt" or "llama"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    torch_dtype: str | None


def _eos_ids(value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)  # type: ignore[union-attr]


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ValueError(f"rope type {kind!r} is not supported (only plain rotary embeddings)")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def load_model_spec(model_dir: str | Path) -> ModelSpec:
    """Read and check `model_dir/config.json`; errors name the directory and the problem."""
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json")
    try:
        cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from err
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"model type {model_type!r} in {config_file} is not supported (supported: opt, llama)")

    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    common = dict(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        bos_token_id=cfg.get("bos_token_id"),
        torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
    )
    if model_type == "opt":
        if not cfg.get("do_layer_norm_before", True):
            raise ValueError("post-LayerNorm OPT (opt-350m) is not supported: only pre-LayerNorm OPT models")
        if cfg.get("word_embed_proj_dim", hidden) != hidden:
            raise ValueError(
                "OPT models with a projected embedding (word_embed_proj_dim != hidden_size) are not supported"
            )
        if cfg.get("activation_function", "relu") != "relu":
            raise ValueError(f"OPT activation {cfg.get('activation_function')!r} is not supported (relu only)")
        return ModelSpec(
            arch="opt",
            num_kv_heads=heads,
            head_dim=hidden // heads,
            intermediate_size=int(cfg["ffn_dim"]),
            norm_eps=1e-5,
            rope_theta=0.0,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            attention_bias=bool(cfg.get("enable_bias", True)),
            mlp_bias=bool(cfg.get("enable_bias", True)),
            **common,
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Llama activation {cfg.get('hidden_act')!r} is not supported (silu only)")
    return ModelSpec(
        arch="llama",
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        intermediate_size=int(cfg["intermediate_size"]),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(cfg),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        **common,
    )
