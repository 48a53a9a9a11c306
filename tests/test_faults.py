"""Faults: clients leaving, deadlines, a poisoned prompt, a dead engine loop, a broken store, SIGTERM."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save

from server.api import admin
from server.api.app import create_app
from server.models import LoadedModel, load_model
from tests.api_support import TASKS, free_port, live_server, make_store, open_client, settings_for, wait_until

TOKEN = "fault-token"


@pytest.fixture(scope="module")
def lm(tiny_model_dir: Path) -> LoadedModel:
    return load_model(str(tiny_model_dir), dtype="float32")


@pytest.fixture
def store(tmp_path: Path, lm: LoadedModel) -> Path:
    root = tmp_path / "store"
    make_store(root, lm.hidden_size, broken=False)
    return root


def make_app(lm: LoadedModel, store: Path, **changes):
    changes = {"reload_interval": 0, "admin_token": TOKEN, **changes}
    return create_app(settings_for(store, **changes), loader=lambda: lm, wait=True)


def slow_down(engine, seconds: float = 0.03) -> None:
    """Every decode step takes `seconds` longer, and EOS never ends a row: requests last long enough
    to be interrupted."""
    real = engine.runner.decode

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    engine.runner.decode = slow
    engine.eos_ids = set()


def outcome_count(metrics: str, task: str, outcome: str) -> float:
    key = f'softmux_request_count_total{{outcome="{outcome}",task="{task}"}} '
    return sum(float(line[len(key) :]) for line in metrics.splitlines() if line.startswith(key))


def generated_tokens(metrics: str, task: str, outcome: str) -> float:
    key = f'softmux_request_generated_tokens_sum{{outcome="{outcome}",task="{task}"}} '
    return sum(float(line[len(key) :]) for line in metrics.splitlines() if line.startswith(key))


def gen(task: str, inputs: str, **parameters) -> dict:
    return {"task": task, "inputs": inputs, "parameters": parameters}


# ---- clients that leave ----------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_a_client_leaving_frees_its_row_and_others_are_unaffected(lm, store, stream):
    app = make_app(lm, store)
    with live_server(app) as base:
        engine = app.state.service.engine
        with httpx.Client(base_url=base, timeout=30) as http:
            reference = http.post(
                "/generate", json=gen("beta", "the other request", max_new_tokens=12)
            ).json()
        slow_down(engine, 0.05)  # 64 tokens: ~3 s
        long = gen("alpha", "a long story", max_new_tokens=64)
        other: dict = {}

        def bystander() -> None:
            wait_until(lambda: bool(engine.scheduler.running), timeout=30)  # the long request runs first
            with httpx.Client(base_url=base, timeout=30) as http:
                other["r"] = http.post("/generate", json=gen("beta", "the other request", max_new_tokens=12))

        t = threading.Thread(target=bystander)
        t.start()
        with httpx.Client(base_url=base, timeout=30) as http:
            if stream:
                with http.stream("POST", "/generate_stream", json=long) as r:
                    assert r.status_code == 200
                    events = 0
                    for line in r.iter_lines():
                        events += line.startswith("data:")
                        if events == 3:
                            break
            else:
                with pytest.raises(httpx.ReadTimeout):  # the client gives up: its connection closes
                    http.post("/generate", json=long, timeout=httpx.Timeout(30, read=0.6))
        t.join(60)
        assert other["r"].status_code == 200 and other["r"].json() == reference
        assert wait_until(lambda: not engine.scheduler.running, timeout=60)
        stats = httpx.get(f"{base}/stats").json()
        assert stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_pool"]["row_tokens_held"] == 0
        assert engine.scheduler.held_tokens == 0
        metrics = httpx.get(f"{base}/metrics").text
        assert outcome_count(metrics, "alpha", "cancelled") == 1
        assert (
            0 < generated_tokens(metrics, "alpha", "cancelled") < 64
        )  # freed before its 64 tokens were done


# ---- deadlines ----------------------------------------------------------------------------------
async def test_a_deadline_ends_the_request_with_finish_reason_timeout_and_the_text_so_far(lm, store):
    app = make_app(lm, store)
    async for client in open_client(app):
        engine = app.state.service.engine
        slow_down(engine)  # 64 tokens take >= 1.9 s, far past the 0.3 s deadline
        r = await client.post("/generate", json=gen("alpha", "tick tock", max_new_tokens=64, timeout=0.3))
        assert r.status_code == 200, r.text
        details = r.json()["details"]
        assert details["finish_reason"] == "timeout" and 0 < details["generated_tokens"] < 64
        assert not engine.scheduler.running and engine.scheduler.held_tokens == 0

        async with client.stream(
            "POST", "/generate_stream", json=gen("beta", "tick", max_new_tokens=64, timeout=0.3)
        ) as s:
            events = [json.loads(line[5:]) async for line in s.aiter_lines() if line.startswith("data:")]
        assert events[-1]["details"]["finish_reason"] == "timeout"
        assert events[-1]["generated_text"] == "".join(e["token"]["text"] for e in events if e["token"])


async def test_a_queued_request_times_out_too_and_the_server_default_applies(lm, store):
    app = make_app(lm, store, max_batch_size=1, request_timeout=0.4)
    async for client in open_client(app):
        engine = app.state.service.engine
        slow_down(engine)
        # The server default (0.4 s) is also the ceiling: asking for 30 s still ends at 0.4 s.
        first = asyncio.create_task(
            client.post("/generate", json=gen("alpha", "hog", max_new_tokens=64, timeout=30))
        )
        for _ in range(3000):  # until it holds the only row (a bound of 30 s, not a budget)
            if engine.scheduler.running:
                break
            await asyncio.sleep(0.01)
        assert engine.scheduler.running
        queued = await client.post("/generate", json=gen("beta", "waiting", max_new_tokens=8, timeout=0.1))
        assert queued.status_code == 200
        assert queued.json()["details"]["finish_reason"] == "timeout"
        assert queued.json()["details"]["generated_tokens"] == 0 and queued.json()["generated_text"] == ""
        r = await first
        assert (
            r.json()["details"]["finish_reason"] == "timeout" and r.json()["details"]["generated_tokens"] < 64
        )
        # OpenAI routes have no timeout field: the server default applies; a cut-short answer is "length".
        c = await client.post("/v1/completions", json={"model": "gamma", "prompt": "x", "max_tokens": 64})
        assert c.status_code == 200 and c.json()["choices"][0]["finish_reason"] == "length"
        assert c.json()["usage"]["completion_tokens"] < 64
        assert engine.scheduler.idle and engine.scheduler.held_tokens == 0


@pytest.mark.parametrize("timeout", [0, -1, 3601, "NaN", "Infinity"])
async def test_bad_timeouts_are_422(lm, store, timeout):
    app = make_app(lm, store)
    async for client in open_client(app):
        # NaN: not JSON, but Python's
        body = f'{{"task": "alpha", "inputs": "x", "parameters": {{"timeout": {timeout}}}}}'
        r = await client.post("/generate", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and "parameters.timeout" in r.json()["error"], r.text


# ---- one poisoned row ----------------------------------------------------------------------------
async def test_a_poisoned_prompt_fails_only_its_request_and_the_engine_keeps_serving(lm, store):
    app = make_app(lm, store)
    async for client in open_client(app):
        service = app.state.service
        payloads = {t: gen(t, f"hello {t}", max_new_tokens=6) for t in TASKS}
        reference = {
            t: (await client.post("/generate", json=p)).json() for t, p in payloads.items() if t != "gamma"
        }
        # NaN that slipped past validation, straight into the registry's tensor (not yet in the prefix cache).
        service.registry.get("gamma").embeddings[0, 0] = float("nan")
        answers = await asyncio.gather(*(client.post("/generate", json=p) for p in payloads.values()))
        by_task = dict(zip(payloads, answers))
        assert by_task["gamma"].status_code == 424
        assert by_task["gamma"].json()["error_type"] == "generation"
        assert "non-finite" in by_task["gamma"].json()["error"]
        for t, ref in reference.items():
            assert by_task[t].status_code == 200 and by_task[t].json() == ref
        assert service.engine.stats.mixed_task_passes > 0
        again = await client.post("/generate", json=payloads["alpha"])
        assert again.status_code == 200 and again.json() == reference["alpha"]
        assert (await client.get("/health")).status_code == 200


# ---- the engine loop dies -----------------------------------------------------------------------
class Fatal(BaseException):
    """Not an Exception: nothing but the loop's last-resort handler catches it (like SystemExit)."""


async def test_a_dead_engine_loop_makes_health_and_ready_503_and_nothing_hangs(lm, store):
    app = make_app(lm, store)
    async for client in open_client(app):
        engine = app.state.service.engine
        real_step = engine.step

        def dying_step() -> bool:
            if engine.scheduler.num_waiting:
                raise Fatal("simulated fatal error in the engine loop")
            return real_step()

        engine.step = dying_step
        r = await asyncio.wait_for(client.post("/generate", json=gen("alpha", "x", max_new_tokens=4)), 10)
        # Accepted, then failed in the engine: the dying loop fails every queued and running request with
        # GENERATION_FAILED (424); 503 (UNAVAILABLE) is for requests that arrive once the engine is dead.
        assert r.status_code == 424 and r.json()["error_type"] == "generation", r.text
        assert r.json()["error"] == "engine failure: simulated fatal error in the engine loop", r.text
        assert wait_until(lambda: not engine.alive, timeout=5)
        for path in ("/health", "/ready"):
            h = await client.get(path)
            assert h.status_code == 503 and "simulated fatal error" in h.json()["error"], (path, h.text)
        after = await asyncio.wait_for(client.post("/generate", json=gen("alpha", "x")), 10)
        assert after.status_code == 503 and after.json()["error_type"] == "unhealthy"
        s = await asyncio.wait_for(client.post("/generate_stream", json=gen("alpha", "x")), 10)
        assert s.status_code == 503


async def test_an_engine_error_flag_alone_makes_ready_and_health_503(lm, store):
    app = make_app(lm, store)
    async for client in open_client(app):
        app.state.service.engine.error = RuntimeError("simulated: the loop recorded a failure")
        assert (await client.get("/ready")).status_code == 503
        assert (await client.get("/health")).status_code == 503
        r = await client.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        app.state.service.engine.error = None  # let the fixture stop it cleanly


# ---- the store read-only or full -----------------------------------------------------------------
def upload(hidden: int) -> dict:
    emb = torch.randn(3, hidden, generator=torch.Generator().manual_seed(1)) * 0.5
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3}
    files = {
        "adapter_config.json": json.dumps(config).encode(),
        "adapter_model.safetensors": save({"prompt_embeddings": emb}),
    }
    return {name: (name, io.BytesIO(data), "application/octet-stream") for name, data in files.items()}


def listing(store: Path) -> list[str]:
    return sorted(str(p.relative_to(store)) for p in store.rglob("*"))


@pytest.mark.parametrize("fault", ["read-only", "full"])
async def test_uploads_to_a_broken_store_fail_with_a_reason_and_serving_continues(
    lm, store, monkeypatch, fault
):
    """Tests run as root, so chmod would not stop the writes: the failing calls are simulated."""
    app = make_app(lm, store)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async for client in open_client(app):
        before = listing(store)
        if fault == "read-only":

            def refuse(*args, **kwargs):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))

            monkeypatch.setattr(admin, "temp_folder", refuse)
            status, words = 503, "not writable"
        else:
            real_open = open

            def full_disk(path, mode="r", *args, **kwargs):
                if "w" in mode:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real_open(path, mode, *args, **kwargs)

            monkeypatch.setattr(admin, "open", full_disk, raising=False)
            status, words = 507, "full"
        r = await client.put("/tasks/fresh", headers=auth, files=upload(lm.hidden_size))
        assert r.status_code == status, r.text
        assert words in r.json()["error"] and r.json()["error_type"] in {
            "store_unavailable",
            "insufficient_storage",
        }
        assert listing(store) == before  # no half-written task, no leftover temp folder
        ok = await client.post("/generate", json=gen("alpha", "still serving", max_new_tokens=3))
        assert ok.status_code == 200
        assert "fresh" not in app.state.service.registry.names()
        monkeypatch.undo()
        r = await client.put("/tasks/fresh", headers=auth, files=upload(lm.hidden_size))
        assert r.status_code == 201, r.text  # once the disk is fine again, uploads work


# ---- SIGTERM --------------------------------------------------------------------------------------
def waiting(base: str) -> int:
    return int(httpx.get(f"{base}/stats", timeout=10).json()["waiting"])


def test_sigterm_drains_finishes_in_flight_requests_refuses_new_ones_and_exits_0(tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    make_store(store, 64, broken=False)
    port = free_port()
    env = {**os.environ, "SOFTMUX_LOG_FORMAT": "text"}
    cmd = [
        sys.executable,
        "-m",
        "server.cli",
        "serve",
        "--model",
        str(tiny_model_dir),
        "--dtype",
        "float32",
        "--store",
        str(store),
        "--port",
        str(port),
        "--reload-interval",
        "0",
        "--max-batch-size",
        "1",
        "--shutdown-grace",
        "60",
        "--threads",
        "1",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            try:
                return httpx.get(f"{base}/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(up, timeout=90, interval=0.2), "server did not become ready"
        # One row at a time, four sampled requests of 150 tokens: seconds of accepted work.
        payloads = [
            gen(t, f"story {i}", max_new_tokens=150, do_sample=True, seed=i)
            for i, t in enumerate([*TASKS, "alpha"])
        ]
        results: dict[int, httpx.Response] = {}

        def call(i: int) -> None:
            results[i] = httpx.post(f"{base}/generate", json=payloads[i], timeout=120)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(1, len(payloads))]
        stream_events: list[dict] = []
        with httpx.Client(base_url=base, timeout=120) as http:
            with http.stream("POST", "/generate_stream", json=payloads[0]) as s:
                lines = s.iter_lines()
                for line in lines:  # the stream has started: request 0 is in flight
                    if line.startswith("data:"):
                        stream_events.append(json.loads(line[5:]))
                        break
                for t in threads:
                    t.start()
                # One row at a time: the others wait in the queue before the signal comes.
                assert wait_until(lambda: waiting(base) == len(threads), timeout=60, interval=0.05)
                proc.send_signal(signal.SIGTERM)
                assert wait_until(lambda: not up(), timeout=30, interval=0.05)  # draining: /ready is 503
                refused = httpx.post(
                    f"{base}/generate", json=gen("alpha", "too late", max_new_tokens=2), timeout=30
                )
                ready = httpx.get(f"{base}/ready", timeout=30)
                for line in lines:
                    if line.startswith("data:"):
                        stream_events.append(json.loads(line[5:]))
        for t in threads:
            t.join(120)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]
        assert ready.status_code == 503
        assert stream_events[-1]["details"]["finish_reason"] in {"length", "eos_token"}, stream_events[-1]
        assert len(results) == len(payloads) - 1
        for i, r in results.items():
            assert r.status_code == 200, (i, r.text)
            assert r.json()["details"]["finish_reason"] in {"length", "eos_token"}
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0]
    assert "draining" in out and "every accepted request finished" in out, out[-3000:]
