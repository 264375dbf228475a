"""Pieces of the GPU check (bench/gpu_check.py): models without checkpoints, and the kernels' GPU build.

    python -m bench.gpu_check_setup 90   # cross-compile both Triton kernels for sm_90; prints the version, then JSON
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent


# -- models -----------------------------------------------------------------------------------------
def write_config(out: Path, arch: str, size: str, vocab: int, dtype: str, shape: Any = None) -> Path:
    """A model directory holding only `config.json` (weights come from `random_weights`)."""
    from worker.dummy import dummy_config

    out.mkdir(parents=True, exist_ok=True)
    config = dummy_config(arch, size, vocab, shape=shape) | {"dtype": dtype}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def write_small_checkpoint(out: Path, arch: str, seed: int = 0) -> Path:
    """A small random float32 checkpoint on disk (the parity model: both devices read the same weights).
    std 0.2 keeps logits far from flat, so greedy choices are not decided by rounding."""
    from safetensors.torch import save_file

    from worker.dummy import Shape, dummy_config, tensor_shapes

    shape = Shape(hidden=128, layers=2, heads=4, kv_heads=4, ffn=256)
    config = dummy_config(arch, "125m", 512, shape=shape) | {"dtype": "float32"}
    write_config(out, arch, "125m", 512, "float32", shape)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, dims in tensor_shapes(config).items():
        if len(dims) == 1:
            base = 1.0 if name.endswith("norm.weight") else 0.0
            tensors[name] = base + 0.1 * torch.randn(dims, generator=g)
        else:
            tensors[name] = 0.2 * torch.randn(dims, generator=g)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@contextmanager
def random_weights(seed: int = 0) -> Iterator[None]:
    """Within: model runners get seeded random weights drawn on their device instead of a checkpoint."""
    from worker import model_runner
    from worker.loader import resolve_dtype
    from worker.model_spec import load_model_spec
    from worker.models import build_model

    def load(path: str | Path, dtype: str, device: torch.device, tp: Any = None, prepack: bool = True,
             own_gemm: bool = True) -> Any:
        spec = load_model_spec(Path(path))
        with torch.device("meta"):
            model = build_model(spec, tp) if tp is not None else build_model(spec)
        model = model.to(dtype=resolve_dtype(dtype, spec)).to_empty(device=device)
        g = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() == 1:
                    param.fill_(1.0 if name.endswith("norm.weight") else 0.0)
                else:
                    param.normal_(0.0, 0.02, generator=g)
        model.eval().requires_grad_(False)
        if prepack:
            model.prepack(own_gemm)
        return model

    original = model_runner.load_model
    model_runner.load_model = load
    try:
        yield
    finally:
        model_runner.load_model = original


@contextmanager
def constant_step_profile(active: bool) -> Iterator[None]:
    """Under Triton's interpreter the start-up step profile (dozens of large steps) would take minutes;
    it does not change tokens, so it is replaced by a constant there."""
    if not active:
        yield
        return
    from hybrid_cache.info import StepCostModel
    from worker import model_runner

    original = model_runner.ModelRunner._profile_steps
    model_runner.ModelRunner._profile_steps = lambda self, repeats: StepCostModel(1e-3, 1e-5, 1e-7, 1e-5)
    try:
        yield
    finally:
        model_runner.ModelRunner._profile_steps = original


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- 0. the kernels' GPU build -------------------------------------------------------------------------
KERNEL_INTS = ("block_size", "table_stride", "head_dim", "group", "stride_qt", "stride_qh", "stride_ot", "stride_oh",
               "stride_lt", "stride_kb", "stride_ko", "stride_kh", "stride_vb", "stride_vo", "stride_vh")
STORE_INTS = ("stride_kt", "stride_vt", "stride_kb", "stride_ko", "stride_vb", "stride_vo", "width")
# (storage dtype, index dtype, dot precision, hidden pass merging in place): eager bf16 steps (int32
# metadata), decode graphs (int64 persistent buffers), the float32 parity model's hidden passes.
BUILD_VARIANTS = (("bf16", "i32", "tf32", False), ("bf16", "i64", "tf32", False), ("fp32", "i32", "ieee", True))


def cross_compile(arch: int) -> list[dict[str, Any]]:
    """Compile both kernels for CUDA compute capability `arch` (90: H100/H200) down to a cubin with the
    ptxas Triton ships — no GPU needed. Must run without TRITON_INTERPRET (it patches Triton's language)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hybrid_cache import triton_kernels

    target = GPUTarget("cuda", arch, 32)
    rows = []
    for dtype, index, precision, merge in BUILD_VARIANTS:
        signature = {name: f"*{dtype}" for name in ("out_ptr", "q_ptr", "k_ptr", "v_ptr")}
        signature |= {name: f"*{index}" for name in ("tables_ptr", "q_start_ptr", "q_len_ptr", "kv_len_ptr")}
        signature |= {"lse_ptr": "*fp32", "qk_scale": "fp32"} | {name: "i32" for name in KERNEL_INTS}
        constants = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_D": 128, "CAUSAL": not merge, "WRITE_LSE": merge,
                     "ACCUMULATE": merge, "DOT_PRECISION": precision, "UPCAST": False}
        signature |= {name: "constexpr" for name in constants}
        started = time.perf_counter()
        attention = triton.compile(ASTSource(triton_kernels._paged_attention_kernel, signature, constants),
                                   target=target)
        store_signature = {name: f"*{dtype}" for name in ("k_ptr", "v_ptr", "key_cache_ptr", "value_cache_ptr")}
        store_signature |= {name: f"*{index}" for name in ("tokens_ptr", "blocks_ptr", "offsets_ptr")}
        store_signature |= {name: "i32" for name in STORE_INTS} | {"BLOCK": "constexpr"}
        store = triton.compile(ASTSource(triton_kernels._store_kv_kernel, store_signature, {"BLOCK": 8192}),
                               target=target)
        rows.append({"variant": f"{dtype}, {index} indices, {precision} dots" + (", merge" if merge else ""),
                     "cubin_bytes": len(attention.asm["cubin"]) + len(store.asm["cubin"]),
                     "shared_bytes": attention.metadata.shared, "seconds": time.perf_counter() - started})
    return rows


def build(arch: int) -> dict[str, Any]:
    """`cross_compile` in a fresh process without the interpreter (this one may have it on)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check_setup", str(arch)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"cross-compiling for sm_{arch} failed:\n{result.stderr[-3000:]}")
    lines = result.stdout.splitlines()
    return {"arch": f"sm_{arch}", "triton": lines[0], "rows": json.loads(lines[-1])}


def main(argv: list[str] | None = None) -> int:
    import triton

    arch = int((argv if argv is not None else sys.argv[1:])[0])
    print(triton.__version__)
    print(json.dumps(cross_compile(arch)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
