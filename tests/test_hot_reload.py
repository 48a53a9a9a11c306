"""Hot reload and runtime changes: dropped/replaced/removed folders are picked up without a restart,
running requests keep their prompt, and resident prompts are bounded (LRU, reloaded on demand)."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save_file

from server.api.app import create_app
from server.config import Settings
from server.engine.request import SamplingParams
from server.models import LoadedModel
from server.prompts.install import install, temp_folder
from server.prompts.registry import Registry
from server.prompts.types import PromptGeometry
from tests.support import make_request, reference_greedy, start_engine


def write(folder: Path, hidden: int, num_virtual: int, seed: int) -> torch.Tensor:
    folder.mkdir(parents=True, exist_ok=True)
    emb = torch.randn(num_virtual, hidden, generator=torch.Generator().manual_seed(seed)) * 0.5  # [P, H]
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": num_virtual})
    )
    save_file({"prompt_embeddings": emb}, str(folder / "adapter_model.safetensors"))
    return emb


def deploy(store: Path, name: str, hidden: int, num_virtual: int, seed: int) -> torch.Tensor:
    """What another process (softmux train, a deploy script) does: write hidden, then rename in."""
    tmp = temp_folder(store, name)
    emb = write(tmp, hidden, num_virtual, seed)
    install(store, name, tmp)
    return emb


def registry_for(lm: LoadedModel, store: Path, **kw) -> Registry:
    r = Registry(store, PromptGeometry.of(lm, 32), **kw)
    r.load_all()
    return r


def test_refresh_adds_replaces_and_removes(lm, tmp_path):
    store = tmp_path / "store"
    write(store / "a", lm.hidden_size, 2, seed=0)
    registry = registry_for(lm, store)
    assert registry.names() == ["a"]
    assert registry.refresh() == {"loaded": [], "removed": [], "failed": []}  # nothing changed

    deploy(store, "b", lm.hidden_size, 3, seed=1)
    old_hash = registry.get("a").content_hash
    deploy(store, "a", lm.hidden_size, 4, seed=2)
    (store / "bad").mkdir()
    changes = registry.refresh()
    assert changes["loaded"] == ["a", "b"] and changes["failed"] == ["bad"]
    assert registry.get("a").content_hash != old_hash and registry.get("a").num_virtual_tokens == 4
    assert "bad" in registry.failures()

    shutil.rmtree(store / "b")
    assert registry.refresh()["removed"] == []  # one miss could be a replace between two renames
    assert registry.refresh()["removed"] == ["b"] and registry.names() == ["a"]


def test_lru_bounds_resident_prompts_and_reloads_on_demand(lm, tmp_path):
    store = tmp_path / "store"
    embs = {n: write(store / n, lm.hidden_size, 2, seed=i) for i, n in enumerate(["a", "b", "c"])}
    registry = registry_for(lm, store, max_resident=2)
    assert len(registry.resident()) == 2 and registry.names() == ["a", "b", "c"]
    for n in ["a", "b", "c", "a"]:
        assert torch.equal(registry.get(n).embeddings, embs[n].to(lm.dtype))
    assert registry.resident() == ["c", "a"]  # b was least recently used
    held = registry.get("b")  # a request holding b keeps it, whatever the registry drops
    registry.get("c"), registry.get("a")
    assert "b" not in registry.resident() and torch.equal(held.embeddings, embs["b"].to(lm.dtype))
    assert [t["name"] for t in registry.describe()["tasks"]] == ["a", "b", "c"]  # dropped is still served


def test_replaced_task_old_request_finishes_with_old_prompt(lm, tmp_path):
    store = tmp_path / "store"
    old_emb = write(store / "t", lm.hidden_size, 3, seed=0)
    registry = registry_for(lm, store)
    engine = start_engine(lm, prefix_cache_bytes=1 << 30)
    try:
        ids = [5, 6, 7, 8]
        old = make_request(registry.get("t"), ids, SamplingParams(max_new_tokens=40), stream=True)
        engine.submit(old.request)
        deadline = time.monotonic() + 30
        while not old.events and time.monotonic() < deadline:  # the old request is running
            time.sleep(0.001)
        new_emb = deploy(store, "t", lm.hidden_size, 5, seed=1)
        registry.refresh()
        assert not old.done.is_set(), "the old request finished before the replacement; make it longer"
        new = make_request(registry.get("t"), ids, SamplingParams(max_new_tokens=10))
        engine.submit(new.request)
        assert old.result.generated_tokens == 40 and new.result.virtual_tokens == 5
        assert old.request.output_ids == reference_greedy(lm, old_emb.double(), ids, 40)
        assert new.request.output_ids == reference_greedy(lm, new_emb.double(), ids, 10)
    finally:
        engine.stop()


async def test_folder_dropped_into_the_store_is_served_without_restart(lm, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    app = create_app(
        Settings(store=store, max_new_tokens=16, reload_interval=0.1), loader=lambda: lm, wait=True
    )
    gen = {"task": "late", "inputs": "hello", "parameters": {"max_new_tokens": 4}}
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as client:
            assert (await client.post("/generate", json=gen)).status_code == 404
            emb = deploy(store, "late", lm.hidden_size, 3, seed=4)

            async def wait_for(status: int) -> httpx.Response:
                for _ in range(100):
                    r = await client.post("/generate", json=gen)
                    if r.status_code == status:
                        return r
                    await asyncio.sleep(0.05)
                raise AssertionError(f"still {r.status_code}, wanted {status}")

            r = await wait_for(200)
            ids = lm.tokenizer("hello")["input_ids"]
            assert r.json()["generated_text"] == lm.tokenizer.decode(
                reference_greedy(lm, emb.double(), ids, 4)
            )
            shutil.rmtree(store / "late")
            await wait_for(404)
