"""Key/value memory bookkeeping: fixed-size blocks of token slots, reference counted. No torch here.

The runner owns the tensors (`[num_blocks * block_size, H_kv, D]` per layer for keys and values);
this module only decides which slots hold which sequence's tokens. Block 0 is never handed out:
its slots are the scratch space that padding rows write to and padding columns read from.

A sequence (one running row, or one task's soft-prompt prefix) holds a list of blocks; a block
shared by several sequences (a task's prefix, used by every row of that task) is counted once per
holder and returns to the free list when the last holder releases it.

Memory: the runner's tensors are left uninitialised, so a block's pages are committed only when it
is first written. Freed blocks are handed out again before any block that was never used (last
freed, first reused), so the memory a server commits follows the most blocks it ever needed at
once (plus the cache's), not its traffic: `touched` counts the blocks ever handed out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NULL_BLOCK = 0
NULL_SLOT = 0  # slot 0 of the reserved block: padding columns read it, padding rows write it


class PoolExhausted(Exception):
    """Not enough free blocks for an allocation (the scheduler preempts or waits)."""


@dataclass
class PoolStats:
    allocated: int = 0  # blocks handed out, summed over time
    freed: int = 0  # blocks returned to the free list, summed over time
    peak_used: int = 0
    preemptions: int = 0  # rows whose blocks were taken back mid-generation (recomputed later)


class BlockPool:
    """Free list and reference counts of `num_blocks` blocks of `block_size` token slots."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError("the key/value pool needs at least 2 blocks (one is reserved)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._recycled: list[int] = []  # freed blocks, the last freed on top
        self._fresh = 1  # blocks fresh..num_blocks-1 were never handed out (block 0 is reserved)
        self._refs = [0] * num_blocks
        self.stats = PoolStats()

    @property
    def capacity(self) -> int:
        """Blocks that can ever be handed out (block 0 is reserved)."""
        return self.num_blocks - 1

    @property
    def touched(self) -> int:
        """Distinct blocks ever handed out: those whose memory is committed."""
        return self._fresh - 1

    @property
    def num_free(self) -> int:
        return len(self._recycled) + self.num_blocks - self._fresh

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise PoolExhausted(f"{n} blocks wanted, {self.num_free} free")
        reuse = min(n, len(self._recycled))
        out = [self._recycled.pop() for _ in range(reuse)] + list(range(self._fresh, self._fresh + n - reuse))
        self._fresh += n - reuse
        for b in out:
            self._refs[b] = 1
        self.stats.allocated += n
        self.stats.peak_used = max(self.stats.peak_used, self.num_used)
        return out

    def share(self, blocks: list[int]) -> None:
        """One more holder for each of `blocks` (already allocated)."""
        for b in blocks:
            assert self._refs[b] > 0, f"block {b} is not allocated"
            self._refs[b] += 1

    def release(self, blocks: list[int]) -> None:
        """One holder fewer; blocks nobody holds return to the free list."""
        for b in blocks:
            assert self._refs[b] > 0, f"block {b} released more often than held"
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._recycled.append(b)
                self.stats.freed += 1

    def refs(self, block: int) -> int:
        return self._refs[block]


@dataclass
class SeqBlocks:
    """Where one sequence's keys and values live: a shared prefix (not owned) then its own tokens.

    Slot of the sequence's token t: the prefix's slots first, then own token j at
    own_blocks[j // block_size] * block_size + j % block_size.
    """

    block_size: int
    prefix_slots: list[int] = field(default_factory=list)  # [P] slots of the shared prefix, in order
    own_blocks: list[int] = field(default_factory=list)
    own_len: int = 0  # own tokens written so far

    @property
    def length(self) -> int:
        return len(self.prefix_slots) + self.own_len

    @property
    def own_capacity(self) -> int:
        return len(self.own_blocks) * self.block_size

    def own_slot(self, j: int) -> int:
        return self.own_blocks[j // self.block_size] * self.block_size + j % self.block_size

    def slots(self) -> list[int]:
        """Every slot of the sequence in order: [prefix..., own...]."""
        bs = self.block_size
        own = [b * bs + o for b in self.own_blocks for o in range(bs)][: self.own_len]
        return self.prefix_slots + own

    def new_slots(self, n: int) -> list[int]:
        """Slots for the next n own tokens (capacity must already be there)."""
        assert self.own_len + n <= self.own_capacity, "allocate blocks before writing"
        return [self.own_slot(j) for j in range(self.own_len, self.own_len + n)]
