"""Every adapter kind through the store, mixed in one batch, against PEFT's own forward();
the per-task key/value prefix cache on and off; eviction and invalidation."""

from __future__ import annotations

import random
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import (
    MultitaskPromptTuningConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from transformers import AutoModelForCausalLM

from server.engine.engine import Engine
from server.engine.pool import BlockPool
from server.engine.prefix_cache import PrefixCache
from server.engine.request import SamplingParams
from server.engine.runner import Acceleration
from server.models import LoadedModel
from server.prompts.registry import Registry
from server.prompts.types import KVShape, PromptGeometry, PromptKind, SoftPrompt
from tests.support import make_engine, make_request, reference_greedy, start_engine

NUM_SUBTASKS = 3


def base_model(tiny_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()


def save_adapters(tiny_model_dir: Path, store: Path) -> None:
    """One adapter of each kind, made and saved by PEFT itself."""
    configs = {
        "pt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7),
        "ptuning": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32),
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
        "mpt": MultitaskPromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=5, num_tasks=NUM_SUBTASKS, num_ranks=2
        ),
    }
    for seed, (name, config) in enumerate(configs.items()):
        torch.manual_seed(100 + seed)
        model = get_peft_model(base_model(tiny_model_dir), config)
        if name == "mpt":  # PEFT's init makes every sub-task nearly equal; make them differ
            with torch.no_grad():
                for p in model.prompt_encoder["default"].parameters():
                    p.add_(torch.randn_like(p) * 0.5)
        model.save_pretrained(store / name)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("kinds")
    save_adapters(tiny_model_dir, root)
    return root


def make_registry(lm: LoadedModel, store: Path, max_virtual_tokens: int = 64) -> Registry:
    registry = Registry(store, PromptGeometry.of(lm, max_virtual_tokens))
    registry.load_all()
    return registry


@torch.inference_mode()
def peft_reference(
    tiny_model_dir: Path, folder: Path, input_ids: list[int], max_new: int, task_id: int | None
) -> list[int]:
    """Greedy tokens from PEFT's forward() over the whole sequence at every step (no generate())."""
    model = PeftModel.from_pretrained(base_model(tiny_model_dir), folder).eval()
    ids = list(input_ids)
    out: list[int] = []
    for _ in range(max_new):
        kwargs = {} if task_id is None else {"task_ids": torch.tensor([task_id])}
        logits = model(input_ids=torch.tensor([ids]), **kwargs).logits
        token = int(logits[0, -1].argmax())
        out.append(token)
        ids.append(token)
    return out


def test_store_reads_every_kind(lm, store):
    registry = make_registry(lm, store)
    assert registry.failures() == {}
    kinds = {p.name: p.kind for p in registry.tasks()}
    assert kinds == {
        "pt": PromptKind.PROMPT_TUNING,
        "ptuning": PromptKind.P_TUNING,
        "prefix": PromptKind.PREFIX_TUNING,
        **{f"mpt.{t}": PromptKind.MULTITASK_PROMPT_TUNING for t in range(NUM_SUBTASKS)},
    }
    prefix = registry.get("prefix")
    shape = KVShape.of(lm.model.config)
    assert prefix.prefix_kv.shape == (shape.num_layers, 2, shape.num_kv_heads, 6, shape.head_dim)
    described = {t["name"]: t for t in registry.describe()["tasks"]}
    assert described["prefix"]["prefix_length"] == 6 and described["mpt.1"]["folder"] == "mpt"


@pytest.mark.parametrize(
    "use_cache,static",
    [(True, False), (False, False), (True, True)],
    ids=["prefix-cache", "no-prefix-cache", "static-decode"],
)
def test_all_kinds_mixed_in_one_batch_match_peft(lm, store, tiny_model_dir, use_cache, static):
    """static: decode steps at bucketed fixed shapes (server/engine/static_decode.py), as on CUDA."""
    registry = make_registry(lm, store)
    rng = random.Random(0)
    names = ["pt", "ptuning", "prefix", "mpt.0", "mpt.1", "mpt.2"]
    specs = [
        (names[k % len(names)], [rng.randrange(40_000) for _ in range(1 + (k * 3) % 9)], 5 + k % 4)
        for k in range(12)
    ]
    engine = start_engine(
        lm, prefix_cache_bytes=1 << 30 if use_cache else None, accel=Acceleration(static_decode=static)
    )
    try:
        tracked = [
            make_request(registry.get(n), ids, SamplingParams(max_new_tokens=m)) for n, ids, m in specs
        ]
        for t in tracked:
            engine.submit(t.request)
        for t, (name, ids, m) in zip(tracked, specs):
            assert t.result.generated_tokens == m
            folder, _, sub = name.partition(".")
            expected = peft_reference(tiny_model_dir, store / folder, ids, m, int(sub) if sub else None)
            assert t.request.output_ids == expected, f"{name} differs from PEFT's forward()"
        assert engine.stats.max_tasks_in_pass >= 4
        if static:
            assert engine.runner.static is not None and engine.runner.static.eager_steps > 0
        if use_cache:
            cache = engine.prefix_cache
            # every task's prefix (prefix tuning's too) is stored once in the pool, then hit
            assert cache.stats.misses == 6 and len(cache) == 6 and cache.stats.hits == 12 - 6
    finally:
        engine.stop()


def test_cache_on_and_off_give_the_same_tokens_over_time(lm, store):
    """Requests arriving one after another (cache warm) equal the same requests with the cache off."""
    registry = make_registry(lm, store)
    rng = random.Random(1)
    specs = [
        (["pt", "ptuning", "mpt.1"][k % 3], [rng.randrange(40_000) for _ in range(2 + k)], 6)
        for k in range(6)
    ]
    outputs = []
    for cache in (1 << 30, None):
        engine = start_engine(lm, prefix_cache_bytes=cache)
        try:
            got = []
            for name, ids, m in specs:
                t = make_request(registry.get(name), ids, SamplingParams(max_new_tokens=m))
                engine.submit(t.request)
                assert t.result.generated_tokens == m
                got.append(t.request.output_ids)
            outputs.append(got)
        finally:
            engine.stop()
    assert outputs[0] == outputs[1]


def prefixes_via_pool(engine: Engine, prompts: list[SoftPrompt]) -> list[torch.Tensor]:
    """Fill prefix entries for `prompts` in one pass and read them back: [L, 2, H_kv, P, D] each."""
    cache = engine.prefix_cache
    entries = [cache.create((f"p{i}", "x"), p.num_virtual_tokens) for i, p in enumerate(prompts)]
    engine.runner.fill_prefixes(list(zip(entries, prompts)))
    engine.scheduler.prefilled([], list(zip(entries, prompts)))  # the runner writes; the scheduler counts
    out = []
    for e in entries:
        slots = torch.tensor(e.seq.slots())
        k, v = engine.runner.k[:, :, slots], engine.runner.v[:, :, slots]  # [L, H_kv, P, D]
        out.append(torch.stack([k, v], dim=1))
    return out


@torch.inference_mode()
def test_prefix_equals_prepended_embeddings_numerically(lm, store):
    """The pooled prefix equals the keys and values that running the prompt embeddings through the
    transformers model gives (what prepending computes), alone or next to a longer prompt."""
    registry = make_registry(lm, store)
    prompt = registry.get("pt")
    engine = make_engine(lm, prefix_cache_bytes=1 << 30)
    out = lm.model(inputs_embeds=prompt.embeddings[None], use_cache=True)
    expected = torch.stack(
        [torch.stack([layer.keys[0], layer.values[0]]) for layer in out.past_key_values.layers]
    )
    (alone,) = prefixes_via_pool(engine, [prompt])
    torch.testing.assert_close(alone, expected, rtol=0, atol=1e-12)
    longer = replace(registry.get("mpt.0"), embeddings=registry.get("mpt.0").embeddings.repeat(3, 1))
    (_, together) = prefixes_via_pool(engine, [longer, prompt])
    torch.testing.assert_close(together, expected, rtol=0, atol=1e-12)


def test_prefix_cache_hit_miss_lru_eviction_and_in_use_protection() -> None:
    pool = BlockPool(64, block_size=4)
    cache = PrefixCache(pool, 1, 2 * 3)  # block_bytes 1: room for two 3-block prefixes
    a, b, c = ("a", "1"), ("b", "1"), ("c", "1")
    assert cache.lookup(a) is None and cache.stats.misses == 1
    for key in (a, b):
        cache.create(key, 10)  # 3 blocks each
    assert cache.lookup(a) is not None and cache.stats.hits == 1  # a is now the most recent
    b_blocks = list(cache.peek(b).seq.own_blocks)
    row = cache.attach(cache.peek(b))  # a running row uses b
    assert len(row.prefix_slots) == 10 and pool.refs(b_blocks[0]) == 2
    cache.create(c, 10)
    cache.trim()  # over budget: the least recently used entry nobody uses goes (a); b is in use
    assert a not in cache and b in cache and c in cache and cache.stats.evictions == 1
    assert pool.num_used == 6
    pool.release(b_blocks)  # the row leaves
    cache.trim()  # now b is unused and the budget (6) holds b + c: nothing to do
    assert b in cache and c in cache
    assert cache.free_blocks(pool.capacity, keep=c) is False  # b evicted; c kept; still short of everything
    assert b not in cache and c in cache and pool.num_used == 3
    cache.invalidate("c")
    assert len(cache) == 0 and pool.num_used == 0 and cache.stats.invalidations == 1


def test_replaced_task_is_invalidated_and_serves_the_new_prompt(lm, store, tmp_path):
    """Replace a task's files: the next request uses the new prompt, not the cached prefix."""
    live = tmp_path / "store"
    live.mkdir()
    shutil.copytree(store / "pt", live / "task")
    registry = make_registry(lm, live)
    engine = start_engine(lm, prefix_cache_bytes=1 << 30)
    try:
        ids = [11, 22, 33, 44]

        def run() -> list[int]:
            t = make_request(registry.get("task"), ids, SamplingParams(max_new_tokens=8))
            engine.submit(t.request)
            assert t.result.generated_tokens == 8
            return t.request.output_ids

        old = run()
        assert run() == old and engine.prefix_cache.stats.hits == 1
        shutil.rmtree(live / "task")
        shutil.copytree(store / "ptuning", live / "task")
        registry.load_all()
        new = run()
        assert new == reference_greedy(lm, registry.get("task").embeddings, ids, 8) and new != old
        assert engine.prefix_cache.stats.invalidations == 1 and len(engine.prefix_cache) == 1
    finally:
        engine.stop()


def test_prefix_shape_mismatch_is_rejected_with_reason(lm, store, tmp_path):
    bad = tmp_path / "store"
    shutil.copytree(store / "prefix", bad / "prefix")
    wrong = KVShape(num_layers=3, num_kv_heads=2, head_dim=16)
    registry = Registry(bad, replace(PromptGeometry.of(lm, 64), kv_shape=wrong))
    registry.load_all()
    reason = registry.failures()["prefix"]
    assert "num_layers" in reason and "3" in reason
