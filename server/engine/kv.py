"""A key/value cache whose layers live in preallocated buffers.

transformers' DynamicLayer grows by `torch.cat`, copying the whole cache at every decode step.
Here each layer owns a buffer with room for the tokens the batch can still generate; a step
writes its new column in place and hands the model a view. Rows leave or join only through
`select` and `concat`, which copy once.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class BufferedLayer(DynamicLayer):
    """One layer's keys and values: buffers [B, H_kv, capacity, D], the first `length` columns in use."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    @classmethod
    def from_tensors(cls, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> "BufferedLayer":
        """keys, values [B, H_kv, T, D] -> a layer holding them with room for `capacity` >= T columns."""
        layer = cls(capacity)
        layer._allocate(keys, max(capacity, keys.shape[-2]))
        layer._write(keys, values)
        return layer

    @classmethod
    def adopt(cls, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int) -> "BufferedLayer":
        """Wrap buffers [B, H_kv, capacity, D] whose first `length` columns are filled."""
        layer = cls(key_buffer.shape[-2])
        layer._k, layer._v, layer.length = key_buffer, value_buffer, length
        layer.keys, layer.values = key_buffer[:, :, :length], value_buffer[:, :, :length]
        layer.device, layer.dtype, layer.is_initialized = key_buffer.device, key_buffer.dtype, True
        return layer

    def _allocate(self, like: torch.Tensor, capacity: int) -> None:
        b, h, _, d = like.shape
        self.capacity = capacity
        self._k = like.new_zeros(b, h, capacity, d)
        self._v = like.new_zeros(b, h, capacity, d)
        self.device, self.dtype = like.device, like.dtype
        self.is_initialized = True

    def _write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        n = keys.shape[-2]
        assert self._k is not None and self._v is not None
        if self.length + n > self.capacity:  # out of room: grow by copying once, with slack
            old_k, old_v = self._k[:, :, : self.length], self._v[:, :, : self.length]
            self._allocate(old_k, max(2 * self.capacity, self.length + n))
            self._k[:, :, : self.length] = old_k
            self._v[:, :, : self.length] = old_v
        self._k[:, :, self.length : self.length + n] = keys
        self._v[:, :, self.length : self.length + n] = values
        self.length += n
        self.keys = self._k[:, :, : self.length]
        self.values = self._v[:, :, : self.length]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._allocate(key_states, max(self.capacity, key_states.shape[-2]))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._write(key_states, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.length = 0
        if self._k is not None and self._v is not None:
            self.keys, self.values = self._k[:, :, :0], self._v[:, :, :0]

    # Row and column edits go through select_rows/concat, which keep buffer and length in step;
    # transformers' in-place variants would change `keys` behind the buffer's back.
    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("BufferedLayer: use select_rows to trim a cache")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("BufferedLayer: use select_rows to drop rows")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("BufferedLayer: rows are added with concat")


def empty_cache(num_layers: int, capacity: int) -> Cache:
    """A cache whose buffers are allocated on the first forward pass, sized `capacity` columns."""
    return Cache(layers=[BufferedLayer(capacity) for _ in range(num_layers)])


def layers_of(cache: Cache) -> list[BufferedLayer]:
    return list(cache.layers)  # type: ignore[arg-type]


def select_rows(cache: Cache, rows: torch.Tensor, start: int, headroom: int) -> Cache:
    """Keep `rows` (int64 [B']) and columns from `start` on, with room for `headroom` more columns."""
    out = []
    for layer in layers_of(cache):
        k = layer.keys[rows, :, start:]  # [B', H, T', D]
        v = layer.values[rows, :, start:]
        out.append(BufferedLayer.from_tensors(k, v, k.shape[-2] + headroom))
    return Cache(layers=out)


def concat(a: Cache, b: Cache, headroom: int) -> Cache:
    """Stack two caches' rows; the shorter is left-padded with zeros (its mask marks them 0)."""
    out = []
    for la, lb in zip(layers_of(a), layers_of(b)):
        ta, tb = la.length, lb.length
        t = max(ta, tb)
        ba = la.keys.shape[0]
        bh, _, _, d = lb.keys.shape
        keys = la.keys.new_zeros(ba + bh, la.keys.shape[1], t + headroom, d)  # [B, H, capacity, D]
        values = torch.zeros_like(keys)
        keys[:ba, :, t - ta : t] = la.keys
        values[:ba, :, t - ta : t] = la.values
        keys[ba:, :, t - tb : t] = lb.keys
        values[ba:, :, t - tb : t] = lb.values
        out.append(BufferedLayer.adopt(keys, values, t))
    return Cache(layers=out)


def from_prefixes(prefixes: list[torch.Tensor | None], width: int, capacity: int) -> Cache:
    """A cache whose row i ends with prefixes[i] ([L, 2, H_kv, P_i, D], or nothing), right-aligned
    in `width` columns, with room for `capacity` columns in all."""
    sample = next(p for p in prefixes if p is not None)
    num_layers, _, heads, _, dim = sample.shape
    keys = sample.new_zeros(num_layers, len(prefixes), heads, capacity, dim)  # [L, B, H_kv, capacity, D]
    values = torch.zeros_like(keys)
    for i, prefix in enumerate(prefixes):
        if prefix is not None:
            p = prefix.shape[3]
            keys[:, i, :, width - p : width] = prefix[:, 0]
            values[:, i, :, width - p : width] = prefix[:, 1]
    return Cache(layers=[BufferedLayer.adopt(keys[layer], values[layer], width) for layer in range(num_layers)])
