"""server/deploy without a Ray cluster: the wire format, the task routing key, the metrics merge,
serve.yaml's args and the config files (Ray itself is needed only for the last ones)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from server.deploy.options import args_to_argv
from server.deploy.wire import REPLICA_HEADER, WireRequest, WireStart, merge_metrics, run_asgi, task_of

REPO = Path(__file__).resolve().parents[1]


def test_task_of_reads_the_routing_key():
    assert task_of("POST", "/generate", b'{"task": "alpha", "inputs": "x"}') == "alpha"
    assert task_of("POST", "/generate_stream", b'{"task": "beta"}') == "beta"
    assert task_of("POST", "/v1/chat/completions", b'{"model": "gamma", "messages": []}') == "gamma"
    assert task_of("POST", "/v1/completions", b'{"task": "alpha"}') is None  # /v1/ names the task `model`
    assert task_of("POST", "/generate", b"not json") is None
    assert task_of("POST", "/generate", b'["task"]') is None
    assert task_of("POST", "/generate", b'{"task": 3}') is None
    assert task_of("GET", "/tasks", b"") is None
    assert task_of("PUT", "/tasks/alpha", b'{"task": "alpha"}') is None


def test_merge_metrics_labels_each_sample_and_keeps_families_together():
    a = (
        '# HELP softmux_x_total x\n# TYPE softmux_x_total counter\nsoftmux_x_total{task="t"} 1.0\n'
        "# HELP softmux_q queue\n# TYPE softmux_q gauge\nsoftmux_q 2.0\n"
    )
    b = (
        '# HELP softmux_x_total x\n# TYPE softmux_x_total counter\nsoftmux_x_total{task="t"} 5.0\n'
        "# HELP softmux_q queue\n# TYPE softmux_q gauge\nsoftmux_q 0.0\n"
    )
    merged = merge_metrics({"r1": a, "r2": b})
    assert merged.splitlines() == [
        "# HELP softmux_x_total x",
        "# TYPE softmux_x_total counter",
        'softmux_x_total{replica="r1",task="t"} 1.0',
        'softmux_x_total{replica="r2",task="t"} 5.0',
        "# HELP softmux_q queue",
        "# TYPE softmux_q gauge",
        'softmux_q{replica="r1"} 2.0',
        'softmux_q{replica="r2"} 0.0',
    ]
    assert merge_metrics({"r": "m{} 1\n"}).strip() == 'm{replica="r"} 1'


def _collect(app, request: WireRequest) -> list:
    async def run() -> list:
        return [item async for item in run_asgi(app, request, "rep-1")]

    return asyncio.run(run())


def test_run_asgi_sends_a_json_answer_as_one_item_and_streams_chunks():
    app = FastAPI()

    @app.post("/echo")
    async def echo(body: dict) -> JSONResponse:
        return JSONResponse({"got": body}, status_code=201)

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks():
            for i in range(3):
                yield f"data: {i}\n\n".encode()

        return StreamingResponse(chunks(), media_type="text/event-stream")

    items = _collect(
        app,
        WireRequest(
            "POST",
            "/echo",
            headers=[(b"content-type", b"application/json")],
            body=json.dumps({"a": 1}).encode(),
        ),
    )
    assert len(items) == 1 and isinstance(items[0], WireStart)
    start = items[0]
    assert start.status == 201 and not start.more and json.loads(start.body) == {"got": {"a": 1}}
    assert (REPLICA_HEADER.encode(), b"rep-1") in start.headers

    items = _collect(app, WireRequest("GET", "/stream"))
    assert isinstance(items[0], WireStart) and items[0].more
    assert items[0].body + b"".join(items[1:]) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


def test_run_asgi_closed_early_tells_the_app_the_client_left():
    app = FastAPI()
    seen: list[str] = []

    @app.get("/slow")
    async def slow() -> StreamingResponse:
        async def chunks():
            try:
                yield b"first"
                await asyncio.sleep(30)
                yield b"never"
            finally:
                seen.append("closed")

        return StreamingResponse(chunks())

    async def run() -> None:
        gen = run_asgi(app, WireRequest("GET", "/slow"), "r")
        first = await gen.__anext__()
        assert first.body == b"first"
        await gen.aclose()

    asyncio.run(asyncio.wait_for(run(), 10))
    assert seen == ["closed"]


def test_yaml_args_become_flags():
    assert args_to_argv({"max_batch_size": 8, "prefix_cache": False, "store": "/s"}) == [
        "--max-batch-size",
        "8",
        "--no-prefix-cache",
        "--store",
        "/s",
    ]


@pytest.mark.ray
def test_serve_yaml_and_rayservice_are_valid_serve_configs_and_build():
    yaml = pytest.importorskip("yaml")
    pytest.importorskip("ray.serve")
    from ray.serve.schema import ServeDeploySchema

    from server.deploy.ray_app import app_builder

    serve_cfg = yaml.safe_load((REPO / "deploy/ray/serve.yaml").read_text())
    docs = list(yaml.safe_load_all((REPO / "deploy/ray/rayservice.yaml").read_text()))
    service = next(d for d in docs if d["kind"] == "RayService")
    for cfg in (serve_cfg, yaml.safe_load(service["spec"]["serveConfigV2"])):
        ServeDeploySchema.model_validate(cfg)
        (app,) = cfg["applications"]
        assert app["import_path"] == "server.deploy.ray_app:app_builder"
        built = app_builder(app["args"])  # the args parse as serve-ray flags and build the app
        assert built is not None


def test_control_publishes_to_every_replica_and_collects_answers():
    """The control actor's logic as a plain object: long polls, acks, the 2 s wait, fan-out, gaps."""
    pytest.importorskip("ray")
    from server.deploy.control import Control

    async def scenario() -> None:
        control = Control(keep=4, ttl=5.0)
        assert control.register("r1", {"pid": 1}) == 0 and control.register("r2", {"pid": 2}) == 0
        assert control.roster() == {"r1": {"pid": 1}, "r2": {"pid": 2}}

        async def replica(rid: str, after: int) -> tuple[int, list]:
            version, events, gap = await control.poll(rid, after, timeout=2.0)
            assert not gap
            control.ack(rid, version)
            return version, events

        polls = [asyncio.create_task(replica(r, 0)) for r in ("r1", "r2")]
        await asyncio.sleep(0.05)
        published = await control.publish({"kind": "store", "op": "load", "name": "t"}, wait=2.0)
        assert published["pending"] == [] and published["applied"] == ["r1", "r2"]
        for version, events in await asyncio.gather(*polls):
            assert version == 1 and events == [{"kind": "store", "op": "load", "name": "t", "version": 1}]

        # A replica that stops polling (killed) holds a change up for at most `wait`.
        control._replicas["r2"].applied = 0
        slow = await control.publish({"kind": "store", "op": "remove", "name": "t"}, wait=0.2)
        assert slow["pending"] == ["r1", "r2"]  # nobody polled in between

        async def answer(rid: str) -> None:
            _, events, _ = await control.poll(rid, 2, timeout=2.0)
            for e in events:
                if e["kind"] == "collect":
                    await control.report(e["cid"], rid, {"replica": rid})

        answering = [asyncio.create_task(answer(r)) for r in ("r1", "r2")]
        await asyncio.sleep(0.05)
        got = await control.collect("stats", timeout=2.0)
        assert got == {"answers": {"r1": {"replica": "r1"}, "r2": {"replica": "r2"}}, "missing": []}
        await asyncio.gather(*answering)

        # Events dropped from the bounded history: the replica rescans the store (gap).
        for i in range(6):
            await control.publish({"kind": "store", "op": "load", "name": f"x{i}"}, wait=0)
        _, _, gap = await control.poll("r1", 1, timeout=0.1)
        assert gap
        _, _, gap = await control.poll("r1", 999, timeout=0.1)  # the actor restarted: its history is gone
        assert gap

    asyncio.run(asyncio.wait_for(scenario(), 20))
