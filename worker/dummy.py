"""Random ("dummy") checkpoints of real architectures, for benchmarks: speed does not depend on weight values.

OPT sizes are the published pre-LayerNorm OPT shapes (opt-350m is post-LayerNorm and out of scope).
Llama sizes are Llama-family shapes at comparable parameter counts (Llama-2 7B/13B, Llama-1 33B,
Llama-2 70B with grouped-query attention for 66b). The vocabulary is the tokenizer's, copied in beside
the weights, so dataset prompts have realistic token counts (SmolLM2's tokenizer by default).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

DEFAULT_TOKENIZER = Path("data/models/SmolLM2-135M-Instruct")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
SHARD_BYTES = 2 << 30


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int


OPT_SHAPES = {
    "125m": Shape(768, 12, 12, 12, 3072),
    "1.3b": Shape(2048, 24, 32, 32, 8192),
    "2.7b": Shape(2560, 32, 32, 32, 10240),
    "6.7b": Shape(4096, 32, 32, 32, 16384),
    "13b": Shape(5120, 40, 40, 40, 20480),
    "30b": Shape(7168, 48, 56, 56, 28672),
    "66b": Shape(9216, 64, 72, 72, 36864),
}
LLAMA_SHAPES = {
    "125m": Shape(768, 12, 12, 12, 2048),
    "1.3b": Shape(2048, 24, 16, 16, 5504),
    "2.7b": Shape(2560, 32, 20, 20, 6912),
    "6.7b": Shape(4096, 32, 32, 32, 11008),
    "13b": Shape(5120, 40, 40, 40, 13824),
    "30b": Shape(6656, 60, 52, 52, 17920),
    "66b": Shape(8192, 80, 64, 8, 28672),
}
SHAPES = {"opt": OPT_SHAPES, "llama": LLAMA_SHAPES}
OPT_POSITIONS, LLAMA_POSITIONS = 2048, 4096
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def _shape(arch: str, size: str) -> Shape:
    if arch == "opt" and size == "350m":
        raise ValueError("opt-350m is post-LayerNorm, which this engine does not implement; pick another size")
    if arch not in SHAPES:
        raise ValueError(f"unknown architecture {arch!r} (choose opt or llama)")
    if size not in SHAPES[arch]:
        raise ValueError(f"unknown size {size!r} for {arch} (choose from {', '.join(SHAPES[arch])})")
    return SHAPES[arch][size]


def dummy_config(
    arch: str, size: str, vocab_size: int, special: dict[str, int] | None = None, shape: Shape | None = None
) -> dict:
    """The Hugging Face `config.json` contents for `arch` at `size` (or at an explicit `shape`)."""
    s = shape or _shape(arch, size)
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2} | (special or {})
    if arch == "opt":
        return {
            "architectures": ["OPTForCausalLM"], "model_type": "opt", "vocab_size": vocab_size,
            "hidden_size": s.hidden, "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
            "ffn_dim": s.ffn, "max_position_embeddings": OPT_POSITIONS, "do_layer_norm_before": True,
            "word_embed_proj_dim": s.hidden, "activation_function": "relu", "enable_bias": True,
            "tie_word_embeddings": True, "dtype": "bfloat16", **ids,
        }
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
        "hidden_size": s.hidden, "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads, "head_dim": s.hidden // s.heads, "intermediate_size": s.ffn,
        "max_position_embeddings": LLAMA_POSITIONS, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "dtype": "bfloat16", **ids,
    }


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every weight of the checkpoint, by its Hugging Face name, in load order."""
    h, v, f = config["hidden_size"], config["vocab_size"], config.get("ffn_dim") or config["intermediate_size"]
    shapes: dict[str, tuple[int, ...]] = {}
    if config["model_type"] == "opt":
        p = "model.decoder."
        shapes[p + "embed_tokens.weight"] = (v, h)
        shapes[p + "embed_positions.weight"] = (config["max_position_embeddings"] + 2, h)
        for i in range(config["num_hidden_layers"]):
            layer = f"{p}layers.{i}."
            for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                shapes[f"{layer}self_attn.{name}.weight"] = (h, h)
                shapes[f"{layer}self_attn.{name}.bias"] = (h,)
            for norm in ("self_attn_layer_norm", "final_layer_norm"):
                shapes[f"{layer}{norm}.weight"] = (h,)
                shapes[f"{layer}{norm}.bias"] = (h,)
            shapes[f"{layer}fc1.weight"], shapes[f"{layer}fc1.bias"] = (f, h), (f,)
            shapes[f"{layer}fc2.weight"], shapes[f"{layer}fc2.bias"] = (h, f), (h,)
        shapes[p + "final_layer_norm.weight"] = (h,)
        shapes[p + "final_layer_norm.bias"] = (h,)
        return shapes
    d = config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    shapes["model.embed_tokens.weight"] = (v, h)
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        shapes[layer + "self_attn.q_proj.weight"] = (q, h)
        shapes[layer + "self_attn.k_proj.weight"] = (kv, h)
        shapes[layer + "self_attn.v_proj.weight"] = (kv, h)
        shapes[layer + "self_attn.o_proj.weight"] = (h, q)
        shapes[layer + "mlp.gate_proj.weight"] = (f, h)
        shapes[layer + "mlp.up_proj.weight"] = (f, h)
        shapes[layer + "mlp.down_proj.weight"] = (h, f)
        shapes[layer + "input_layernorm.weight"] = (h,)
        shapes[layer + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def estimate_bytes(config: dict, dtype: str) -> int:
    """Bytes of all weights, from the shapes alone."""
    elements = sum(torch.Size(s).numel() for s in tensor_shapes(config).values())
    return elements * torch.empty((), dtype=DTYPES[dtype]).element_size()


def _total_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _free_disk(path: Path) -> int:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _special_ids(tokenizer_dir: Path) -> dict[str, int]:
    """bos/eos/pad ids from the tokenizer's own files, so generation stops where the tokenizer expects."""
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    vocab = {t["content"]: t["id"] for t in json.loads((tokenizer_dir / "tokenizer.json").read_text())["added_tokens"]}
    ids = {}
    for key in ("bos", "eos", "pad"):
        token = config.get(f"{key}_token")
        if isinstance(token, str) and token in vocab:
            ids[f"{key}_token_id"] = vocab[token]
    return ids


def write_dummy_checkpoint(
    arch: str,
    size: str,
    out_dir: Path,
    tokenizer_dir: Path = DEFAULT_TOKENIZER,
    seed: int = 0,
    dtype: str = "bfloat16",
    init_std: float = 0.02,
    shape: Shape | None = None,
) -> Path:
    """Write config, tokenizer and seeded random weights (sharded safetensors) to `out_dir`.

    Refuses (ValueError naming the sizes) a model that would not fit in free disk space or in RAM.
    `shape` replaces the size's shape (tests write tiny models through the same path).
    """
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {tokenizer_dir}: run `make model` first")
    from tokenizers import Tokenizer

    vocab_size = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    config = dummy_config(arch, size, vocab_size, _special_ids(tokenizer_dir), shape)
    config["dtype"] = dtype
    need = estimate_bytes(config, dtype)
    for what, have in (("free disk space", _free_disk(out_dir)), ("memory (RAM)", _total_ram())):
        if need > have:
            raise ValueError(
                f"{arch}-{size} needs {need / 2**30:.1f} GiB of weights but {what} is {have / 2**30:.1f} GiB"
            )

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps(
        {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}, indent=2))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out_dir / name)

    generator = torch.Generator().manual_seed(seed)
    torch_dtype = DTYPES[dtype]
    shards = plan_shards(tensor_shapes(config), torch.empty((), dtype=torch_dtype).element_size())
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    bar = tqdm(total=sum(len(s) for s in shards), desc=f"writing {arch}-{size} dummy weights", unit="tensor")
    weight_map = {}
    for file, shard in zip(files, shards):
        tensors = {}
        for name, shape in shard:
            if name.endswith("norm.weight"):
                tensor = torch.ones(shape)
            elif len(shape) == 1:
                tensor = torch.zeros(shape)
            else:
                tensor = torch.empty(shape).normal_(0.0, init_std, generator=generator)
            tensors[name] = tensor.to(torch_dtype)
            weight_map[name] = file
            bar.update()
        save_file(tensors, str(out_dir / file), metadata={"format": "pt"})
    bar.close()
    if len(files) > 1:
        index = {"metadata": {"total_size": need}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out_dir


def plan_shards(shapes: dict[str, tuple[int, ...]], element_size: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Group tensors, in order, into shards of at most SHARD_BYTES (a larger tensor gets its own)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in shapes.items():
        size = torch.Size(shape).numel() * element_size
        if shards[-1] and used + size > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += size
    return shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aptserve make-dummy", description=__doc__)
    parser.add_argument("--arch", required=True, choices=sorted(SHAPES))
    parser.add_argument("--size", required=True, help=", ".join(OPT_SHAPES))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    args = parser.parse_args(argv)
    try:
        out = write_dummy_checkpoint(args.arch, args.size, args.out, args.tokenizer, args.seed, args.dtype)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"aptserve make-dummy: {err}\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
