"""Automatic prefix caching of input tokens, per task: full blocks of keys and values reused by later
requests of the same task that start with the same tokens. No torch here: block bookkeeping only.

A block's key is a hash chained from its task's prompt key through every token up to the block's
end, so a block is only ever matched by a request of the same task version (its soft prompt shapes
every key and value after it) with exactly the same tokens before it. Requests of one task that
share a chat-template header, instructions or few-shot examples prefill only what follows.

Cached blocks are full, so nobody ever writes into them; the cache holds one reference to each, and
blocks no running row uses are evicted least recently used first when the pool needs room.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from server.engine.pool import BlockPool

Key = tuple[str, str]  # the task's prompt key (name, content hash)


@dataclass
class BlockCacheStats:
    queries: int = 0  # requests admitted with the cache on
    hit_requests: int = 0  # of those, requests that reused at least one block
    hit_tokens: int = 0  # input tokens whose keys and values were reused instead of computed
    evictions: int = 0


def chain_hashes(key: Key, tokens: list[int], block_size: int, blocks: int) -> list[bytes]:
    """The keys of the first `blocks` full blocks of `tokens` for the task `key`."""
    out: list[bytes] = []
    h = hashlib.blake2b(f"{key[0]}\0{key[1]}".encode(), digest_size=16).digest()
    for i in range(blocks):
        chunk = tokens[i * block_size : (i + 1) * block_size]
        h = hashlib.blake2b(h + b"".join(t.to_bytes(4, "little") for t in chunk), digest_size=16).digest()
        out.append(h)
    return out


class BlockCache:
    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self._blocks: OrderedDict[bytes, int] = OrderedDict()  # chain hash -> block, least recent first
        self.stats = BlockCacheStats()

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, key: Key, tokens: list[int]) -> list[int]:
        """Cached blocks for the longest run of full blocks at the start of `tokens`, leaving at
        least one token to compute (its logits start the generation). No reference is taken."""
        bs = self.pool.block_size
        found: list[tuple[bytes, int]] = []
        for h in chain_hashes(key, tokens, bs, (len(tokens) - 1) // bs):
            block = self._blocks.get(h)
            if block is None:
                break
            found.append((h, block))
        self._touch([h for h, _ in found])
        return [block for _, block in found]

    def _touch(self, chain: list[bytes]) -> None:
        """Most recent last, a chain's first block most recent of all: eviction then takes chains
        from their ends, never leaving a tail that can no longer be reached."""
        for h in reversed(chain):
            self._blocks.move_to_end(h)

    def record_hit(self, blocks: int) -> None:
        self.stats.queries += 1
        self.stats.hit_requests += blocks > 0
        self.stats.hit_tokens += blocks * self.pool.block_size

    def insert(self, key: Key, tokens: list[int], blocks: list[int]) -> None:
        """Offer the full blocks of `tokens` (whose keys and values now sit in `blocks`)."""
        bs = self.pool.block_size
        chain = chain_hashes(key, tokens, bs, len(tokens) // bs)
        for h, block in zip(chain, blocks):
            if h not in self._blocks:
                self.pool.share([block])
                self._blocks[h] = block
        self._touch(chain[: len(blocks)])

    def free_blocks(self, needed: int, keep: set[int] = frozenset()) -> bool:  # type: ignore[assignment]
        """Evict blocks no row uses (least recently used first, never those in `keep`) until
        `needed` blocks are free."""
        for h in list(self._blocks):
            if self.pool.num_free >= needed:
                break
            block = self._blocks[h]
            if block not in keep and self.pool.refs(block) == 1:
                del self._blocks[h]
                self.pool.release([block])
                self.stats.evictions += 1
        return self.pool.num_free >= needed

    def clear(self) -> None:
        for block in self._blocks.values():
            self.pool.release([block])
        self._blocks.clear()
