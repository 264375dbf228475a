"""Per-request block tables over one `BlockPool`: the scheduler's view of memory (no tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hybrid_cache.block_pool import BlockPool, BlockPoolError
from hybrid_cache.layout import CacheLayout
from hybrid_cache.plan import CacheType, Conversion


@dataclass
class BlockTable:
    """A request's blocks, in token order, all of one cache type.

    `block_ids` is the whole table (what the workers read). `blocks` are the ones this request holds
    alone, in token order: what freeing it returns to the pool. They are the same list unless it shares
    blocks with parallel samples of its prompt (`CacheManager.fork`).
    """

    cache_type: CacheType
    block_ids: list[int]
    _pool: BlockPool = field(repr=False)

    @property
    def blocks(self) -> list[int]:
        return [block for block in self.block_ids if self._pool.refcount(block) == 1]


@dataclass(frozen=True)
class CacheUsage:
    """A snapshot for statistics and metrics (a block shared by samples counts once)."""

    num_blocks: int
    num_free: int
    kv_blocks: int
    hidden_blocks: int
    kv_requests: int
    hidden_requests: int
    shared_blocks: int = 0  # blocks held by more than one request (the prompt blocks of parallel samples)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks


@dataclass(frozen=True)
class BlockCopy:
    """Copy the whole block `src` into `dst` (copy-on-write of a forked sample's last prompt block)."""

    src: int
    dst: int


class CacheManager:
    """Allocates, grows, forks, converts and frees the block tables of requests.

    Blocks released by a hidden→KV conversion stay held until `end_step()`, because the worker reads
    them during the step that converts. A forked sample's copy source stays held until the step that
    copies it ends (`take_copy`).
    """

    def __init__(self, layout: CacheLayout, num_blocks: int) -> None:
        self.layout = layout
        self.pool = BlockPool(num_blocks)
        self._tables: dict[int, BlockTable] = {}
        self._released_after_step: list[tuple[int, list[int]]] = []
        self._pending_copies: dict[int, BlockCopy] = {}  # by the seq_id that holds `src` until it runs
        self._kv_per_block = layout.block_size  # read for every running request every step

    # -- queries -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return self.pool.num_free

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def tokens_per_block(self, cache_type: CacheType) -> int:
        """`layout.tokens_per_block`, without a call for KV (the scheduler asks for every running
        request every step)."""
        return self._kv_per_block if cache_type is CacheType.KV else self.layout.tokens_per_block(cache_type)

    def blocks_needed(self, num_tokens: int, cache_type: CacheType) -> int:
        # `-(-n // k)`: the ceiling of n / k in integers, as `layout.blocks_needed` computes it in floats.
        return -(-num_tokens // self.tokens_per_block(cache_type))

    def table(self, seq_id: int) -> BlockTable | None:
        return self._tables.get(seq_id)

    def blocks_to_hold(self, seq_id: int, num_tokens: int) -> int:
        """Extra blocks `seq_id` needs so that it can hold `num_tokens` tokens."""
        table = self._tables[seq_id]
        return max(0, self.blocks_needed(num_tokens, table.cache_type) - len(table.block_ids))

    # -- changes -------------------------------------------------------------------------------
    def allocate(self, seq_id: int, num_tokens: int, cache_type: CacheType) -> BlockTable:
        if seq_id in self._tables:
            raise BlockPoolError(f"request {seq_id} already holds blocks")
        blocks = self.pool.allocate(self.blocks_needed(num_tokens, cache_type), seq_id)
        table = BlockTable(cache_type, blocks, self.pool)
        self._tables[seq_id] = table
        return table

    def grow(self, seq_id: int, num_tokens: int) -> BlockTable:
        """Make `seq_id` able to hold `num_tokens` tokens (callers check `blocks_to_hold` first); its table."""
        extra = self.blocks_to_hold(seq_id, num_tokens)
        table = self._tables[seq_id]
        if extra:
            table.block_ids.extend(self.pool.allocate(extra, seq_id))
        return table

    def _fork_split(self, parent: int, num_tokens: int) -> tuple[list[int], int]:
        """The blocks a fork shares (before the one holding token `num_tokens - 1`) and the one it copies."""
        table = self._tables[parent]
        last = (num_tokens - 1) // self.layout.tokens_per_block(table.cache_type)
        return table.block_ids[:last], table.block_ids[last]

    def fork(self, parent: int, child: int, num_tokens: int) -> BlockTable:
        """Give `child` the first `num_tokens` tokens of `parent`'s cache: the blocks before the one
        holding token `num_tokens - 1` are shared (held by both until both free them), that block is
        copied into a block of the child's own (copy-on-write: the child's next step writes into it).
        The copy is queued: `take_copy(child)` hands it to the step that first runs the child, and
        until then the child holds the source too, so it cannot be freed and reused underneath.
        The child then holds `num_tokens - 1` computed tokens and recomputes the last one (for its own
        logits). It takes one free block (callers check `num_free` first)."""
        if child in self._tables:
            raise BlockPoolError(f"request {child} already holds blocks")
        parent_table = self._tables[parent]
        if self.blocks_needed(num_tokens, parent_table.cache_type) > len(parent_table.block_ids):
            raise BlockPoolError(f"request {parent} holds fewer than {num_tokens} tokens")
        shared, src = self._fork_split(parent, num_tokens)
        [dst] = self.pool.allocate(1, child)
        self.pool.share([*shared, src], child)
        self._pending_copies[child] = BlockCopy(src, dst)
        table = BlockTable(parent_table.cache_type, [*shared, dst], self.pool)
        self._tables[child] = table
        return table

    def take_copy(self, seq_id: int) -> BlockCopy | None:
        """The block copy `seq_id` needs before its next step computes (None if none): the caller puts
        it in that step's plan; the source is let go when the step ends."""
        copy = self._pending_copies.pop(seq_id, None)
        if copy is not None:
            self._released_after_step.append((seq_id, [copy.src]))
        return copy

    def copy_pending(self, seq_id: int) -> bool:
        """`seq_id` was forked and its copy has not been handed to a step yet (`take_copy`)."""
        return seq_id in self._pending_copies

    def free(self, seq_id: int) -> None:
        table = self._tables.pop(seq_id, None)
        if table is not None:
            self.pool.release(table.block_ids, seq_id)
        copy = self._pending_copies.pop(seq_id, None)
        if copy is not None:
            self.pool.release([copy.src], seq_id)

    def convert_to_kv(self, seq_id: int, num_tokens: int) -> Conversion:
        """Give a hidden request KV blocks for `num_tokens` tokens; its hidden blocks go at `end_step()`."""
        table = self._tables[seq_id]
        if table.cache_type is not CacheType.HIDDEN:
            raise BlockPoolError(f"request {seq_id} is not hidden")
        kv_blocks = self.pool.allocate(self.blocks_needed(num_tokens, CacheType.KV), seq_id)
        conversion = Conversion(hidden_blocks=list(table.block_ids), kv_blocks=kv_blocks, num_tokens=num_tokens)
        self._released_after_step.append((seq_id, list(table.block_ids)))
        self._tables[seq_id] = BlockTable(CacheType.KV, list(kv_blocks), self.pool)
        return conversion

    def end_step(self) -> None:
        for owner, blocks in self._released_after_step:
            self.pool.release(blocks, owner)
        self._released_after_step.clear()

    # -- reporting ------------------------------------------------------------------------------
    def usage(self) -> CacheUsage:
        kv = [t for t in self._tables.values() if t.cache_type is CacheType.KV]
        hidden = [t for t in self._tables.values() if t.cache_type is CacheType.HIDDEN]
        held = {b for t in self._tables.values() for b in t.block_ids}
        return CacheUsage(
            num_blocks=self.pool.num_blocks,
            num_free=self.pool.num_free,
            kv_blocks=len({b for t in kv for b in t.block_ids}),
            hidden_blocks=len({b for t in hidden for b in t.block_ids}),
            kv_requests=len(kv),
            hidden_requests=len(hidden),
            shared_blocks=sum(self.pool.refcount(b) > 1 for b in held),
        )

    def check_invariants(self) -> None:
        """The pool's holders are exactly what the tables, the pending copies and the releases after
        this step account for; a block is shared only by tables of one cache type."""
        self.pool.check_invariants()
        expected: dict[int, list[object]] = {}
        for seq_id, table in self._tables.items():
            if len(set(table.block_ids)) != len(table.block_ids):
                raise BlockPoolError(f"request {seq_id}'s table holds a block twice")
            for block in table.block_ids:
                expected.setdefault(block, []).append(seq_id)
        for seq_id, copy in self._pending_copies.items():
            expected.setdefault(copy.src, []).append(seq_id)
        for owner, blocks in self._released_after_step:
            for block in blocks:
                expected.setdefault(block, []).append(owner)
        for block, holders in expected.items():
            if len(set(holders)) != len(holders) or self.pool.holders_of(block) != frozenset(holders):
                raise BlockPoolError(f"block {block} is held by {set(self.pool.holders_of(block))!r} "
                                     f"but accounted to {holders!r}")
        if len(expected) != self.pool.num_used:
            raise BlockPoolError(f"{self.pool.num_used} blocks used but {len(expected)} accounted for")
        types: dict[int, CacheType] = {}
        for table in self._tables.values():
            for block in table.block_ids:
                if types.setdefault(block, table.cache_type) is not table.cache_type:
                    raise BlockPoolError(f"block {block} is in a KV table and a hidden one")
