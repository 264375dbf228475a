"""Typed settings of the cache (a section of the YAML config)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class CacheConfig(BaseModel):
    """Memory for the hybrid cache on each rank.

    Give either `num_blocks` or `memory_bytes`; a byte budget includes the recompute workspace, so two
    systems given the same bytes get the same memory.
    """

    model_config = ConfigDict(extra="forbid")

    block_size: int = Field(32, gt=0, description="tokens per KV block (32 matches vLLM-CPU's minimum)")
    num_blocks: int | None = Field(None, gt=0, description="exact number of blocks; overrides memory_bytes")
    memory_bytes: int | None = Field(1 << 30, gt=0, description="cache budget in bytes, workspace included")
    recompute_chunk_tokens: int = Field(
        2048, gt=0, description="rows of x recomputed at once; sizes the fixed recompute workspace"
    )

    attention_backend: Literal["torch", "cpu_paged", "triton"] = Field(
        "cpu_paged",
        description="cpu_paged: our C++ kernel reading K/V blocks in place; torch: gather + SDPA (the reference); "
        "triton: paged Triton kernels for GPUs (on CPU only under TRITON_INTERPRET=1; docs/GPU.md)",
    )

    profile_token_counts: list[int] = Field(
        [32, 128, 512], min_length=2, description="history lengths timed at start-up to fit the recompute cost"
    )
    profile_repeats: int = Field(3, gt=0, description="timed passes per length (the fastest is kept)")

    @model_validator(mode="after")
    def _one_budget(self) -> CacheConfig:
        if self.num_blocks is None and self.memory_bytes is None:
            raise ValueError("set cache.num_blocks or cache.memory_bytes")
        return self
