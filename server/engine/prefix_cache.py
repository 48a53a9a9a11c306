"""Per-task key/value prefixes, computed once and reused, bounded in bytes, least recently used out.

With causal attention a soft prompt's keys and values never depend on what follows it, so every
request of a task can start from the same prefix and prefill only its own tokens.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

Key = tuple[str, str]  # (task name, content hash): a replaced prompt never matches a stale entry


@dataclass
class PrefixCacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    invalidations: int = 0


class PrefixCache:
    """Engine-thread only (no lock): maps a prompt's key to its prefix [L, 2, H_kv, P, D]."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[Key, torch.Tensor] = OrderedDict()
        self.bytes_used = 0
        self.stats = PrefixCacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def get(self, key: Key) -> torch.Tensor | None:
        kv = self._entries.get(key)
        if kv is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return kv

    def put(self, key: Key, kv: torch.Tensor) -> None:
        """Insert, drop older versions of the same task, then evict least recently used to fit.

        An entry larger than the whole budget is not kept (the request still runs with it).
        """
        for old in [k for k in self._entries if k[0] == key[0] and k != key]:
            self._remove(old)
            self.stats.invalidations += 1
        size = kv.numel() * kv.element_size()
        if size > self.capacity_bytes:
            return
        if key in self._entries:
            self._remove(key)
        while self.bytes_used + size > self.capacity_bytes:
            self._remove(next(iter(self._entries)))
            self.stats.evictions += 1
        self._entries[key] = kv
        self.bytes_used += size

    def invalidate(self, name: str) -> None:
        """Forget every version of a task (it was removed or replaced)."""
        for key in [k for k in self._entries if k[0] == name]:
            self._remove(key)
            self.stats.invalidations += 1

    def _remove(self, key: Key) -> None:
        kv = self._entries.pop(key)
        self.bytes_used -= kv.numel() * kv.element_size()
