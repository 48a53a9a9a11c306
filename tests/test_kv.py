"""Tests for server/engine/kv.py: buffered cache layers, row selection, concatenation, and a real model."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache

from server.engine.kv import BufferedLayer, concat, empty_cache, from_prefixes, select_rows

B, H, D = 3, 2, 4


def rand(b: int, t: int, seed: int, h: int = H, d: int = D) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, t, d, generator=g, dtype=torch.float64)  # [B, H, T, D]


def layer_with(k: torch.Tensor, v: torch.Tensor, capacity: int) -> BufferedLayer:
    return BufferedLayer.from_tensors(k, v, capacity)


# --- one layer ---------------------------------------------------------------------------------


def test_update_writes_in_place_within_capacity() -> None:
    layer = BufferedLayer(capacity=10)
    ks, vs = [rand(B, 3, 0)], [rand(B, 3, 1)]
    keys, values = layer.update(ks[0], vs[0])
    k_ptr, v_ptr = keys.data_ptr(), values.data_ptr()
    for step in range(7):  # 3 + 7 = 10 columns: exactly the capacity
        ks.append(rand(B, 1, 10 + step))
        vs.append(rand(B, 1, 20 + step))
        keys, values = layer.update(ks[-1], vs[-1])
        assert keys.data_ptr() == k_ptr and values.data_ptr() == v_ptr  # no reallocation
        assert layer.get_seq_length() == 4 + step
    assert torch.equal(keys, torch.cat(ks, dim=-2))
    assert torch.equal(values, torch.cat(vs, dim=-2))
    assert keys.shape == (B, H, 10, D)
    assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


def test_update_grows_past_capacity_and_keeps_content() -> None:
    layer = BufferedLayer(capacity=4)
    ks, vs = [rand(B, 3, 0)], [rand(B, 3, 1)]
    keys, _ = layer.update(ks[0], vs[0])
    first_ptr = keys.data_ptr()
    ptrs = []
    for step in range(10):
        ks.append(rand(B, 1 + step % 3, 100 + step))  # chunks of 1..3 columns
        vs.append(rand(B, 1 + step % 3, 200 + step))
        keys, values = layer.update(ks[-1], vs[-1])
        ptrs.append(keys.data_ptr())
        assert torch.equal(keys, torch.cat(ks, dim=-2))
        assert torch.equal(values, torch.cat(vs, dim=-2))
        assert layer.get_seq_length() == keys.shape[-2]
    assert first_ptr not in ptrs[-1:]  # it did grow
    # Growth is amortised (capacity at least doubles), not a copy per step.
    assert len(set(ptrs)) <= 4


def test_a_write_larger_than_twice_the_capacity_fits() -> None:
    layer = BufferedLayer(capacity=2)
    a, b = rand(1, 1, 0), rand(1, 9, 1)
    layer.update(a, a)
    keys, values = layer.update(b, b)
    assert torch.equal(keys, torch.cat([a, b], dim=-2))
    assert layer.get_seq_length() == 10


def test_empty_cache_through_the_cache_api() -> None:
    cache = empty_cache(num_layers=3, capacity=6)
    assert cache.get_seq_length() == 0
    written = {i: ([], []) for i in range(3)}
    ptrs = {}
    for step in range(6):
        for i in range(3):
            k, v = rand(B, 1, 10 * step + i), rand(B, 1, 1000 + 10 * step + i)
            written[i][0].append(k)
            written[i][1].append(v)
            keys, values = cache.update(k, v, i)
            ptrs.setdefault(i, keys.data_ptr())
            assert keys.data_ptr() == ptrs[i]
    assert cache.get_seq_length() == 6
    for i in range(3):
        assert torch.equal(cache.layers[i].keys, torch.cat(written[i][0], dim=-2))
        assert torch.equal(cache.layers[i].values, torch.cat(written[i][1], dim=-2))


# --- select_rows and concat -------------------------------------------------------------------


def cache_of(layers_kv: list[tuple[torch.Tensor, torch.Tensor]], capacity: int):
    cache = empty_cache(num_layers=len(layers_kv), capacity=capacity)
    for i, (k, v) in enumerate(layers_kv):
        cache.update(k, v, i)
    return cache


def test_select_rows_keeps_the_right_rows_and_columns() -> None:
    kvs = [(rand(4, 7, 2 * i), rand(4, 7, 2 * i + 1)) for i in range(2)]
    cache = cache_of(kvs, capacity=7)
    rows = torch.tensor([3, 1])
    out = select_rows(cache, rows, start=2, headroom=5)
    assert out.get_seq_length() == 5
    for i, (k, v) in enumerate(kvs):
        assert torch.equal(out.layers[i].keys, k[[3, 1], :, 2:])
        assert torch.equal(out.layers[i].values, v[[3, 1], :, 2:])
    # The headroom is real: 5 more columns are written in place.
    ptr = out.layers[0].keys.data_ptr()
    extra = [rand(2, 1, 50 + s) for s in range(5)]
    for e in extra:
        keys, _ = out.update(e, e, 0)
        assert keys.data_ptr() == ptr
    assert torch.equal(out.layers[0].keys, torch.cat([kvs[0][0][[3, 1], :, 2:], *extra], dim=-2))
    # The source cache is untouched by writes to the selection.
    assert torch.equal(cache.layers[0].keys, kvs[0][0])


@pytest.mark.parametrize("len_a,len_b", [(3, 5), (6, 2), (4, 4)])
def test_concat_left_pads_with_zeros_and_keeps_content(len_a: int, len_b: int) -> None:
    a_kvs = [(rand(2, len_a, 10 + i), rand(2, len_a, 20 + i)) for i in range(2)]
    b_kvs = [(rand(1, len_b, 30 + i), rand(1, len_b, 40 + i)) for i in range(2)]
    a, b = cache_of(a_kvs, capacity=len_a), cache_of(b_kvs, capacity=len_b + 3)
    out = concat(a, b, headroom=4)
    t = max(len_a, len_b)
    assert out.get_seq_length() == t
    for i in range(2):
        for which in (0, 1):  # keys, values
            got = (out.layers[i].keys, out.layers[i].values)[which]
            assert got.shape == (3, H, t, D)
            ea, eb = a_kvs[i][which], b_kvs[i][which]
            assert torch.equal(got[:2, :, t - len_a :], ea)
            assert torch.equal(got[2:, :, t - len_b :], eb)
            assert bool((got[:2, :, : t - len_a] == 0).all())
            assert bool((got[2:, :, : t - len_b] == 0).all())
    # headroom: 4 in-place writes, then the layer still grows correctly
    ptr = out.layers[1].keys.data_ptr()
    new = [rand(3, 1, 60 + s) for s in range(5)]
    for s, e in enumerate(new):
        keys, _ = out.update(e, e, 1)
        if s < 4:
            assert keys.data_ptr() == ptr
    expected_prefix = torch.zeros(3, H, t, D, dtype=torch.float64)
    expected_prefix[:2, :, t - len_a :] = a_kvs[1][0]
    expected_prefix[2:, :, t - len_b :] = b_kvs[1][0]
    assert torch.equal(out.layers[1].keys, torch.cat([expected_prefix, *new], dim=-2))


def test_from_prefixes_right_aligns_each_rows_prefix() -> None:
    layers, width, capacity = 3, 6, 9
    g = torch.Generator().manual_seed(5)
    prefixes = [torch.randn(layers, 2, H, 4, D, generator=g, dtype=torch.float64), None, torch.randn(layers, 2, H, 6, D, generator=g, dtype=torch.float64)]
    cache = from_prefixes(prefixes, width=width, capacity=capacity)
    assert cache.get_seq_length() == width
    for layer in range(layers):
        k, v = cache.layers[layer].keys, cache.layers[layer].values
        assert k.shape == (3, H, width, D)
        assert torch.equal(k[0, :, 2:], prefixes[0][layer, 0]) and torch.equal(v[0, :, 2:], prefixes[0][layer, 1])
        assert bool((k[0, :, :2] == 0).all()) and bool((v[0, :, :2] == 0).all())
        assert bool((k[1] == 0).all()) and bool((v[1] == 0).all())
        assert torch.equal(k[2], prefixes[2][layer, 0]) and torch.equal(v[2], prefixes[2][layer, 1])
    # room for capacity - width more columns without reallocating
    ptr = cache.layers[0].keys.data_ptr()
    for step in range(capacity - width):
        e = rand(3, 1, 70 + step)
        keys, _ = cache.update(e, e, 0)
        assert keys.data_ptr() == ptr
        assert torch.equal(keys[:, :, -1:], e)


# --- a real model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
    )
    return LlamaForCausalLM(config).to(torch.float64).eval()


@torch.inference_mode()
def greedy_logits(model: LlamaForCausalLM, ids: torch.Tensor, steps: int, cache) -> list[torch.Tensor]:
    out = model(input_ids=ids, cache=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    for _ in range(steps):
        token = logits[-1].argmax(-1, keepdim=True)  # [B, 1]
        logits.append(model(input_ids=token, cache=cache, use_cache=True).logits[:, -1])
    return logits


def test_model_with_buffered_cache_matches_dynamic_cache(tiny_llama: LlamaForCausalLM) -> None:
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    steps = 10
    reference = greedy_logits(tiny_llama, ids, steps, DynamicCache(config=tiny_llama.config))
    # capacity 8 < 6 + 10: the buffers must grow mid-generation
    cache = empty_cache(tiny_llama.config.num_hidden_layers, capacity=8)
    ours = greedy_logits(tiny_llama, ids, steps, cache)
    assert cache.get_seq_length() == 6 + steps
    for r, o in zip(reference, ours):
        torch.testing.assert_close(o, r, rtol=0, atol=1e-10)
    # and the model really used the cache: without it, decoding one token gives other logits
    with torch.inference_mode():
        no_ctx = tiny_llama(input_ids=reference[0].argmax(-1, keepdim=True)).logits[:, -1]
    assert not torch.allclose(no_ctx, reference[1])


@torch.inference_mode()
def test_select_and_concat_in_a_real_decode(tiny_llama: LlamaForCausalLM) -> None:
    """Rows prefilled separately, joined with concat (left padding), then one leaves via select_rows:
    every row's logits match it decoded alone with DynamicCache."""
    layers = tiny_llama.config.num_hidden_layers
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 128, (1, n), generator=g) for n in (3, 7, 5)]
    steps = 6
    alone = [greedy_logits(tiny_llama, s, steps, DynamicCache(config=tiny_llama.config)) for s in seqs]

    # batch A: rows 0 and 1 (left-padded prefill); batch B: row 2
    t_a = 7
    ids_a = torch.zeros(2, t_a, dtype=torch.int64)
    mask_a = torch.zeros(2, t_a, dtype=torch.int64)
    pos_a = torch.zeros(2, t_a, dtype=torch.int64)
    for i, s in enumerate(seqs[:2]):
        n = s.shape[1]
        ids_a[i, t_a - n :] = s[0]
        mask_a[i, t_a - n :] = 1
        pos_a[i, t_a - n :] = torch.arange(n)
    cache_a = empty_cache(layers, capacity=t_a + 2)
    logits_a = tiny_llama(input_ids=ids_a, attention_mask=mask_a, position_ids=pos_a, cache=cache_a, use_cache=True).logits[:, -1]
    cache_b = empty_cache(layers, capacity=5)
    logits_b = tiny_llama(input_ids=seqs[2], cache=cache_b, use_cache=True).logits[:, -1]
    torch.testing.assert_close(logits_a[0], alone[0][0][0], rtol=0, atol=1e-10)
    torch.testing.assert_close(logits_a[1], alone[1][0][0], rtol=0, atol=1e-10)
    torch.testing.assert_close(logits_b[0], alone[2][0][0], rtol=0, atol=1e-10)

    cache = concat(cache_a, cache_b, headroom=2)
    mask = torch.cat([mask_a, torch.cat([torch.zeros(1, 2, dtype=torch.int64), torch.ones(1, 5, dtype=torch.int64)], 1)])
    positions = torch.tensor([3, 7, 5])
    logits = torch.cat([logits_a, logits_b])
    rows = [0, 1, 2]
    for step in range(1, steps + 1):
        if step == 3:  # row 1 finishes: keep rows 0 and 2, and drop the columns nobody uses
            keep = torch.tensor([0, 2])
            start = int((mask[keep].sum(0) == 0).int().argmin())  # first column some kept row uses
            cache = select_rows(cache, keep, start, headroom=1)
            mask, positions, logits = mask[keep, start:], positions[keep], logits[keep]
            rows = [0, 2]
        token = logits.argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.int64)], 1)
        logits = tiny_llama(input_ids=token, attention_mask=mask, position_ids=positions[:, None], cache=cache, use_cache=True).logits[:, -1]
        positions = positions + 1
        for j, r in enumerate(rows):
            torch.testing.assert_close(logits[j], alone[r][step][0], rtol=0, atol=1e-10)
    assert cache.get_seq_length() == mask.shape[1]
