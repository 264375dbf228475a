"""Per-request block tables over one `BlockPool`: the scheduler's view of memory (no tensors)."""

from __future__ import annotations

from dataclasses import dataclass

from hybrid_cache.block_pool import BlockPool, BlockPoolError
from hybrid_cache.layout import CacheLayout
from hybrid_cache.plan import CacheType, Conversion


@dataclass
class BlockTable:
    """A request's blocks, in token order, all of one cache type."""

    cache_type: CacheType
    blocks: list[int]


@dataclass(frozen=True)
class CacheUsage:
    """A snapshot for statistics and metrics."""

    num_blocks: int
    num_free: int
    kv_blocks: int
    hidden_blocks: int
    kv_requests: int
    hidden_requests: int

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks


class CacheManager:
    """Allocates, grows, converts and frees the block tables of requests.

    Blocks released by a hidden→KV conversion stay owned until `end_step()`, because the worker reads
    them during the step that converts.
    """

    def __init__(self, layout: CacheLayout, num_blocks: int) -> None:
        self.layout = layout
        self.pool = BlockPool(num_blocks)
        self._tables: dict[int, BlockTable] = {}
        self._released_after_step: list[tuple[int, list[int]]] = []

    # -- queries -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return self.pool.num_free

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_needed(self, num_tokens: int, cache_type: CacheType) -> int:
        return self.layout.blocks_needed(num_tokens, cache_type)

    def table(self, seq_id: int) -> BlockTable | None:
        return self._tables.get(seq_id)

    def blocks_to_hold(self, seq_id: int, num_tokens: int) -> int:
        """Extra blocks `seq_id` needs so that it can hold `num_tokens` tokens."""
        table = self._tables[seq_id]
        return max(0, self.blocks_needed(num_tokens, table.cache_type) - len(table.blocks))

    # -- changes -------------------------------------------------------------------------------
    def allocate(self, seq_id: int, num_tokens: int, cache_type: CacheType) -> BlockTable:
        if seq_id in self._tables:
            raise BlockPoolError(f"request {seq_id} already holds blocks")
        blocks = self.pool.allocate(self.blocks_needed(num_tokens, cache_type), seq_id)
        table = BlockTable(cache_type, blocks)
        self._tables[seq_id] = table
        return table

    def grow(self, seq_id: int, num_tokens: int) -> None:
        """Make `seq_id` able to hold `num_tokens` tokens (callers check `blocks_to_hold` first)."""
        extra = self.blocks_to_hold(seq_id, num_tokens)
        if extra:
            self._tables[seq_id].blocks.extend(self.pool.allocate(extra, seq_id))

    def free(self, seq_id: int) -> None:
        table = self._tables.pop(seq_id, None)
        if table is not None:
            self.pool.release(table.blocks, seq_id)

    def convert_to_kv(self, seq_id: int, num_tokens: int) -> Conversion:
        """Give a hidden request KV blocks for `num_tokens` tokens; its hidden blocks go at `end_step()`."""
        table = self._tables[seq_id]
        if table.cache_type is not CacheType.HIDDEN:
            raise BlockPoolError(f"request {seq_id} is not hidden")
        kv_blocks = self.pool.allocate(self.blocks_needed(num_tokens, CacheType.KV), seq_id)
        conversion = Conversion(hidden_blocks=table.blocks, kv_blocks=kv_blocks, num_tokens=num_tokens)
        self._released_after_step.append((seq_id, table.blocks))
        self._tables[seq_id] = BlockTable(CacheType.KV, list(kv_blocks))
        return conversion

    def end_step(self) -> None:
        for owner, blocks in self._released_after_step:
            self.pool.release(blocks, owner)
        self._released_after_step.clear()

    # -- reporting ------------------------------------------------------------------------------
    def usage(self) -> CacheUsage:
        kv = [t for t in self._tables.values() if t.cache_type is CacheType.KV]
        hidden = [t for t in self._tables.values() if t.cache_type is CacheType.HIDDEN]
        return CacheUsage(
            num_blocks=self.pool.num_blocks,
            num_free=self.pool.num_free,
            kv_blocks=sum(len(t.blocks) for t in kv),
            hidden_blocks=sum(len(t.blocks) for t in hidden),
            kv_requests=len(kv),
            hidden_requests=len(hidden),
        )

    def check_invariants(self) -> None:
        """No block in two tables; the pool's owners agree with the tables."""
        self.pool.check_invariants()
        seen: set[int] = set()
        for seq_id, table in self._tables.items():
            for block in table.blocks:
                if block in seen:
                    raise BlockPoolError(f"block {block} appears in two block tables")
                if self.pool.owner_of(block) != seq_id:
                    raise BlockPoolError(f"block {block} is in request {seq_id}'s table but not owned by it")
                seen.add(block)
        pending = sum(len(b) for _, b in self._released_after_step)
        if len(seen) + pending != self.pool.num_used:
            raise BlockPoolError(f"{self.pool.num_used} blocks used but {len(seen) + pending} accounted for")
