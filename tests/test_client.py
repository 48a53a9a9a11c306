"""server/client.py: typed results, streams, errors and retries, sync (real uvicorn) and async (ASGI);
retry timing against a mock transport."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.api.app import create_app
from server.client import AsyncClient, Client, Details, Generation, SoftmuxError, Token
from tests.api_support import TASKS, live_server, make_store, settings_for, wait_until


@pytest.fixture(scope="module")
def store(tmp_path_factory, lm) -> Path:
    root = tmp_path_factory.mktemp("store")
    make_store(root, lm.hidden_size)
    return root


@pytest.fixture(scope="module")
def base_url(lm, store) -> Iterator[str]:
    with live_server(create_app(settings_for(store), loader=lambda: lm, wait=True)) as base:
        yield base


def test_sync_generate_stream_and_tasks(base_url):
    with Client(base_url) as c:
        result = c.generate("beta", "The quick brown fox", max_new_tokens=6, request_id="client-test-1")
        assert isinstance(result, Generation) and isinstance(result.details, Details)
        assert result.details.finish_reason == "length" and result.details.generated_tokens == 6
        tokens = list(c.generate_stream("beta", "The quick brown fox", max_new_tokens=6))
        assert all(isinstance(t, Token) for t in tokens) and len(tokens) == 6
        assert "".join(t.text for t in tokens) == tokens[-1].generated_text == result.generated_text
        assert tokens[-1].details == result.details and tokens[0].details is None
        tasks = c.tasks()
        assert tasks.names == sorted(TASKS) and "wrong-width" in tasks.failed
        assert c.health()["status"] == "ok" and c.info()["limits"]["max_new_tokens"] == 64


def test_sync_errors_carry_status_and_type(base_url):
    with Client(base_url) as c:
        with pytest.raises(SoftmuxError) as info:
            c.generate("nope", "x")
        assert (info.value.status, info.value.error_type) == (
            404,
            "not_found",
        ) and "'nope'" in info.value.message
        assert info.value.request_id
        with pytest.raises(SoftmuxError) as info:
            list(c.generate_stream("alpha", "x", top_p=5))
        assert (info.value.status, info.value.error_type) == (422, "validation")


def test_sync_stream_closed_early_frees_the_row(lm, store):
    app = create_app(settings_for(store, max_new_tokens=1000), loader=lambda: lm, wait=True)
    with live_server(app) as base, Client(base) as c:
        engine = app.state.service.engine
        real = engine.runner.decode
        engine.runner.decode = lambda *a, **k: (time.sleep(0.02), real(*a, **k))[1]
        stream = c.generate_stream("alpha", "go on", max_new_tokens=1000)
        next(stream), next(stream)
        (request,) = engine.scheduler.running
        stream.close()
        assert wait_until(lambda: not engine.scheduler.running, timeout=60)
        assert request.cancelled and len(request.output_ids) < 1000  # freed, not run to its end
        engine.runner.decode = real


async def test_async_client_over_asgi(lm, store):
    app = create_app(settings_for(store), loader=lambda: lm, wait=True)
    async with app.router.lifespan_context(app):
        async with AsyncClient("http://test", transport=httpx.ASGITransport(app=app)) as c:
            result = await c.generate("gamma", "hello", max_new_tokens=5, do_sample=True, seed=3)
            assert result.details.seed == 3 and result.details.generated_tokens == 5
            tokens = [
                t async for t in c.generate_stream("gamma", "hello", max_new_tokens=5, do_sample=True, seed=3)
            ]
            assert tokens[-1].generated_text == result.generated_text
            assert (await c.tasks()).names == sorted(TASKS)
            with pytest.raises(SoftmuxError) as info:
                await c.generate("alpha", "x", max_new_tokens=0)
            assert info.value.error_type == "validation" and info.value.status == 422


# ---- retries against a scripted server ------------------------------------------------------------
OK = {
    "generated_text": "hi",
    "details": {
        "finish_reason": "length",
        "generated_tokens": 1,
        "input_tokens": 1,
        "virtual_tokens": 2,
        "seed": None,
    },
}


def scripted(responses: list[httpx.Response]) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return responses[min(len(seen) - 1, len(responses) - 1)]

    return httpx.MockTransport(handler), seen


def busy(status: int = 429, retry_after: str | None = "1") -> httpx.Response:
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    error_type = "overloaded" if status == 429 else "unhealthy"
    return httpx.Response(status, json={"error": "busy", "error_type": error_type}, headers=headers)


def test_retries_on_429_and_503_honouring_retry_after():
    transport, seen = scripted([busy(429, "2"), busy(503, "0.25"), httpx.Response(200, json=OK)])
    sleeps: list[float] = []
    with Client("http://x", transport=transport, sleep=sleeps.append) as c:
        assert c.generate("alpha", "x").generated_text == "hi"
    assert len(seen) == 3 and sleeps == [2.0, 0.25]


def test_backoff_is_exponential_and_capped_without_retry_after():
    transport, seen = scripted([busy(503, None)] * 6)
    sleeps: list[float] = []
    with Client(
        "http://x", transport=transport, retries=5, backoff=1.0, max_backoff=4.0, sleep=sleeps.append
    ) as c:
        with pytest.raises(SoftmuxError) as info:
            c.generate("alpha", "x")
    assert info.value.status == 503 and info.value.error_type == "unhealthy"
    assert len(seen) == 6 and len(sleeps) == 5
    for attempt, s in enumerate(sleeps):
        full = min(2.0**attempt, 4.0)
        assert full / 2 <= s <= full


def test_retry_after_as_http_date():
    when = email.utils.formatdate(time.time() + 3, usegmt=True)
    transport, _ = scripted([busy(429, when), httpx.Response(200, json=OK)])
    sleeps: list[float] = []
    with Client("http://x", transport=transport, sleep=sleeps.append) as c:
        c.generate("alpha", "x")
    assert 1.0 <= sleeps[0] <= 3.0


def test_retries_can_be_turned_off_and_other_errors_are_not_retried():
    transport, seen = scripted([busy(429)])
    with Client("http://x", transport=transport, retries=0, sleep=lambda s: pytest.fail("slept")) as c:
        with pytest.raises(SoftmuxError) as info:
            c.generate("alpha", "x")
    assert info.value.status == 429 and len(seen) == 1
    transport, seen = scripted([httpx.Response(422, json={"error": "bad", "error_type": "validation"})])
    with Client("http://x", transport=transport, sleep=lambda s: pytest.fail("slept")) as c:
        with pytest.raises(SoftmuxError):
            c.generate("alpha", "x")
    assert len(seen) == 1


async def test_async_retries_then_succeeds():
    seen: list[httpx.Request] = []
    responses = [busy(503, "0"), httpx.Response(200, json=OK)]

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return responses[len(seen) - 1]

    sleeps: list[float] = []

    async def fake_sleep(s: float) -> None:
        sleeps.append(s)

    async with AsyncClient("http://x", transport=httpx.MockTransport(handler), sleep=fake_sleep) as c:
        assert (await c.generate("alpha", "x")).details.virtual_tokens == 2
    assert len(seen) == 2 and sleeps == [0.0]


def test_error_event_inside_a_stream_raises():
    body = (
        'data: {"index": 0, "token": {"id": 5, "text": "a", "logprob": -0.1, "special": false}, '
        '"generated_text": null, "details": null}\n\n'
        'data: {"error": "device fault", "error_type": "generation"}\n\n'
    )
    transport, _ = scripted([httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})])
    with Client("http://x", transport=transport) as c:
        stream = c.generate_stream("alpha", "x")
        assert next(stream).text == "a"
        with pytest.raises(SoftmuxError) as info:
            next(stream)
    assert (info.value.status, info.value.error_type) == (424, "generation")
