"""Registry: a store mixing good and bad folders serves the good ones and explains the bad ones."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from server.prompts.registry import Registry
from server.prompts.types import PromptGeometry, PromptKind
from tests.test_prompts_store import (
    HIDDEN,
    MAX_P,
    NUM_VIRTUAL,
    good_config,
    good_tensor,
    save_peft_adapter,
    write_adapter,
)


def make_registry(store: Path, dtype: torch.dtype = torch.float32) -> Registry:
    return Registry(store, PromptGeometry(HIDDEN, MAX_P, dtype))


@pytest.fixture(scope="module")
def mixed_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("store")
    save_peft_adapter(store / "sentiment", PromptKind.PROMPT_TUNING)
    save_peft_adapter(store / "qa.v2", PromptKind.P_TUNING, seed=2)
    write_adapter(
        store / "hand-made", good_config(num_virtual_tokens=3), {"prompt_embeddings": good_tensor(p=3)}
    )
    # Bad folders, one reason each.
    write_adapter(store / "Bad_Name", good_config(), {"prompt_embeddings": good_tensor()})
    write_adapter(store / "lora", good_config(peft_type="LORA"), {"prompt_embeddings": good_tensor()})
    write_adapter(store / "no-weights", good_config(), None)
    write_adapter(store / "wide", good_config(), {"prompt_embeddings": good_tensor(h=HIDDEN * 2)})
    write_adapter(store / "broken", b"{", {"prompt_embeddings": good_tensor()})
    (store / "empty").mkdir()
    # Ignored entirely: hidden folders (in-progress uploads) and plain files.
    write_adapter(store / ".staging", good_config(), {"prompt_embeddings": good_tensor()})
    (store / "README.md").write_text("not a task")
    return store


def test_mixed_store_serves_good_and_lists_bad(mixed_store: Path, caplog: pytest.LogCaptureFixture) -> None:
    registry = make_registry(mixed_store)
    with caplog.at_level(logging.WARNING, logger="softmux.prompts"):
        registry.load_all()  # must not raise

    assert registry.names() == ["hand-made", "qa.v2", "sentiment"]
    assert len(registry) == 3
    assert "sentiment" in registry and "lora" not in registry and ".staging" not in registry
    assert [p.name for p in registry.tasks()] == registry.names()

    sentiment = registry.get("sentiment")
    assert sentiment is not None and sentiment.kind is PromptKind.PROMPT_TUNING
    saved = load_file(str(mixed_store / "sentiment" / "adapter_model.safetensors"))["prompt_embeddings"]
    assert torch.equal(sentiment.embeddings, saved)
    qa = registry.get("qa.v2")
    assert qa is not None and qa.kind is PromptKind.P_TUNING and qa.num_virtual_tokens == NUM_VIRTUAL
    assert registry.get("missing") is None

    failures = registry.failures()
    assert sorted(failures) == ["Bad_Name", "broken", "empty", "lora", "no-weights", "wide"]
    assert "invalid task name 'Bad_Name'" in failures["Bad_Name"]
    assert "unsupported peft_type 'LORA'" in failures["lora"]
    assert "adapter_model.safetensors is missing" in failures["no-weights"]
    assert "adapter_config.json is missing" in failures["empty"]
    assert f"hidden size {HIDDEN * 2}" in failures["wide"]
    assert "not valid JSON" in failures["broken"]

    # One warning line per skipped folder, naming the folder and the reason.
    warnings = [
        r.getMessage() for r in caplog.records if r.name == "softmux.prompts" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == len(failures)
    for folder, reason in failures.items():
        assert any(repr(folder) in w and reason in w for w in warnings), folder


def test_describe_is_the_tasks_json(mixed_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(mixed_store, store)
    (store / "sentiment" / "task.json").write_text(
        '{"weight": 3, "max_queue": 8, "priority": 2, "min_priority": -1}'
    )
    registry = make_registry(store)
    registry.load_all()
    body = registry.describe()
    json.dumps(body)  # plain JSON types only
    defaults = {
        "weight": 1.0,
        "max_queue": None,
        "max_running": None,
        "priority": 0,
        "min_priority": None,
        "output": None,
        "defaults": {},
    }
    assert body["tasks"] == [
        {
            "name": "hand-made",
            "peft_type": "PROMPT_TUNING",
            "num_virtual_tokens": 3,
            "prefix_length": 3,
            "folder": "hand-made",
            "settings": defaults,
        },
        {
            "name": "qa.v2",
            "peft_type": "P_TUNING",
            "num_virtual_tokens": NUM_VIRTUAL,
            "prefix_length": NUM_VIRTUAL,
            "folder": "qa.v2",
            "settings": defaults,
        },
        {
            "name": "sentiment",
            "peft_type": "PROMPT_TUNING",
            "num_virtual_tokens": NUM_VIRTUAL,
            "prefix_length": NUM_VIRTUAL,
            "folder": "sentiment",
            "settings": {**defaults, "weight": 3.0, "max_queue": 8, "priority": 2, "min_priority": -1},
        },
    ]
    assert [f["folder"] for f in body["failed"]] == [
        "Bad_Name",
        "broken",
        "empty",
        "lora",
        "no-weights",
        "wide",
    ]
    assert all(isinstance(f["reason"], str) and f["reason"] for f in body["failed"])


def test_registry_casts_to_model_dtype(mixed_store: Path) -> None:
    registry = make_registry(mixed_store, dtype=torch.bfloat16)
    registry.load_all()
    assert {p.embeddings.dtype for p in registry.tasks()} == {torch.bfloat16}


def test_missing_store_is_empty_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    registry = make_registry(tmp_path / "does-not-exist")
    with caplog.at_level(logging.WARNING, logger="softmux.prompts"):
        registry.load_all()
    assert len(registry) == 0 and registry.names() == [] and registry.failures() == {}
    assert registry.describe() == {"tasks": [], "failed": []}
    assert any("does not exist" in r.getMessage() for r in caplog.records)


def test_reload_replaces_tasks_and_failures(tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_adapter(store / "one", good_config(), {"prompt_embeddings": good_tensor()})
    write_adapter(store / "bad", good_config(peft_type="LORA"), {"prompt_embeddings": good_tensor()})
    registry = make_registry(store)
    registry.load_all()
    assert registry.names() == ["one"] and list(registry.failures()) == ["bad"]
    old_hash = registry.get("one").content_hash  # type: ignore[union-attr]

    # Fix the bad folder, change "one", add "two": a reload reflects all of it.
    write_adapter(store / "bad", good_config(), {"prompt_embeddings": good_tensor()})
    write_adapter(store / "one", good_config(), {"prompt_embeddings": good_tensor() * 2})
    write_adapter(store / "two", good_config(), {"prompt_embeddings": good_tensor()})
    registry.load_all()
    assert registry.names() == ["bad", "one", "two"] and registry.failures() == {}
    assert registry.get("one").content_hash != old_hash  # type: ignore[union-attr]


def test_task_settings_changes_are_picked_up_and_a_bad_file_refuses_only_its_task(tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_adapter(store / "one", good_config(), {"prompt_embeddings": good_tensor()})
    write_adapter(store / "two", good_config(), {"prompt_embeddings": good_tensor()})
    registry = make_registry(store)
    registry.load_all()
    assert registry.info("one").settings.weight == 1.0  # type: ignore[union-attr]
    content = registry.get("one").content_hash  # type: ignore[union-attr]
    (store / "one" / "task.json").write_text('{"weight": 2.5, "max_running": 4}')
    assert registry.refresh()["loaded"] == ["one"]
    one = registry.get("one")
    assert one is not None and one.settings.weight == 2.5 and one.settings.max_running == 4
    assert one.content_hash == content  # settings never change keys and values: caches stay valid
    (store / "two" / "task.json").write_text('{"priority": 1, "min_priority": 5}')
    assert registry.refresh()["failed"] == ["two"]
    assert "min_priority (5) must be <= priority (1)" in registry.failures()["two"]
    assert registry.names() == ["one"]


def test_failures_returns_a_copy(mixed_store: Path) -> None:
    registry = make_registry(mixed_store)
    registry.load_all()
    registry.failures().clear()
    assert len(registry.failures()) == 6


def test_concurrent_reads_during_reload(tmp_path: Path) -> None:
    store = tmp_path / "store"
    for i in range(4):
        write_adapter(store / f"t{i}", good_config(), {"prompt_embeddings": good_tensor()})
    registry = make_registry(store)
    registry.load_all()
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                # A reader sees either the old or the new complete set, never a partial one.
                assert registry.names() == ["t0", "t1", "t2", "t3"]
                assert registry.get("t2") is not None
                registry.describe()
        except BaseException as e:  # surfaced in the main thread below
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(5):
        registry.load_all()
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
