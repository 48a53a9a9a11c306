"""Per-task soft-prompt prefixes in the key/value pool: stored once, shared by every row of the task.

With causal attention a soft prompt's keys and values never depend on what follows it, so every
request of a task can start from the same prefix and prefill only its own tokens. An entry holds
pool blocks; the cache keeps one reference and every running row of the task one more, so evicting
an entry never takes memory from a running row. Entries nobody uses are kept up to a byte budget
(least recently used out); with a budget of 0 an entry lives only while some row uses it.
No torch here: block bookkeeping only.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from server.engine.pool import BlockPool, SeqBlocks

Key = tuple[str, str]  # (task name, content hash): a replaced prompt never matches a stale entry


@dataclass
class PrefixCacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    invalidations: int = 0


@dataclass
class PrefixEntry:
    key: Key
    length: int  # P
    seq: SeqBlocks  # its own blocks hold the prefix; seq.own_len == P once filled


class PrefixCache:
    """Engine-thread only (no lock). Built over the pool it allocates from; `block_bytes` (what one
    block holds across every layer) turns the byte budget into blocks."""

    def __init__(self, pool: BlockPool, block_bytes: int, capacity_bytes: int) -> None:
        self.pool = pool
        self.block_bytes = block_bytes
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[Key, PrefixEntry] = OrderedDict()
        self.stats = PrefixCacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[PrefixEntry]:
        return list(self._entries.values())

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    @property
    def bytes_used(self) -> int:
        return sum(len(e.seq.own_blocks) for e in self._entries.values()) * self.block_bytes

    def peek(self, key: Key) -> PrefixEntry | None:
        return self._entries.get(key)

    def lookup(self, key: Key) -> PrefixEntry | None:
        """The entry for `key`, counted as a hit or a miss."""
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry

    def create(self, key: Key, length: int) -> PrefixEntry:
        """A new entry with blocks for `length` tokens (to be filled by the runner). Older versions
        of the same task are dropped. Raises PoolExhausted when the pool cannot hold it."""
        for old in [k for k in self._entries if k[0] == key[0] and k != key]:
            self._drop(old)
            self.stats.invalidations += 1
        blocks = self.pool.allocate(self.pool.blocks_for(length))
        entry = PrefixEntry(key=key, length=length, seq=SeqBlocks(self.pool.block_size, own_blocks=blocks))
        self._entries[key] = entry
        return entry

    def attach(self, entry: PrefixEntry) -> SeqBlocks:
        """A row's sequence starting from `entry` (the row holds a reference to its blocks)."""
        self.pool.share(entry.seq.own_blocks)
        return SeqBlocks(
            self.pool.block_size, prefix_slots=[entry.seq.own_slot(j) for j in range(entry.length)]
        )

    def in_use(self, entry: PrefixEntry) -> bool:
        return any(self.pool.refs(b) > 1 for b in entry.seq.own_blocks)

    def trim(self) -> None:
        """Drop least recently used entries that no row uses until the budget holds."""
        for key in list(self._entries):
            if self.bytes_used <= self.capacity_bytes:
                return
            if not self.in_use(self._entries[key]):
                self._drop(key)
                self.stats.evictions += 1

    def free_blocks(self, needed: int, keep: Key | None = None) -> bool:
        """Evict unused entries but `keep` (least recently used first) until `needed` blocks are free."""
        for key in list(self._entries):
            if self.pool.num_free >= needed:
                break
            if key != keep and not self.in_use(self._entries[key]):
                self._drop(key)
                self.stats.evictions += 1
        return self.pool.num_free >= needed

    def reclaimable_blocks(self) -> int:
        return sum(len(e.seq.own_blocks) for e in self._entries.values() if not self.in_use(e))

    def invalidate(self, name: str) -> None:
        """Forget every version of a task (it was removed or replaced); rows using it keep theirs."""
        for key in [k for k in self._entries if k[0] == name]:
            self._drop(key)
            self.stats.invalidations += 1

    def discard(self, key: Key) -> None:
        """Remove an entry whose filling failed."""
        if key in self._entries:
            self._drop(key)

    def _drop(self, key: Key) -> None:
        entry = self._entries.pop(key)
        self.pool.release(entry.seq.own_blocks)
