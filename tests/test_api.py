"""The native HTTP API through the app (httpx over ASGI): success, every error case, batching evidence."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import torch

from server.api.app import create_app
from server.models import LoadedModel
from tests.api_support import TASKS, make_store, open_client, settings_for
from tests.support import reference_greedy


@pytest.fixture(scope="module")
def store(tmp_path_factory, lm) -> tuple[Path, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("store")
    embeddings = make_store(root, lm.hidden_size)  # TASKS plus a folder of the wrong width
    (root / "Bad_Name").mkdir()
    return root, embeddings


@pytest.fixture
async def client(lm, store) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings_for(store[0]), loader=lambda: lm, wait=True)
    async for c in open_client(app):
        yield c


async def test_generate_returns_reference_tokens(client, lm, store):
    text = "The quick brown fox"
    r = await client.post(
        "/generate", json={"task": "beta", "inputs": text, "parameters": {"max_new_tokens": 9}}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    ids = lm.tokenizer(text)["input_ids"]
    expected = reference_greedy(lm, store[1]["beta"].double(), ids, 9)
    assert body["generated_text"] == lm.tokenizer.decode(expected, skip_special_tokens=True)
    assert body["details"] == {
        "finish_reason": "length",
        "generated_tokens": 9,
        "input_tokens": len(ids),
        "virtual_tokens": 5,
        "seed": None,
    }


async def test_sampling_returns_seed_and_is_reproducible(client):
    payload = {
        "task": "alpha",
        "inputs": "hello",
        "parameters": {"max_new_tokens": 8, "do_sample": True, "seed": 42},
    }
    a = (await client.post("/generate", json=payload)).json()
    b = (await client.post("/generate", json=payload)).json()
    assert a == b and a["details"]["seed"] == 42
    drawn = (
        await client.post(
            "/generate", json={**payload, "parameters": {"max_new_tokens": 4, "do_sample": True}}
        )
    ).json()
    assert isinstance(drawn["details"]["seed"], int)


async def test_ignore_eos_generates_max_new_tokens_past_eos(lm, store):
    text = "The quick brown fox"
    ids = lm.tokenizer(text)["input_ids"]
    expected = reference_greedy(lm, store[1]["beta"].double(), ids, 9)
    app = create_app(settings_for(store[0]), loader=lambda: lm, wait=True)
    async for client in open_client(app):
        app.state.service.engine.eos_ids = set(range(lm.model.config.vocab_size))  # every token is an eos
        body = {"task": "beta", "inputs": text, "parameters": {"max_new_tokens": 9}}
        stops = (await client.post("/generate", json=body)).json()
        assert stops["details"]["finish_reason"] == "eos_token" and stops["details"]["generated_tokens"] == 1
        body["parameters"]["ignore_eos"] = True
        r = await client.post("/generate", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["generated_text"] == lm.tokenizer.decode(expected, skip_special_tokens=True)
        assert (
            r.json()["details"]["finish_reason"] == "length" and r.json()["details"]["generated_tokens"] == 9
        )


async def test_tasks_lists_tasks_and_failures(client):
    r = await client.get("/tasks")
    assert r.status_code == 200
    body = r.json()
    assert [(t["name"], t["peft_type"], t["num_virtual_tokens"]) for t in body["tasks"]] == [
        ("alpha", "PROMPT_TUNING", 2),
        ("beta", "PROMPT_TUNING", 5),
        ("gamma", "PROMPT_TUNING", 11),
    ]
    failed = {f["folder"]: f["reason"] for f in body["failed"]}
    assert set(failed) == {"wrong-width", "Bad_Name"}
    assert "hidden" in failed["wrong-width"].lower()


async def test_health(client):
    r = await client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


async def test_unknown_task_is_404_naming_known_tasks(client):
    r = await client.post("/generate", json={"task": "nope", "inputs": "x"})
    assert r.status_code == 404
    body = r.json()
    assert body["error_type"] == "not_found"
    assert "'nope'" in body["error"] and all(name in body["error"] for name in TASKS)


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        ({"top_p": 1.5}, "parameters.top_p"),
        ({"top_p": 0}, "parameters.top_p"),
        ({"temperature": -1}, "parameters.temperature"),
        ({"max_new_tokens": 0}, "parameters.max_new_tokens"),
        ({"max_new_tokens": 65}, "parameters.max_new_tokens"),
        ({"top_k": -3}, "parameters.top_k"),
        ({"repetition_penalty": 0}, "parameters.repetition_penalty"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "parameters.stop"),
        ({"stop": [""]}, "parameters.stop"),
        ({"seed": -1}, "parameters.seed"),
        ({"best_of": 3}, "best_of"),
        ({"ignore_eos": "maybe"}, "parameters.ignore_eos"),
        ({"frequency_penalty": 2.5}, "parameters.frequency_penalty"),
        ({"top_n_tokens": 6}, "parameters.top_n_tokens"),
        ({"priority": 5000}, "parameters.priority"),
        ({"unknown_knob": 1}, "parameters.unknown_knob"),
    ],
)
async def test_invalid_parameters_are_422_naming_the_field(client, parameters, field):
    r = await client.post("/generate", json={"task": "alpha", "inputs": "x", "parameters": parameters})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error_type"] == "validation" and field in body["error"]


async def test_nan_is_rejected(client):
    raw = '{"task": "alpha", "inputs": "x", "parameters": {"temperature": NaN}}'
    r = await client.post("/generate", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "temperature" in r.json()["error"]


@pytest.mark.parametrize(
    "body", [b"{not json", b'{"inputs": "x"}', b'{"task": "alpha", "inputs": ""}', b"[]"]
)
async def test_malformed_bodies_are_422(client, body):
    r = await client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"


async def test_input_too_long_is_422_with_the_numbers(client):
    r = await client.post("/generate", json={"task": "alpha", "inputs": " word" * 100})
    assert r.status_code == 422
    assert "at most 64" in r.json()["error"] and "100" in r.json()["error"]


async def test_request_larger_than_batch_budget_is_422(lm, store):
    app = create_app(settings_for(store[0], max_batch_tokens=20), loader=lambda: lm, wait=True)
    async for client in open_client(app):
        r = await client.post(
            "/generate", json={"task": "gamma", "inputs": "a b c", "parameters": {"max_new_tokens": 10}}
        )
        assert r.status_code == 422 and "max_batch_tokens" in r.json()["error"]


async def test_queue_full_is_429(lm, store):
    app = create_app(settings_for(store[0], max_queue=0), loader=lambda: lm, wait=True)
    async for client in open_client(app):
        r = await client.post("/generate", json={"task": "alpha", "inputs": "x"})
        assert r.status_code == 429 and r.json()["error_type"] == "overloaded"
        assert r.headers["retry-after"] == "1"


async def test_not_loaded_yet_is_503_then_serves(lm, store):
    release = threading.Event()

    def slow_loader() -> LoadedModel:
        release.wait(30)
        return lm

    app = create_app(settings_for(store[0]), loader=slow_loader)
    async for client in open_client(app):
        r = await client.post("/generate", json={"task": "alpha", "inputs": "x"})
        assert r.status_code == 503 and r.json()["error_type"] == "unhealthy"
        assert (await client.get("/health")).json()["ready"] is False
        release.set()
        service = app.state.service
        await asyncio.to_thread(service.ready.wait, 30)
        r = await client.post(
            "/generate", json={"task": "alpha", "inputs": "x", "parameters": {"max_new_tokens": 2}}
        )
        assert r.status_code == 200


async def test_failed_load_is_503_on_health(store):
    def broken() -> LoadedModel:
        raise OSError("no such model folder")

    app = create_app(settings_for(store[0]), loader=broken, wait=True)
    async for client in open_client(app):
        r = await client.get("/health")
        assert r.status_code == 503 and "no such model" in r.json()["error"]
        r = await client.post("/generate", json={"task": "alpha", "inputs": "x"})
        assert r.status_code == 503


async def test_concurrent_requests_over_three_tasks_share_forward_passes(client, lm, store):
    texts = [f"request number {i} " + "filler " * (i % 5) for i in range(16)]
    names = list(TASKS)
    payloads = [
        {"task": names[i % 3], "inputs": t, "parameters": {"max_new_tokens": 6 + i % 4}}
        for i, t in enumerate(texts)
    ]
    responses = await asyncio.gather(*(client.post("/generate", json=p) for p in payloads))
    assert [r.status_code for r in responses] == [200] * 16
    for p, r in zip(payloads, responses):
        ids = lm.tokenizer(p["inputs"])["input_ids"]
        expected = reference_greedy(lm, store[1][p["task"]].double(), ids, p["parameters"]["max_new_tokens"])
        assert r.json()["generated_text"] == lm.tokenizer.decode(expected, skip_special_tokens=True)
    stats = (await client.get("/stats")).json()
    assert stats["mixed_task_passes"] > 0 and stats["max_tasks_in_pass"] == 3
    assert stats["running"] == 0 and stats["kv_pool"]["row_tokens_held"] == 0


async def test_top_n_tokens_gives_tgis_token_details_in_answers_and_streams(client):
    payload = {
        "task": "beta",
        "inputs": "The quick brown fox",
        "parameters": {"max_new_tokens": 5, "top_n_tokens": 2},
    }
    r = await client.post("/generate", json=payload)
    assert r.status_code == 200, r.text
    details = r.json()["details"]
    assert len(details["tokens"]) == len(details["top_tokens"]) == details["generated_tokens"] == 5
    for token, top in zip(details["tokens"], details["top_tokens"]):
        assert len(top) == 2 and top[0]["logprob"] >= top[1]["logprob"]
        assert token == top[0]  # greedy: the chosen token is the most likely, with the same figures
        assert set(token) == {"id", "text", "logprob", "special"}
    async with client.stream("POST", "/generate_stream", json=payload) as s:
        events = [json.loads(line[5:]) async for line in s.aiter_lines() if line.startswith("data:")]
    assert [e["top_tokens"] for e in events] == details["top_tokens"]
    plain = (await client.post("/generate", json={**payload, "parameters": {"max_new_tokens": 5}})).json()
    assert "tokens" not in plain["details"] and plain["generated_text"] == r.json()["generated_text"]
