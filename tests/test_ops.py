"""Operations: /metrics (Prometheus), /health, /ready, /info, X-Request-ID and JSON logs,
and configuration (every Settings field a documented flag and a SOFTMUX_* env var)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import server
from server.api.app import create_app
from server.api.logs import make_handler
from server.cli import build_parser
from server.config import Settings, from_namespace
from server.models import LoadedModel
from tests.api_support import TASKS, make_store, open_client, settings_for


@pytest.fixture(scope="module")
def store(tmp_path_factory, lm) -> Path:
    root = tmp_path_factory.mktemp("store")
    make_store(root, lm.hidden_size)  # with one broken folder: a prompt load failure
    return root


@pytest.fixture
async def app_client(lm, store) -> AsyncIterator[tuple[object, httpx.AsyncClient]]:
    app = create_app(settings_for(store), loader=lambda: lm, wait=True)
    async for c in open_client(app):
        yield app, c


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


# ---- metrics ---------------------------------------------------------------------------------------
async def test_metrics_count_requests_passes_and_failures(app_client):
    app, client = app_client
    payloads = [
        {"task": name, "inputs": f"text {i}", "parameters": {"max_new_tokens": 4}}
        for i, name in enumerate(list(TASKS) * 2)
    ]
    rs = await asyncio.gather(*(client.post("/generate", json=p) for p in payloads))
    assert all(r.status_code == 200 for r in rs)
    r = await client.post(
        "/generate_stream", json={"task": "alpha", "inputs": "x", "parameters": {"max_new_tokens": 3}}
    )
    assert r.status_code == 200
    assert (await client.post("/generate", json={"task": "nope", "inputs": "x"})).status_code == 404
    assert (await client.post("/generate", json={"task": "alpha", "inputs": " w" * 100})).status_code == 422

    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = samples(r.text)
    assert value(m, "softmux_request_count_total", task="alpha", outcome="length") == 3
    assert value(m, "softmux_request_count_total", task="beta", outcome="length") == 2
    assert value(m, "softmux_request_count_total", task="_unknown", outcome="not_found") == 1
    assert value(m, "softmux_request_count_total", task="alpha", outcome="validation") == 1
    for name in (
        "softmux_request_duration_seconds",
        "softmux_request_queue_duration_seconds",
        "softmux_request_time_to_first_token_seconds",
        "softmux_request_time_per_output_token_seconds",
        "softmux_request_input_length",
        "softmux_request_generated_tokens",
    ):
        assert value(m, name + "_count", task="alpha", outcome="length") == 3, name
    assert value(m, "softmux_request_generated_tokens_sum", task="alpha", outcome="length") == 4 + 4 + 3
    assert value(m, "softmux_batch_forward_duration_seconds_count", phase="prefill") >= 1
    assert value(m, "softmux_batch_forward_duration_seconds_count", phase="decode") >= 3
    stats = (await client.get("/stats")).json()
    assert value(m, "softmux_batch_forward_size_sum", phase="decode") == stats["rows_decoded"]
    assert value(m, "softmux_batch_tasks_per_forward_count", phase="prefill") == stats["prefill_passes"]
    assert value(m, "softmux_prompt_load_failures") == 1
    assert value(m, "softmux_tasks") == 3
    assert value(m, "softmux_queue_size") == 0 and value(m, "softmux_batch_current_size") == 0
    pool = stats["kv_pool"]
    assert value(m, "softmux_kv_cache_blocks_total") == pool["blocks"]
    # the pool's committed memory: blocks ever used, bounded, and the limit is what the pool holds
    assert 0 < value(m, "softmux_kv_cache_blocks_touched") == pool["touched"] <= pool["blocks"]
    assert pool["bytes_committed"] == (pool["touched"] + 1) * pool["block_size"] * pool["bytes_per_token"]
    assert pool["bytes_limit"] == (pool["blocks"] + 1) * pool["block_size"] * pool["bytes_per_token"]
    # a mixed pass went through: some prefill or decode held more than one task
    mixed = sum(
        v
        for (n, labels), v in m.items()
        if n == "softmux_batch_tasks_per_forward_bucket" and dict(labels)["le"] == "1.0"
    )
    total = sum(v for (n, _), v in m.items() if n == "softmux_batch_tasks_per_forward_count")
    assert stats["mixed_task_passes"] > 0 and mixed < total


async def test_failed_requests_are_counted_as_errors(app_client):
    app, client = app_client
    runner = app.state.service.engine.runner
    real = runner.decode
    runner.decode = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("simulated fault"))
    r = await client.post(
        "/generate", json={"task": "gamma", "inputs": "x", "parameters": {"max_new_tokens": 5}}
    )
    runner.decode = real
    assert r.status_code == 424
    m = samples((await client.get("/metrics")).text)
    assert value(m, "softmux_request_count_total", task="gamma", outcome="error") == 1


async def test_queue_and_running_gauges_are_live(lm, store):
    app = create_app(settings_for(store), loader=lambda: lm, wait=True)
    async for client in open_client(app):
        engine = app.state.service.engine
        gate = threading.Event()
        real = engine.runner.decode

        def held_decode(*a, **k):
            gate.wait(10)
            return real(*a, **k)

        engine.runner.decode = held_decode
        task = asyncio.create_task(
            client.post(
                "/generate", json={"task": "alpha", "inputs": "x", "parameters": {"max_new_tokens": 3}}
            )
        )
        for _ in range(200):
            if engine.scheduler.running:
                break
            await asyncio.sleep(0.01)
        m = samples((await client.get("/metrics")).text)
        gate.set()
        engine.runner.decode = real
        assert (await task).status_code == 200
        assert value(m, "softmux_batch_current_size") == 1


async def test_each_app_has_its_own_registry(lm, store):
    a = create_app(settings_for(store), loader=lambda: lm, wait=True)
    b = create_app(settings_for(store), loader=lambda: lm, wait=True)
    async with contextlib.AsyncExitStack() as stack:
        ca = await stack.enter_async_context(contextlib.aclosing(open_client(a)))
        client_a = await ca.__anext__()
        cb = await stack.enter_async_context(contextlib.aclosing(open_client(b)))
        client_b = await cb.__anext__()
        assert (
            await client_a.post(
                "/generate", json={"task": "alpha", "inputs": "x", "parameters": {"max_new_tokens": 2}}
            )
        ).status_code == 200
        ma = samples((await client_a.get("/metrics")).text)
        mb = samples((await client_b.get("/metrics")).text)
        assert value(ma, "softmux_request_count_total", task="alpha", outcome="length") == 1
        assert value(mb, "softmux_request_count_total", task="alpha", outcome="length") == 0


# ---- health, readiness, info ---------------------------------------------------------------------
async def test_ready_is_503_until_loaded_and_health_stays_up(lm, store):
    release = threading.Event()

    def slow_loader() -> LoadedModel:
        release.wait(30)
        return lm

    app = create_app(settings_for(store), loader=slow_loader)
    async for client in open_client(app):
        r = await client.get("/ready")
        assert (
            r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error_type"] == "unhealthy"
        )
        assert (await client.get("/health")).status_code == 200
        info = (await client.get("/info")).json()
        assert info["ready"] is False and info["model"] == "default"
        assert (await client.get("/metrics")).status_code == 200  # scrapable while loading
        release.set()
        await asyncio.to_thread(app.state.service.ready.wait, 30)
        r = await client.get("/ready")
        assert r.status_code == 200 and r.json()["status"] == "ready"


async def test_dead_engine_fails_health_and_ready(app_client):
    app, client = app_client
    engine = app.state.service.engine
    engine.error = RuntimeError("engine loop died: simulated")
    try:
        r = await client.get("/health")
        assert r.status_code == 503 and "simulated" in r.json()["error"]
        assert (await client.get("/ready")).status_code == 503
        assert (await client.post("/generate", json={"task": "alpha", "inputs": "x"})).status_code == 503
    finally:
        engine.error = None


async def test_info_reports_model_and_limits(app_client, lm):
    _, client = app_client
    info = (await client.get("/info")).json()
    assert info["version"] == server.__version__
    assert info["model"] == lm.name and info["dtype"] == "float64" and info["device"] == "cpu"
    assert info["ready"] is True and info["tasks"] == 3
    assert info["limits"]["max_input_tokens"] == 64 and info["limits"]["max_batch_tokens"] == 4096
    assert info["limits"]["context_length"] == 2048


# ---- request ids and logs ------------------------------------------------------------------------
@contextlib.contextmanager
def captured_json_logs():
    stream = io.StringIO()
    handler = make_handler("json", stream)
    logger = logging.getLogger("softmux")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


async def test_request_id_in_and_out_and_in_the_logs(app_client):
    _, client = app_client
    with captured_json_logs() as stream:
        r = await client.post(
            "/generate",
            json={"task": "alpha", "inputs": "x", "parameters": {"max_new_tokens": 2}},
            headers={"X-Request-ID": "abc-123"},
        )
        assert r.headers["x-request-id"] == "abc-123"
        generated = (await client.get("/health")).headers["x-request-id"]
        assert len(generated) == 32 and int(generated, 16) >= 0
        bad = (await client.get("/health", headers={"X-Request-ID": "has spaces " * 20})).headers[
            "x-request-id"
        ]
        assert " " not in bad and len(bad) == 32
        r404 = await client.post(
            "/generate", json={"task": "nope", "inputs": "x"}, headers={"X-Request-ID": "e-1"}
        )
        assert r404.headers["x-request-id"] == "e-1"
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    mine = [line for line in lines if line["request_id"] == "abc-123"]
    assert any(
        line["logger"] == "softmux.access" and line["path"] == "/generate" and line["status"] == 200
        for line in mine
    )
    assert any(line["logger"] == "softmux.service" and "ended" in line["message"] for line in mine)
    assert all({"time", "level", "logger", "message", "request_id"} <= set(line) for line in lines)


def test_text_log_format_shows_the_request_id():
    stream = io.StringIO()
    handler = make_handler("text", stream)
    record = logging.LogRecord("softmux.test", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    handler.handle(record)
    assert "hello world" in stream.getvalue() and "[None]" in stream.getvalue()


# ---- configuration -------------------------------------------------------------------------------
def serve_help(capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_serve_help_documents_every_setting(capsys):
    text = serve_help(capsys)
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        env = "SOFTMUX_" + f.name.upper()
        assert flag in text, flag
        assert env in text, env
        assert f.metadata.get("help"), f"{f.name} has no help text"
    assert "--log-format" in text and "json" in text


# Realistic values for the free-text settings; any other str setting gets a generic one. A setting of a type
# with no rule below fails the test until the rule is added, so no setting goes unchecked.
_FREE_TEXT = {"model": "/models/x", "device": "cpu", "dtype": "float32", "host": "0.0.0.0"}


def _non_default(f: dataclasses.Field, default: object) -> tuple[str, object]:
    """An env value for setting `f` (default `default`) that is valid and not its default,
    and its parsed value."""
    choices = f.metadata.get("choices")
    if choices is not None:
        other = next(c for c in choices if c != default)
        return str(other), other
    if isinstance(default, bool):  # before int: bool is an int
        return str(not default).lower(), not default
    if isinstance(default, int):
        return str(default + 7), default + 7
    if isinstance(default, float):
        return str(default + 1.5), default + 1.5
    if isinstance(default, Path):
        path = Path(f"/srv/softmux-env-test/{f.name}")
        return str(path), path
    if isinstance(default, str):
        text = _FREE_TEXT.get(f.name, f"env-test-{f.name}")
        return text, text
    raise AssertionError(
        f"no test value for setting {f.name} of type {type(default).__name__}: add a rule to _non_default"
    )


def test_every_setting_reads_its_env_var(monkeypatch):
    defaults = Settings()
    expected = {}
    for f in dataclasses.fields(Settings):
        raw, value = _non_default(f, getattr(defaults, f.name))
        assert value != getattr(defaults, f.name), (
            f.name
        )  # else the check below could not tell the env var was read
        monkeypatch.setenv("SOFTMUX_" + f.name.upper(), raw)
        expected[f.name] = value
    settings = from_namespace(build_parser().parse_args(["serve"]))
    assert {name: getattr(settings, name) for name in expected} == expected
    assert all(type(getattr(settings, name)) is type(value) for name, value in expected.items())
    # a flag beats the env var
    assert from_namespace(build_parser().parse_args(["serve", "--port", "8001"])).port == 8001


@pytest.mark.parametrize(
    ("name", "raw"),
    [("SOFTMUX_PORT", "eighty"), ("SOFTMUX_LOG_FORMAT", "xml"), ("SOFTMUX_PREFIX_CACHE", "maybe")],
)
def test_bad_env_values_are_a_clear_usage_error(monkeypatch, capsys, name, raw):
    monkeypatch.setenv(name, raw)
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve"])
    assert info.value.code == 2 and name in capsys.readouterr().err


def test_settings_refuse_unknown_choices():
    with pytest.raises(ValueError, match="log_format"):
        Settings(log_format="xml")
