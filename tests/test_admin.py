"""Admin API (PUT/GET/DELETE /tasks/{name}), its bearer token, the generation API key,
and atomic store writes."""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save

from server.api.app import create_app
from server.config import Settings
from tests.support import reference_greedy

TOKEN = "s3cret-admin"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def adapter_files(
    hidden: int,
    num_virtual: int = 3,
    seed: int = 0,
    *,
    peft_type: str = "PROMPT_TUNING",
    tensor: torch.Tensor | None = None,
) -> dict[str, bytes]:
    emb = (
        tensor
        if tensor is not None
        else torch.randn(num_virtual, hidden, generator=torch.Generator().manual_seed(seed)) * 0.5
    )
    config = {"peft_type": peft_type, "task_type": "CAUSAL_LM", "num_virtual_tokens": int(emb.shape[0])}
    return {
        "adapter_config.json": json.dumps(config).encode(),
        "adapter_model.safetensors": save({"prompt_embeddings": emb}),
    }


def multipart(files: dict[str, bytes]) -> dict[str, tuple[str, io.BytesIO, str]]:
    return {name: (name, io.BytesIO(data), "application/octet-stream") for name, data in files.items()}


def snapshot(store: Path) -> dict[str, bytes]:
    """Every file in the store, hidden ones included: 'unchanged' means byte for byte."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()} | {
        str(p.relative_to(store)) + "/": b"" for p in sorted(store.rglob("*")) if p.is_dir()
    }


async def open_client(app) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as client:
            yield client


def settings_for(store: Path, **changes) -> Settings:
    return Settings(
        store=store,
        max_input_tokens=64,
        max_new_tokens=64,
        max_batch_tokens=4096,
        admin_token=TOKEN,
        max_upload_bytes=64 << 10,
        reload_interval=0,
    ).replace(**changes)


@pytest.fixture
async def client(lm, tmp_path) -> AsyncIterator[httpx.AsyncClient]:
    store = tmp_path / "store"
    store.mkdir()
    app = create_app(settings_for(store), loader=lambda: lm, wait=True)
    app.state.store_path = store
    async for c in open_client(app):
        c.store = store  # type: ignore[attr-defined]
        yield c


async def test_admin_routes_without_configured_token_are_403_saying_how(lm, tmp_path):
    app = create_app(settings_for(tmp_path, admin_token=""), loader=lambda: lm, wait=True)
    async for c in open_client(app):
        for method in ("PUT", "GET", "DELETE"):
            r = await c.request(method, "/tasks/x", headers=AUTH)
            assert r.status_code == 403, (method, r.text)
            assert "--admin-token" in r.json()["error"] and "SOFTMUX_ADMIN_TOKEN" in r.json()["error"]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}],
)
async def test_admin_routes_need_the_right_bearer_token(client, lm, headers):
    files = adapter_files(lm.hidden_size)
    for method, kwargs in (("PUT", {"files": multipart(files)}), ("GET", {}), ("DELETE", {})):
        r = await client.request(method, "/tasks/x", headers=headers, **kwargs)
        assert r.status_code == 401, (method, r.text)
        assert r.json()["error_type"] == "unauthorized"
    assert snapshot(client.store) == {}


async def test_put_get_generate_replace_delete(client, lm):
    gen = {"task": "fresh", "inputs": "hello there", "parameters": {"max_new_tokens": 6}}
    assert (await client.post("/generate", json=gen)).status_code == 404
    files = adapter_files(lm.hidden_size, 3, seed=1)
    r = await client.put(
        "/tasks/fresh", headers=AUTH, files=multipart({**files, "README.md": b"# fresh\ncard text"})
    )
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "created"

    r = await client.get("/tasks/fresh", headers=AUTH)
    assert r.status_code == 200
    body = r.json()
    assert body["peft_type"] == "PROMPT_TUNING" and body["num_virtual_tokens"] == 3
    assert body["card"] == "# fresh\ncard text" and len(body["content_hash"]) == 64 and body["created"]
    ids = lm.tokenizer("hello there")["input_ids"]
    from safetensors.torch import load

    emb1 = load(files["adapter_model.safetensors"])["prompt_embeddings"].double()
    r = await client.post("/generate", json=gen)
    assert r.status_code == 200 and r.json()["generated_text"] == lm.tokenizer.decode(
        reference_greedy(lm, emb1, ids, 6)
    )

    files2 = adapter_files(lm.hidden_size, 4, seed=2)
    r = await client.put("/tasks/fresh", headers=AUTH, files=multipart(files2))
    assert r.status_code == 200 and r.json()["status"] == "replaced" and r.json()["num_virtual_tokens"] == 4
    assert r.json()["content_hash"] != body["content_hash"]
    emb2 = load(files2["adapter_model.safetensors"])["prompt_embeddings"].double()
    r = await client.post("/generate", json=gen)
    assert r.json()["generated_text"] == lm.tokenizer.decode(reference_greedy(lm, emb2, ids, 6))
    assert r.json()["details"]["virtual_tokens"] == 4
    assert [t["name"] for t in (await client.get("/tasks")).json()["tasks"]] == ["fresh"]
    assert sorted(os.listdir(client.store)) == ["fresh"]  # no temp or aside folders left

    r = await client.delete("/tasks/fresh", headers=AUTH)
    assert r.status_code == 200 and r.json()["tasks"] == ["fresh"]
    assert (await client.get("/tasks/fresh", headers=AUTH)).status_code == 404
    assert (await client.delete("/tasks/fresh", headers=AUTH)).status_code == 404
    assert (await client.post("/generate", json=gen)).status_code == 404
    assert os.listdir(client.store) == []


def _nan(hidden: int) -> torch.Tensor:
    t = torch.zeros(3, hidden)
    t[1, 2] = float("nan")
    return t


@pytest.mark.parametrize(
    ("make", "status", "reason"),
    [
        (
            lambda h: {**adapter_files(h), "adapter_model.safetensors": b"\x08\x00\x00\x00garbage!"},
            422,
            "safetensors",
        ),
        (lambda h: adapter_files(h, tensor=_nan(h)), 422, "NaN"),
        (lambda h: adapter_files(h + 1), 422, "hidden size"),
        (lambda h: adapter_files(h, peft_type="LORA"), 422, "unsupported peft_type"),
        (lambda h: {**adapter_files(h), "adapter_config.json": b"{not json"}, 422, "JSON"),
        (lambda h: {"adapter_config.json": adapter_files(h)["adapter_config.json"]}, 422, "missing"),
        (lambda h: {**adapter_files(h), "model.pt": b"pickle"}, 422, "unexpected file"),
        (lambda h: adapter_files(h, tensor=torch.zeros(400, h)), 413, "bytes"),
    ],
    ids=["corrupt", "nan", "wrong-hidden", "lora", "bad-json", "missing-weights", "pickle", "oversized"],
)
async def test_bad_uploads_are_4xx_with_reason_and_leave_the_store_unchanged(
    client, lm, make, status, reason
):
    files = adapter_files(lm.hidden_size, seed=5)
    assert (await client.put("/tasks/keep", headers=AUTH, files=multipart(files))).status_code == 201
    before = snapshot(client.store)
    for name in ("new-task", "keep"):  # a new name and a replacement of a served task
        r = await client.put(f"/tasks/{name}", headers=AUTH, files=multipart(make(lm.hidden_size)))
        assert r.status_code == status, r.text
        assert reason in r.json()["error"], r.json()
        assert snapshot(client.store) == before
    assert (
        await client.post(
            "/generate", json={"task": "keep", "inputs": "x", "parameters": {"max_new_tokens": 1}}
        )
    ).status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/tasks/%2e%2e%2fx",
        "/tasks/..%2Fx",
        "/tasks/Bad_Name",
        "/tasks/a%2Fb",
        "/tasks/.hidden",
        "/tasks/x%00",
        "/tasks/" + "a" * 65,
    ],
)
async def test_bad_names_are_rejected(client, lm, path):
    for method, kwargs in (
        ("PUT", {"files": multipart(adapter_files(lm.hidden_size))}),
        ("GET", {}),
        ("DELETE", {}),
    ):
        r = await client.request(method, httpx.URL("http://test" + path), headers=AUTH, **kwargs)
        assert 400 <= r.status_code < 500, (method, path, r.status_code)
        if r.status_code == 422:
            assert "invalid task name" in r.json()["error"]
    assert snapshot(client.store) == {}
    assert not (client.store.parent / "x").exists()


async def test_a_crash_between_writing_and_renaming_leaves_no_trace(client, lm, monkeypatch):
    import server.api.admin as admin

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    monkeypatch.setattr(admin, "install", crash)
    with pytest.raises(OSError):
        await client.put("/tasks/doomed", headers=AUTH, files=multipart(adapter_files(lm.hidden_size)))
    assert snapshot(client.store) == {}
    assert "doomed" not in [t["name"] for t in (await client.get("/tasks")).json()["tasks"]]


async def test_a_killed_upload_leaves_only_a_hidden_folder_that_is_ignored_and_cleaned(lm, tmp_path):
    store = tmp_path / "store"
    leftover = store / ".doomed.tmp-abc123"  # what a process killed mid-upload leaves behind
    leftover.mkdir(parents=True)
    files = adapter_files(lm.hidden_size)
    (leftover / "adapter_config.json").write_bytes(files["adapter_config.json"])
    (leftover / "adapter_model.safetensors").write_bytes(files["adapter_model.safetensors"][:50])
    old = time.time() - 3600
    os.utime(leftover, (old, old))
    app = create_app(settings_for(store), loader=lambda: lm, wait=True)
    async for c in open_client(app):
        body = (await c.get("/tasks")).json()
        assert body == {"tasks": [], "failed": []}
        assert not leftover.exists()  # cleaned at startup


async def test_api_key_guards_generation_routes_only(lm, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    for name, data in adapter_files(lm.hidden_size).items():
        (store / "t").mkdir(exist_ok=True)
        (store / "t" / name).write_bytes(data)
    app = create_app(settings_for(store, api_key="k3y"), loader=lambda: lm, wait=True)
    gen = {"task": "t", "inputs": "x", "parameters": {"max_new_tokens": 2}}
    async for c in open_client(app):
        for headers in ({}, {"Authorization": "Bearer nope"}):
            r = await c.post("/generate", json=gen, headers=headers)
            assert r.status_code == 401 and r.json()["error_type"] == "unauthorized"
            assert (await c.get("/v1/models", headers=headers)).status_code == 401
        assert (
            await c.post("/generate", json=gen, headers={"Authorization": "Bearer k3y"})
        ).status_code == 200
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/tasks")).status_code == 200


async def test_the_upload_is_described_in_the_openapi_schema_well_enough_to_use(client, lm):
    """A generated client knows the two file parts: an upload built from the schema alone succeeds."""
    schema = (await client.get("/openapi.json")).json()
    put = schema["paths"]["/tasks/{name}"]["put"]
    body = put["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert all(body["properties"][part]["format"] == "binary" for part in body["required"])
    files = adapter_files(lm.hidden_size)
    r = await client.put(
        "/tasks/from-schema", headers=AUTH, files=multipart({part: files[part] for part in body["required"]})
    )
    assert r.status_code == 201 and r.json()["status"] == "created", r.text
    assert {"200", "201", "413", "422"} <= set(put["responses"])


async def test_an_uploaded_contract_is_compiled_and_binds_the_task(client, lm):
    """task.json's output contract is compiled on upload: one that does not compile is a 422 with the
    reason and the store is unchanged; a good one binds every request of the task."""
    files = adapter_files(lm.hidden_size, seed=6)
    before = snapshot(client.store)
    bad = {**files, "task.json": json.dumps({"output": {"regex": "[0-9"}}).encode()}
    r = await client.put("/tasks/contracted", files=multipart(bad), headers=AUTH)
    assert r.status_code == 422 and "task.json" in r.json()["error"] and "regex" in r.json()["error"], r.text
    assert snapshot(client.store) == before
    good = {
        **files,
        "task.json": json.dumps(
            {"output": {"choice": ["yes", "no"]}, "defaults": {"max_new_tokens": 3}}
        ).encode(),
    }
    r = await client.put("/tasks/contracted", files=multipart(good), headers=AUTH)
    assert r.status_code == 201 and r.json()["settings"]["output"] == {"choice": ["yes", "no"]}, r.text
    r = await client.post("/generate", json={"task": "contracted", "inputs": "well?"})
    assert r.status_code == 200 and r.json()["generated_text"] in ("yes", "no")


async def test_task_settings_are_uploaded_validated_and_shown(client, lm):
    """task.json travels with the adapter: validated like it (422 naming the field, store unchanged),
    shown by GET /tasks/{name} and GET /tasks, and its priority class bounds a request's priority."""
    files = adapter_files(lm.hidden_size, seed=5)
    before = snapshot(client.store)
    bad = {**files, "task.json": json.dumps({"weight": 0, "max_queue": 4}).encode()}
    r = await client.put("/tasks/tenant", files=multipart(bad), headers=AUTH)
    assert r.status_code == 422 and "weight" in r.json()["error"] and "greater than 0" in r.json()["error"]
    typo = {**files, "task.json": json.dumps({"wieght": 2}).encode()}
    r = await client.put("/tasks/tenant", files=multipart(typo), headers=AUTH)
    assert r.status_code == 422 and "wieght: unknown field" in r.json()["error"]
    assert snapshot(client.store) == before
    good = {**files, "task.json": json.dumps({"weight": 3, "priority": 2, "min_priority": 1}).encode()}
    r = await client.put("/tasks/tenant", files=multipart(good), headers=AUTH)
    assert r.status_code == 201, r.text
    assert r.json()["settings"] == {
        "weight": 3.0,
        "max_queue": None,
        "max_running": None,
        "priority": 2,
        "min_priority": 1,
        "output": None,
        "defaults": {},
    }
    listed = {t["name"]: t for t in (await client.get("/tasks")).json()["tasks"]}
    assert listed["tenant"]["settings"]["weight"] == 3.0
    ask = {"task": "tenant", "inputs": "hello", "parameters": {"max_new_tokens": 2, "priority": 0}}
    r = await client.post("/generate", json=ask)
    assert r.status_code == 422 and "parameters.priority must be between 1 and 1000" in r.json()["error"]
    r = await client.post(
        "/v1/completions", json={"model": "tenant", "prompt": "hello", "max_tokens": 2, "priority": 0}
    )
    assert r.status_code == 422 and r.json()["error"]["param"] == "priority"
    ask["parameters"]["priority"] = 1
    assert (await client.post("/generate", json=ask)).status_code == 200
    stats = (await client.get("/stats")).json()["tasks"]["tenant"]
    assert stats["admitted"] == 1 and stats["weight"] == 3.0 and stats["output_tokens"] == 2
    metrics = (await client.get("/metrics")).text
    assert 'softmux_task_generated_tokens_total{task="tenant"} 2.0' in metrics
    assert 'softmux_task_weight{task="tenant"} 3.0' in metrics and "_warmup" not in metrics
