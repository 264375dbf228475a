"""Typed settings of model execution (a section of the YAML config)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, PositiveInt


class ModelConfig(BaseModel):
    """Which checkpoint to run, in which dtype, on which device."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field("data/models/SmolLM2-135M-Instruct", description="local Hugging Face model directory")
    dtype: str = Field("auto", description="auto (the checkpoint's), float32, bfloat16 or float16")
    device: str = Field("cpu", description="cpu, cuda or cuda:N")
    seed: int = Field(0, description="seed of the shared sampling generator")
    num_threads: int | None = Field(None, gt=0, description="torch compute threads; None keeps torch's default")
    prepack: bool = Field(
        True, description="lay out GEMM weights once at load for a fast CPU kernel (float32/bfloat16); false: F.linear"
    )
    own_gemm: bool = Field(
        True, description="prepacked GEMMs run on our kernels where the CPU has them and the shape fits (AMX for "
        "bfloat16, AVX-512 for float32); false: oneDNN for all (docs/ARCHITECTURE.md, GEMMs)"
    )
    cuda_graphs: bool = Field(
        True, description="decode steps replay CUDA graphs captured per batch bucket (CUDA, triton backend, TP=1)"
    )
    cuda_graph_batch_sizes: list[PositiveInt] = Field(
        [1, 2, 4, 8, 16, 32, 64, 128, 256], min_length=1, description="decode batch buckets captured at start-up"
    )
