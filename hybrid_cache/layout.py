"""Sizes of the hybrid cache, derived from the model's shape (per tensor-parallel rank)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from hybrid_cache.plan import CacheType


class HiddenCacheUnavailable(ValueError):
    """The hidden cache cannot save memory for this model (grouped-query attention: r >= 1)."""


@dataclass(frozen=True)
class CacheLayout:
    """How one rank's cache is laid out.

    A physical block holds `block_size` tokens of K and V for every layer. A hidden request stores
    the layer input `x` (width `hidden_size`) instead, so one block holds `1/r` times as many tokens,
    with `r = hidden_size / (2 * num_kv_heads * head_dim)`.
    """

    num_layers: int
    hidden_size: int  # width of x on this rank (H / tp)
    num_kv_heads: int  # K/V heads on this rank
    head_dim: int
    block_size: int
    dtype_bytes: int

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")

    @cached_property  # derived once: the scheduler asks for it per request per iteration
    def kv_width(self) -> int:
        """Values of K and V together, per token and layer."""
        return 2 * self.num_kv_heads * self.head_dim

    @cached_property
    def ratio(self) -> float:
        """`r`: hidden bytes per token over KV bytes per token."""
        return self.hidden_size / self.kv_width

    @cached_property
    def block_elems(self) -> int:
        """Elements of one block in one layer."""
        return self.block_size * self.kv_width

    @cached_property
    def hidden_unavailable_reason(self) -> str | None:
        if self.ratio >= 1:
            return (
                f"the hidden cache saves no memory for this model: r = hidden {self.hidden_size} / "
                f"(2 x {self.num_kv_heads} kv heads x {self.head_dim}) = {self.ratio:.2f} >= 1 "
                "(as with grouped-query attention)"
            )
        if self.block_elems % self.hidden_size:
            return (
                f"the hidden cache needs block_size x {self.kv_width} to be a multiple of the hidden "
                f"size {self.hidden_size}"
            )
        return None

    @cached_property
    def hidden_allowed(self) -> bool:
        return self.hidden_unavailable_reason is None

    def tokens_per_block(self, cache_type: CacheType) -> int:
        if cache_type is CacheType.KV:
            return self.block_size
        reason = self.hidden_unavailable_reason
        if reason:
            raise HiddenCacheUnavailable(reason)
        return self.block_elems // self.hidden_size

    def blocks_needed(self, num_tokens: int, cache_type: CacheType) -> int:
        return math.ceil(num_tokens / self.tokens_per_block(cache_type))

    def bytes_per_token_per_layer(self, cache_type: CacheType) -> int:
        width = self.kv_width if cache_type is CacheType.KV else self.hidden_size
        return width * self.dtype_bytes

    @cached_property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers."""
        return self.num_layers * self.block_elems * self.dtype_bytes

    def workspace_bytes(self, chunk_tokens: int) -> int:
        """The recompute workspace: x rows and their K/V for `chunk_tokens` tokens (one layer at a time)."""
        return chunk_tokens * (self.hidden_size + self.kv_width) * self.dtype_bytes

    def num_blocks_for_budget(self, budget_bytes: int, chunk_tokens: int) -> int:
        """Blocks that fit in `budget_bytes` once the recompute workspace is reserved inside it."""
        usable = budget_bytes - self.workspace_bytes(chunk_tokens)
        if usable < self.block_bytes:
            raise ValueError(
                f"a cache budget of {budget_bytes} bytes holds no block: the workspace takes "
                f"{self.workspace_bytes(chunk_tokens)} bytes and one block {self.block_bytes} bytes"
            )
        return usable // self.block_bytes
