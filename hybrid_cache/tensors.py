"""The cache tensors of one rank: one buffer per layer, viewed as K/V slots or hidden (x) rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybrid_cache.layout import CacheLayout
from hybrid_cache.plan import CacheType
from hybrid_cache.timing import StepTimer


@dataclass
class LayerCache:
    """One layer's buffer `[num_blocks, block_elems]` and its views.

    `keys[block, offset]` and `values[block, offset]` are `[num_kv_heads, head_dim]`: a block keeps its
    K rows together and its V rows together, so attention gathers whole blocks (fast contiguous
    copies). `hidden[row]` is `[hidden_size]` (row = block * hidden_tokens_per_block + offset).
    """

    buffer: torch.Tensor
    keys: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    values: torch.Tensor
    hidden: torch.Tensor | None


class RecomputeWorkspace:
    """Fixed scratch for K/V recompute: `x` rows and their projected K/V for at most `chunk_tokens` tokens.

    Shared by all layers (recompute goes one layer at a time) and counted inside the memory budget.
    """

    def __init__(self, layout: CacheLayout, chunk_tokens: int, dtype: torch.dtype, device: torch.device) -> None:
        if chunk_tokens <= 0:
            raise ValueError(f"recompute_chunk_tokens must be positive, got {chunk_tokens}")
        self.chunk_tokens = chunk_tokens
        self.timer = StepTimer()  # recompute time, for the step-time split in statistics
        self.x = torch.empty(chunk_tokens, layout.hidden_size, dtype=dtype, device=device)
        self.kv = torch.empty(chunk_tokens, layout.kv_width, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.x.numel() * self.x.element_size() + self.kv.numel() * self.kv.element_size()


class CacheTensors:
    """All layers' cache buffers plus the recompute workspace."""

    def __init__(
        self,
        layout: CacheLayout,
        num_blocks: int,
        recompute_chunk_tokens: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.layout = layout
        self.num_blocks = num_blocks
        self.layers: list[LayerCache] = []
        for _ in range(layout.num_layers):
            buffer = torch.zeros(num_blocks, layout.block_elems, dtype=dtype, device=device)
            kv = buffer.view(num_blocks, 2, layout.block_size, layout.num_kv_heads, layout.head_dim)
            hidden = None
            if layout.hidden_allowed:
                rows = layout.tokens_per_block(CacheType.HIDDEN)
                hidden = buffer.view(num_blocks * rows, layout.hidden_size)
            self.layers.append(LayerCache(buffer, kv[:, 0], kv[:, 1], hidden))
        self.workspace = RecomputeWorkspace(layout, recompute_chunk_tokens, dtype, device)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks `src -> dst` in every layer (K/V or hidden rows alike: a block is one row
        of each layer's buffer). The destinations are fresh blocks, never a source of the same call."""
        if not copies:
            return
        src = torch.tensor([c[0] for c in copies], dtype=torch.long, device=self.layers[0].buffer.device)
        dst = torch.tensor([c[1] for c in copies], dtype=torch.long, device=src.device)
        for layer in self.layers:
            layer.buffer.index_copy_(0, dst, layer.buffer.index_select(0, src))

    @property
    def nbytes(self) -> int:
        blocks = sum(layer.buffer.numel() * layer.buffer.element_size() for layer in self.layers)
        return blocks + self.workspace.nbytes
