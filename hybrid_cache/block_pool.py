"""A pool of fixed-size physical cache blocks: who holds which block, nothing about tensors.

A block is free, or held by one or more holders (a reference count that names them): the parallel
samples of one prompt (`n > 1`) hold its prompt's full blocks together. A block returns to the pool
when its last holder releases it.
"""

from __future__ import annotations

from collections import deque


class BlockPoolError(RuntimeError):
    """An accounting rule was broken (double free, over-allocation): always a bug, never user input."""


class BlockPool:
    """Hands out block ids `0..num_blocks-1` and counts, by name, who holds each."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"the cache needs at least one block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._holders: list[set[object]] = [set() for _ in range(num_blocks)]

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, count: int, owner: object) -> list[int]:
        """Take `count` free blocks for `owner`; raises if fewer are free (callers check first)."""
        if count < 0 or count > len(self._free):
            raise BlockPoolError(f"cannot allocate {count} blocks: {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(count)]
        for block in blocks:
            self._holders[block].add(owner)
        return blocks

    def share(self, blocks: list[int], holder: object) -> None:
        """Add `holder` to blocks already held (by someone else): they stay until both release them."""
        for block in blocks:
            if not self._holders[block]:
                raise BlockPoolError(f"block {block} is free: it cannot be shared")
            if holder in self._holders[block]:
                raise BlockPoolError(f"block {block} is already held by {holder!r}")
        for block in blocks:
            self._holders[block].add(holder)

    def release(self, blocks: list[int], owner: object) -> None:
        """`owner` lets go of its blocks; each returns to the pool once no one else holds it."""
        for block in blocks:
            if owner not in self._holders[block]:
                raise BlockPoolError(f"block {block} released by {owner!r} but held by {self._holders[block]!r}")
            self._holders[block].discard(owner)
            if not self._holders[block]:
                self._free.append(block)

    def refcount(self, block: int) -> int:
        return len(self._holders[block])

    def holders_of(self, block: int) -> frozenset[object]:
        return frozenset(self._holders[block])

    def check_invariants(self) -> None:
        """Every block is free xor held, and appears in the free list at most once."""
        free = list(self._free)
        if len(set(free)) != len(free):
            raise BlockPoolError("a block is in the free list twice")
        for block in free:
            if self._holders[block]:
                raise BlockPoolError(f"block {block} is free but held by {self._holders[block]!r}")
        held = sum(bool(holders) for holders in self._holders)
        if held + len(free) != self.num_blocks:
            raise BlockPoolError(f"{held} held + {len(free)} free != {self.num_blocks} blocks")
