"""Bad input: oversized, malformed and out-of-range requests get 4xx with a reason, never 5xx;
CORS is off; and a short schemathesis run over every route (the long one is `make fuzz`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from server.api.app import create_app
from server.models import LoadedModel, load_model
from tests.api_support import make_store, open_client, settings_for


@pytest.fixture(scope="module")
def lm(tiny_model_dir: Path) -> LoadedModel:
    return load_model(str(tiny_model_dir), dtype="float32")


@pytest.fixture
async def client(lm, tmp_path):
    make_store(tmp_path / "store", lm.hidden_size)
    app = create_app(
        settings_for(tmp_path / "store", reload_interval=0, max_body_bytes=4096), loader=lambda: lm, wait=True
    )
    async for c in open_client(app):
        yield c


JSON = {"content-type": "application/json"}


async def test_bodies_over_the_limit_are_413_in_each_routes_error_shape(client):
    big = {"task": "alpha", "inputs": "x" * 5000}
    r = await client.post("/generate", json=big)
    assert r.status_code == 413 and r.json()["error_type"] == "too_large" and "4096" in r.json()["error"]
    r = await client.post("/v1/completions", json={"model": "alpha", "prompt": "x" * 5000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    async def chunked():  # no Content-Length: counted while read
        for _ in range(10):
            yield b"x" * 1000

    r = await client.post("/generate", content=chunked(), headers=JSON)
    assert r.status_code == 413

    async def small():
        yield b'{"task": "alpha", "inputs": "hi",'
        yield b' "parameters": {"max_new_tokens": 2}}'

    r = await client.post("/generate", content=small(), headers=JSON)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "body, words",
    [
        (b'{"task": "alpha", "inputs": ', "JSON"),  # truncated JSON
        (b"not json at all", "JSON"),
        (b"[]", "body"),
        (
            b'{"task": "alpha", "inputs": "x", "parameters": {"max_new_tokens": 99999999999999999999999}}',
            "max_new_tokens",
        ),
        (b'{"task": "alpha", "inputs": "x", "parameters": {"max_new_tokens": 100000}}', "max_new_tokens"),
        (b'{"task": "alpha", "inputs": "x", "parameters": {"max_new_tokens": -1}}', "max_new_tokens"),
        (b'{"task": "alpha", "inputs": "x", "parameters": {"temperature": NaN}}', "temperature"),
        (b'{"task": "alpha", "inputs": "x", "parameters": {"temperature": -1}}', "temperature"),
        (b'{"task": "alpha", "inputs": "x", "parameters": {"top_p": Infinity}}', "top_p"),
        (b'{"task": "alpha", "inputs": "x", "parameters": {"top_k": 99999999999999999999}}', "top_k"),
        (b'{"task": "alpha", "inputs": "x", "parameters": {"seed": -5}}', "seed"),
        (b'{"task": "alpha", "inputs": "x", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}', "stop"),
        (b'{"task": "alpha", "inputs": "x", "parameters": {"stop": [""]}}', "stop"),
        (b'{"task": "alpha", "inputs": "x", "colour": "blue"}', "colour"),  # unknown fields: 422 naming them
        (b'{"task": "alpha", "inputs": "x", "parameters": {"max_tokens": 3}}', "max_tokens"),
        (b'{"task": "alpha", "inputs": ""}', "inputs"),
        (b'{"task": "", "inputs": "x"}', "task"),
        (
            b'{"task": "alpha", "inputs": "' + b"hello " * 300 + b'"}',
            "at most 64",
        ),  # tokenises past max_input_tokens
    ],
)
@pytest.mark.parametrize("path", ["/generate", "/generate_stream"])
async def test_bad_native_bodies_are_422_with_a_reason(client, path, body, words):
    r = await client.post(path, content=body, headers=JSON)
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation" and words in r.json()["error"], r.text


@pytest.mark.parametrize(
    "body, words",
    [
        (b'{"model": "alpha", "prompt": "x", "max_tokens": 100000}', "max_tokens"),
        (b'{"model": "alpha", "prompt": "x", "temperature": NaN}', "temperature"),
        (b'{"model": "alpha", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', "stop"),
        (b'{"model": "alpha", "prompt": "x", "colour": "blue"}', "colour"),
        (b'{"model": "alpha", "prompt": ""}', "prompt"),
        (b'{"model": "alpha", "messages": []}', "messages"),
    ],
)
async def test_bad_openai_bodies_are_4xx_with_a_reason(client, body, words):
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    r = await client.post(path, content=body, headers=JSON)
    assert r.status_code == 422, r.text
    assert words in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("path", ["/generate", "/v1/completions"])
async def test_invalid_utf8_is_400_with_a_reason(client, path):
    r = await client.post(
        path, content=b'{"task": "alpha", "model": "alpha", "inputs": "\xff\xfe"}', headers=JSON
    )
    assert r.status_code == 400 and "parsing the body" in r.text, r.text


async def test_cors_is_off_by_default(client):
    r = await client.options(
        "/generate", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert r.status_code in (404, 405)
    for path in ("/health", "/info"):
        r = await client.get(path, headers={"Origin": "https://evil.example"})
        assert not any(h.lower().startswith("access-control-") for h in r.headers), r.headers


def test_schemathesis_short_run_finds_no_5xx_and_no_hang(tiny_model_dir):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from fuzz import run_fuzz

    result = run_fuzz(15, request_timeout=10, model_dir=tiny_model_dir, extra=["--phases", "fuzzing"])
    assert result.returncode == 0, result.output[-5000:]
    assert result.operations >= 15 and result.cases >= 100, result.output[-3000:]
