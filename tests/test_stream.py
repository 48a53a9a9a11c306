"""POST /generate_stream: TGI's event shape, the last event's result, errors before and during the
stream, and a disconnecting client cancelling its request (through a real uvicorn server)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from server.api.app import create_app
from tests.api_support import live_server, make_store, open_client, settings_for, wait_until


@pytest.fixture(scope="module")
def store(tmp_path_factory, lm) -> Path:
    root = tmp_path_factory.mktemp("store")
    make_store(root, lm.hidden_size)
    return root


@pytest.fixture
async def client(lm, store) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings_for(store), loader=lambda: lm, wait=True)
    async for c in open_client(app):
        yield c


def parse_sse(text: str) -> list[dict]:
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            events.append(json.loads(block[len("data: ") :]))
    return events


async def stream(client: httpx.AsyncClient, payload: dict) -> tuple[httpx.Response, list[dict]]:
    r = await client.post("/generate_stream", json=payload)
    return r, parse_sse(r.text) if r.status_code == 200 else []


async def test_stream_matches_generate_token_by_token(client):
    payload = {"task": "beta", "inputs": "The quick brown fox", "parameters": {"max_new_tokens": 9}}
    whole = (await client.post("/generate", json=payload)).json()
    r, events = await stream(client, payload)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert len(events) == 9
    assert [e["index"] for e in events] == list(range(9))
    for e in events[:-1]:
        assert e["generated_text"] is None and e["details"] is None
        assert set(e["token"]) == {"id", "text", "logprob", "special"} and e["token"]["logprob"] <= 0
    last = events[-1]
    assert last["token"] is not None
    assert last["generated_text"] == whole["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert last["details"]["finish_reason"] == "length" and last["details"]["generated_tokens"] == 9
    assert last["details"]["input_tokens"] == whole["details"]["input_tokens"]


async def test_stream_with_stop_string_ends_on_it(client):
    base = {"task": "alpha", "inputs": "one two three", "parameters": {"max_new_tokens": 12}}
    free_text = (await client.post("/generate", json=base)).json()["generated_text"]
    stop = free_text[3:6]  # some text the greedy continuation is known to contain
    assert stop.strip(), free_text
    payload = {**base, "parameters": {"max_new_tokens": 12, "stop": [stop]}}
    whole = (await client.post("/generate", json=payload)).json()
    r, events = await stream(client, payload)
    assert r.status_code == 200
    last = events[-1]
    assert last["details"]["finish_reason"] == "stop_sequence"
    assert last["generated_text"] == whole["generated_text"]
    assert (
        last["generated_text"] == free_text[: free_text.index(stop)]
    )  # the stop string itself is not returned
    assert all(e["generated_text"] is None for e in events[:-1])
    assert "".join(e["token"]["text"] for e in events) == last["generated_text"]


async def test_stream_sampling_is_reproducible(client):
    """Seed 7 twice: the same events; other seeds: other texts (so the seed is not ignored), and the
    greedy text differs from the sampled ones (sampling did not silently turn greedy)."""
    params = {"max_new_tokens": 6, "do_sample": True, "ignore_eos": True}
    payload = {"task": "gamma", "inputs": "hello", "parameters": {**params, "seed": 7}}
    _, a = await stream(client, payload)
    _, b = await stream(client, payload)
    assert a == b and a[-1]["details"]["seed"] == 7
    texts = set()
    for seed in (1, 2, 3):
        _, events = await stream(client, {**payload, "parameters": {**params, "seed": seed}})
        texts.add(events[-1]["generated_text"])
    _, greedy = await stream(client, {**payload, "parameters": {"max_new_tokens": 6, "ignore_eos": True}})
    assert texts - {a[-1]["generated_text"]} and texts - {greedy[-1]["generated_text"]}


@pytest.mark.parametrize(
    ("payload", "status", "error_type"),
    [
        ({"task": "nope", "inputs": "x"}, 404, "not_found"),
        ({"task": "alpha", "inputs": "x", "parameters": {"top_p": 2}}, 422, "validation"),
        ({"task": "alpha", "inputs": " word" * 100}, 422, "validation"),
        ({"task": "alpha"}, 422, "validation"),
    ],
)
async def test_errors_before_the_stream_are_plain_http_errors(client, payload, status, error_type):
    r = await client.post("/generate_stream", json=payload)
    assert r.status_code == status
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error_type"] == error_type


async def test_queue_full_is_429_before_the_stream(lm, store):
    app = create_app(settings_for(store, max_queue=0), loader=lambda: lm, wait=True)
    async for client in open_client(app):
        r = await client.post("/generate_stream", json={"task": "alpha", "inputs": "x"})
        assert (
            r.status_code == 429
            and r.json()["error_type"] == "overloaded"
            and r.headers["retry-after"] == "1"
        )


async def test_failure_mid_stream_is_an_error_event(lm, store):
    app = create_app(settings_for(store), loader=lambda: lm, wait=True)
    async for client in open_client(app):
        runner = app.state.service.engine.runner
        real_decode, calls = runner.decode, []

        def failing_decode(*args, **kwargs):
            calls.append(1)
            if len(calls) >= 3:
                raise RuntimeError("simulated device fault")
            return real_decode(*args, **kwargs)

        runner.decode = failing_decode
        r, events = await stream(
            client, {"task": "alpha", "inputs": "hello there", "parameters": {"max_new_tokens": 20}}
        )
        assert r.status_code == 200
        assert all("token" in e for e in events[:-1]) and len(events) >= 2
        assert events[-1]["error_type"] == "generation" and "simulated device fault" in events[-1]["error"]
        runner.decode = real_decode
        ok = await client.post(
            "/generate", json={"task": "alpha", "inputs": "again", "parameters": {"max_new_tokens": 3}}
        )
        assert ok.status_code == 200  # the engine loop survived


def test_client_disconnect_cancels_the_request(lm, store):
    """A client that closes the stream frees its row within a step, though it asked for many tokens."""
    app = create_app(settings_for(store, max_new_tokens=1500), loader=lambda: lm, wait=True)
    with live_server(app) as base:
        engine = app.state.service.engine
        real_decode = engine.runner.decode

        def slow_decode(*args, **kwargs):  # 1500 tokens would take ~30 s
            time.sleep(0.02)
            return real_decode(*args, **kwargs)

        engine.runner.decode = slow_decode
        finished_before = engine.stats.requests_finished
        payload = {"task": "beta", "inputs": "a long story", "parameters": {"max_new_tokens": 1500}}
        with httpx.Client(base_url=base, timeout=30) as http:
            with http.stream("POST", "/generate_stream", json=payload) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                got = 0
                for line in lines:
                    if line.startswith("data:"):
                        got += 1
                        if got == 3:
                            break
                assert len(engine.scheduler.running) == 1
                request = engine.scheduler.running[0]
            # leaving the `with` closes the connection
        assert wait_until(lambda: not engine.scheduler.running, timeout=60)
        assert wait_until(lambda: engine.stats.requests_finished == finished_before + 1, timeout=60)
        assert request.cancelled and len(request.output_ids) < 200
        assert engine.scheduler.held_tokens == 0  # its key/value blocks are gone with it
        stats = httpx.get(f"{base}/stats").json()
        assert stats["running"] == 0 and stats["kv_pool"]["row_tokens_held"] == 0
        metrics = httpx.get(f"{base}/metrics").text
        assert 'softmux_request_count_total{outcome="cancelled",task="beta"} 1.0' in metrics
        engine.runner.decode = real_decode
