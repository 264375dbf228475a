"""A pool of fixed-size physical cache blocks: who owns which block, nothing about tensors."""

from __future__ import annotations

from collections import deque


class BlockPoolError(RuntimeError):
    """An accounting rule was broken (double free, over-allocation): always a bug, never user input."""


class BlockPool:
    """Hands out block ids `0..num_blocks-1`; a block is either free or owned by exactly one holder."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"the cache needs at least one block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._owner: list[object | None] = [None] * num_blocks

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
            self._owner[block] = owner
        return blocks

    def release(self, blocks: list[int], owner: object) -> None:
        """Return `owner`'s blocks to the pool."""
        for block in blocks:
            if self._owner[block] is None or self._owner[block] != owner:
                raise BlockPoolError(f"block {block} released by {owner!r} but owned by {self._owner[block]!r}")
            self._owner[block] = None
            self._free.append(block)

    def owner_of(self, block: int) -> object | None:
        return self._owner[block]

    def check_invariants(self) -> None:
        """Every block is free xor owned, and appears in the free list at most once."""
        free = list(self._free)
        if len(set(free)) != len(free):
            raise BlockPoolError("a block is in the free list twice")
        for block in free:
            if self._owner[block] is not None:
                raise BlockPoolError(f"block {block} is free but owned by {self._owner[block]!r}")
        owned = sum(owner is not None for owner in self._owner)
        if owned + len(free) != self.num_blocks:
            raise BlockPoolError(f"{owned} owned + {len(free)} free != {self.num_blocks} blocks")
