"""Load Hugging Face checkpoints (safetensors or PyTorch `.bin`) from a local directory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from worker.model_spec import ModelSpec, load_model_spec
from worker.models import CausalLM, build_model
from worker.models.base import WeightReader
from worker.parallel import SINGLE, TensorParallel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# generation_config.json keys that become default sampling fields (vLLM reads the same ones), by the
# request field each sets.
GENERATION_DEFAULTS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens",
}


def resolve_dtype(name: str, spec: ModelSpec) -> torch.dtype:
    """`auto` means the checkpoint's dtype (float32 when it names none)."""
    if name == "auto":
        name = spec.torch_dtype or "float32"
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported (choose from auto, {', '.join(DTYPES)})")
    return DTYPES[name]


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The weight files to read: safetensors if present, else PyTorch `.bin` files."""
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"model directory {model_dir} has no *.safetensors or *.bin weight files")
    return files


class _TensorReader:
    """A loaded (memory-mapped) tensor behind the same interface as a safetensors slice."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def get_shape(self) -> list[int]:
        return list(self.tensor.shape)

    def __getitem__(self, index: object) -> torch.Tensor:
        return self.tensor[index]


def iter_weights(model_dir: Path) -> Iterator[tuple[str, WeightReader]]:
    """Yield (name, reader) pairs one file at a time; a reader reads only the part asked for (a rank's
    shard), so no process holds the whole checkpoint. A damaged file raises naming the file."""
    for path in checkpoint_files(model_dir):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as handle:
                    for name in handle.keys():
                        yield name, handle.get_slice(name)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                for name, tensor in state.items():
                    yield name, _TensorReader(tensor)
        except Exception as err:  # any failure to read a weight file means the file is damaged
            raise ValueError(f"corrupt checkpoint file {path}: {err}") from err

def generation_defaults(model_dir: str | Path) -> dict[str, float | int]:
    """The sampling defaults the model's `generation_config.json` sets, by request field name (for
    example `{"temperature": 0.6, "top_p": 0.9}`); empty when the file is absent or sets none.

    A damaged file raises ValueError naming it: a server must not start with defaults it silently lost."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object")
    return {field: config[key] for key, field in GENERATION_DEFAULTS.items() if config.get(key) is not None}


def load_model(
    model_dir: str | Path, dtype: str, device: torch.device, tp: TensorParallel = SINGLE, prepack: bool = True,
    own_gemm: bool = True,
) -> CausalLM:
    """Build this rank's shard of the model for `model_dir` on `device` and fill it from the checkpoint;
    with `prepack`, GEMM weights are laid out once for a fast CPU kernel (with `own_gemm`, ours where the
    CPU has it: AMX for bf16, AVX-512 for fp32; oneDNN otherwise)."""
    path = Path(model_dir)
    spec = load_model_spec(path)
    torch_dtype = resolve_dtype(dtype, spec)
    with torch.device("meta"):
        model = build_model(spec, tp)
    model = model.to(dtype=torch_dtype).to_empty(device=device)
    model.load_weights(iter_weights(path))
    model.eval().requires_grad_(False)
    if prepack:
        model.prepack(own_gemm)
    return model
