"""softmux on Ray Serve (server/deploy): a local Ray instance, 2 engine replicas of the tiny model.

One Ray instance and one deployment serve the whole module (starting them takes most of the
time). Marked `ray`: `make test-ray` runs this file; it is skipped when Ray is not installed.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from server.api.app import create_app  # noqa: E402
from server.deploy.ray_app import APP_NAME, build_app  # noqa: E402
from tests.api_support import (  # noqa: E402
    TASKS,
    free_port,
    make_store,
    open_client,
    settings_for,
    wait_until,
    write_task,
)

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
ADMIN = "ray-admin-token"
HEADER = "x-softmux-replica"


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("ray-store")
    hidden = json.loads((tiny_model_dir / "config.json").read_text())["hidden_size"]
    make_store(root, hidden)
    return root


@pytest.fixture(scope="module")
def settings(store, tiny_model_dir):
    return settings_for(
        store,
        model=str(tiny_model_dir),
        dtype="float64",
        admin_token=ADMIN,
        threads=1,
        reload_interval=1.0,
        max_batch_size=16,
        max_new_tokens=1500,
    )


@pytest.fixture(scope="module")
def cluster(settings):
    """Ray on 127.0.0.1 (no dashboard, no usage stats), Serve's proxy on a free port, the app deployed."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray's workers must import this checkout's `server` package (the venv may hold another editable one).
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        namespace="serve",
        _node_ip_address="127.0.0.1",
        configure_logging=False,
        log_to_driver=False,
    )
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        handle = serve.run(build_app(settings, 2), name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=60) as client:
            assert wait_until(lambda: len(client.get("/stats").json()["replicas"]) == 2, timeout=30)
        yield url, handle
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture
def client(cluster):
    with httpx.Client(base_url=cluster[0], timeout=60) as c:
        yield c


def replica_stats(client: httpx.Client) -> dict[str, dict]:
    return {r["replica"]: r for r in client.get("/stats").json()["replicas"]}


def generate(
    client: httpx.Client, task: str, max_new_tokens: int = 8, text: str = "hello there"
) -> httpx.Response:
    return client.post(
        "/generate", json={"task": task, "inputs": text, "parameters": {"max_new_tokens": max_new_tokens}}
    )


# ---- the same answers as softmux serve --------------------------------------------------------------
CASES: list[tuple[str, str, dict | None]] = [
    (
        "POST",
        "/generate",
        {"task": "beta", "inputs": "The quick brown fox", "parameters": {"max_new_tokens": 9}},
    ),
    (
        "POST",
        "/generate",
        {
            "task": "alpha",
            "inputs": "hello",
            "parameters": {"max_new_tokens": 8, "do_sample": True, "seed": 42},
        },
    ),
    (
        "POST",
        "/generate",
        {"task": "gamma", "inputs": "stop here", "parameters": {"max_new_tokens": 12, "stop": ["e"]}},
    ),
    ("POST", "/generate", {"task": "nope", "inputs": "x"}),
    ("POST", "/generate", {"task": "alpha", "inputs": "x", "parameters": {"max_new_tokens": 0}}),
    ("POST", "/generate", {"task": "alpha", "inputs": "x", "parameters": {"max_new_tokens": 10_000}}),
    (
        "POST",
        "/generate_stream",
        {"task": "gamma", "inputs": "streaming please", "parameters": {"max_new_tokens": 6}},
    ),
    ("POST", "/v1/completions", {"model": "beta", "prompt": "Once upon", "max_tokens": 7, "temperature": 0}),
    (
        "POST",
        "/v1/completions",
        {
            "model": "beta",
            "prompt": "Once upon",
            "max_tokens": 5,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ),
    (
        "POST",
        "/v1/chat/completions",
        {
            "model": "alpha",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 6,
            "temperature": 0,
        },
    ),
    ("POST", "/v1/completions", {"model": "nope", "prompt": "x"}),
    ("GET", "/v1/models", None),
    ("GET", "/tasks", None),
    ("GET", "/health", None),
    ("GET", "/ready", None),
    ("GET", "/info", None),
    ("GET", "/tasks/alpha", None),  # admin without a token: 401
]
_VOLATILE = {"id", "created", "seed"}


def _normalise(response: httpx.Response) -> object:
    """The body without ids and timestamps; SSE streams as their list of events."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
        return [_strip(json.loads(e)) if e.startswith("{") else e for e in events]
    return _strip(response.json())


def _strip(value: object) -> object:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


async def test_routes_answer_like_softmux_serve(cluster, settings):
    """Every case gets the same status and body (ids and timestamps aside) from the Ray app as
    from the app `softmux serve` runs; and every Ray answer names its replica."""
    app = create_app(settings, wait=True)
    async for local in open_client(app):
        async with httpx.AsyncClient(base_url=cluster[0], timeout=60) as remote:
            for method, path, body in CASES:
                want = await local.request(method, path, json=body)
                got = await remote.request(method, path, json=body)
                assert got.status_code == want.status_code, (
                    f"{path} {body}: {got.text[:600]} vs {want.text[:300]}"
                )
                if path != "/info":
                    assert _normalise(got) == _normalise(want), (path, body)
                else:
                    assert got.json()["limits"] == want.json()["limits"]
                assert got.headers.get(HEADER), (path, "no replica header")
                assert got.headers.get("x-request-id"), path
                assert len(got.headers.get_list("x-request-id")) == 1, path


def test_request_id_is_echoed(client):
    r = generate(client, "alpha", 2)
    assert r.status_code == 200
    r = client.post(
        "/generate",
        json={"task": "alpha", "inputs": "x", "parameters": {"max_new_tokens": 2}},
        headers={"x-request-id": "my-id-1"},
    )
    assert r.headers["x-request-id"] == "my-id-1"


# ---- replicas, routing, stats ------------------------------------------------------------------------
def test_both_replicas_serve_and_stats_list_them(client):
    stats = replica_stats(client)
    assert len(stats) == 2
    for rep in stats.values():
        assert rep["pid"] > 0 and rep["tasks"] == sorted(TASKS)
        assert {"prefill_passes", "decode_passes", "mixed_task_passes"} <= set(rep["engine"])
    answered = Counter()
    deadline = time.monotonic() + 30
    while len(answered) < 2 and time.monotonic() < deadline:  # requests naming no task: any replica
        r = client.get("/v1/models")
        assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == sorted(TASKS)
        answered[r.headers[HEADER]] += 1
    assert set(answered) == set(stats)
    # And generation: one task per replica at least, once every task ran somewhere.
    served = {t: generate(client, t).headers[HEADER] for t in TASKS}
    assert set(served.values()) <= set(stats)


def test_metrics_have_a_replica_label(client):
    for task in TASKS:
        assert generate(client, task, 2).status_code == 200
    text = client.get("/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("softmux_request_count_total{")]
    replicas = {line.split('replica="')[1].split('"')[0] for line in lines}
    assert replicas == set(replica_stats(client))
    assert text.count("# TYPE softmux_request_count_total counter") == 1
    assert "softmux_ingress_replicas 2" in text


def test_same_task_concentrates_on_one_replica_and_tasks_still_mix(client):
    """Requests of a task go to the replica where it is resident; a replica serving several tasks
    still runs them in shared forward passes."""
    for task in TASKS:  # every task resident somewhere; the routers learn it (pushed every 0.1 s)
        assert generate(client, task, 2).status_code == 200
    time.sleep(1.0)
    before = replica_stats(client)
    jobs = [t for t in TASKS for _ in range(6)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda t: generate(client, t, 24), jobs))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    where: dict[str, set[str]] = {}
    for task, r in zip(jobs, responses, strict=True):
        where.setdefault(task, set()).add(r.headers[HEADER])
    assert all(len(replicas) == 1 for replicas in where.values()), where
    after = replica_stats(client)
    per_replica = Counter(next(iter(r)) for r in where.values())
    assert len(per_replica) == 2  # the tasks were spread over both replicas
    shared, count = per_replica.most_common(1)[0]
    assert count >= 2  # 3 tasks on 2 replicas
    mixed = after[shared]["engine"]["mixed_task_passes"] - before[shared]["engine"]["mixed_task_passes"]
    assert mixed > 0, after[shared]["engine"]
    for task, replicas in where.items():
        rep = after[next(iter(replicas))]
        assert task in rep["routed_tasks"]
        assert rep["requests_by_task"][task] >= 6


def _cancelled(client: httpx.Client, task: str) -> float:
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if (
            line.startswith("softmux_request_count_total{")
            and f'task="{task}"' in line
            and 'outcome="cancelled"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("stream", [False, True])
def test_client_leaving_cancels_the_request_on_its_replica(client, cluster, stream):
    before = _cancelled(client, "beta")
    body = {"task": "beta", "inputs": "keep going", "parameters": {"max_new_tokens": 1500}}
    with httpx.Client(base_url=cluster[0], timeout=httpx.Timeout(60, read=1.0)) as impatient:
        if stream:
            with impatient.stream("POST", "/generate_stream", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        break  # hang up after the first token
        else:
            with pytest.raises(httpx.ReadTimeout):  # hang up after a second
                impatient.post("/generate", json=body)
    assert wait_until(lambda: _cancelled(client, "beta") > before, timeout=30, interval=0.5)


# ---- the store across replicas ---------------------------------------------------------------------
def _upload(
    client: httpx.Client, tmp_path: Path, name: str, num_virtual: int, seed: int, settings: dict | None = None
) -> httpx.Response:
    folder = tmp_path / "src"
    write_task(folder, name, num_virtual, 64, seed)
    files = {
        f: (f, (folder / name / f).read_bytes()) for f in ("adapter_config.json", "adapter_model.safetensors")
    }
    if settings is not None:
        files["task.json"] = ("task.json", json.dumps(settings).encode())
    return client.put(f"/tasks/{name}", files=files, headers={"authorization": f"Bearer {ADMIN}"})


def test_upload_and_delete_reach_every_replica_within_2s(client, tmp_path):
    started = time.monotonic()
    r = _upload(client, tmp_path, "delta", 4, seed=21)
    assert r.status_code == 201, r.text
    assert r.headers[HEADER]

    def everywhere(present: bool) -> bool:
        stats = replica_stats(client)
        return len(stats) == 2 and all(("delta" in rep["tasks"]) == present for rep in stats.values())

    assert wait_until(lambda: everywhere(True), timeout=2.0, interval=0.05)
    assert time.monotonic() - started < 2.0  # from sending the upload to every replica serving it
    assert generate(client, "delta").status_code == 200
    seen = set()
    deadline = time.monotonic() + 20
    while len(seen) < 2 and time.monotonic() < deadline:  # both replicas list it on /v1/models
        m = client.get("/v1/models")
        assert "delta" in [x["id"] for x in m.json()["data"]]
        seen.add(m.headers[HEADER])
    assert len(seen) == 2

    started = time.monotonic()
    r = client.delete("/tasks/delta", headers={"authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    assert wait_until(lambda: everywhere(False), timeout=2.0, interval=0.05)
    assert time.monotonic() - started < 2.0
    for _ in range(6):
        g = generate(client, "delta")
        assert g.status_code == 404 and g.json()["error_type"] == "not_found"
        m = client.get("/v1/models/delta")
        assert m.status_code == 404


def test_a_task_refused_by_its_full_home_replica_is_served_by_the_other(cluster, tmp_path):
    """task.json caps the task at one running row and two waiting requests per replica. Four long
    requests at once all go to the task's home replica, which holds three at most and refuses the
    rest with 429: the ingress sends those to the other replica, so all four are served."""
    url = cluster[0]
    with httpx.Client(base_url=url, timeout=120) as c:
        r = _upload(c, tmp_path, "capped", 4, seed=31, settings={"max_running": 1, "max_queue": 2})
        assert r.status_code == 201, r.text
        assert wait_until(
            lambda: all("capped" in rep["tasks"] for rep in replica_stats(c).values()), timeout=5
        )
        before = c.get("/stats").json()["ingress"].get("overloaded_retried", 0)
    body = {
        "task": "capped",
        "inputs": "a long one",
        "parameters": {"max_new_tokens": 300, "ignore_eos": True},
    }

    def one(_: int) -> httpx.Response:
        with httpx.Client(base_url=url, timeout=120) as c:
            return c.post("/generate", json=body)

    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(one, range(4)))
        with httpx.Client(base_url=url, timeout=60) as c:
            ingress = c.get("/stats").json()["ingress"]
        served = [(a.status_code, a.headers[HEADER]) for a in answers]
        assert [a.status_code for a in answers] == [200] * 4, (served, ingress)
        assert len({a.headers[HEADER] for a in answers}) == 2  # both replicas served the task
        assert ingress["overloaded_retried"] - before >= 1
    finally:
        with httpx.Client(base_url=url, timeout=60) as c:
            c.delete("/tasks/capped", headers={"authorization": f"Bearer {ADMIN}"})


# ---- faults -----------------------------------------------------------------------------------------
def _replica_actors() -> dict[str, str]:
    """{replica unique id: actor name} of the engine replicas."""
    out = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"] if isinstance(entry, dict) else entry
        if name.startswith(f"SERVE_REPLICA::{APP_NAME}#SoftmuxEngine#"):
            out[name.rsplit("#", 1)[1]] = name
    return out


def test_killed_replica_comes_back_and_load_loses_only_in_flight(client, cluster, tmp_path):
    """Kill the replica serving a long stream while a load runs: the stream ends with a clear
    error event, non-streamed requests it held are retried once by the ingress (or get a
    retryable 503), the other replica keeps serving, and Ray's replacement serves every task."""
    replicas = replica_stats(client)
    assert len(replicas) == 2
    stream_events: list[str] = []
    streaming = threading.Event()
    where: list[str] = []

    def long_stream() -> None:
        body = {"task": "gamma", "inputs": "a long story", "parameters": {"max_new_tokens": 1500}}
        with client.stream("POST", "/generate_stream", json=body) as r:
            where.append(r.headers[HEADER])
            for line in r.iter_lines():
                if line.startswith("data:"):
                    stream_events.append(line[5:].strip())
                    streaming.set()

    streamer = threading.Thread(target=long_stream)
    streamer.start()
    assert streaming.wait(30)
    victim = where[0]
    results: list[httpx.Response | Exception] = []

    def one(task: str) -> None:
        try:
            results.append(generate(client, task, 32))
        except Exception as exc:  # a dropped connection would count as lost
            results.append(exc)

    jobs = [t for _ in range(8) for t in TASKS]
    killed = threading.Event()

    def kill_soon() -> None:
        time.sleep(1.0)
        ray.kill(ray.get_actor(_replica_actors()[victim], namespace="serve"), no_restart=False)
        killed.set()

    with ThreadPoolExecutor(8) as pool:
        killer = threading.Thread(target=kill_soon)
        killer.start()
        list(pool.map(one, jobs))
        killer.join()
    assert killed.is_set()
    streamer.join(60)
    last = json.loads(stream_events[-1])
    assert last.get("error_type") == "unhealthy" and victim in last["error"], stream_events[-3:]
    assert len(stream_events) < 1500
    statuses = Counter(r.status_code if isinstance(r, httpx.Response) else type(r).__name__ for r in results)
    # Requests on the killed replica were retried once by the ingress (nothing streamed yet): none lost.
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[200] >= len(jobs) - 8, statuses
    for r in results:
        if isinstance(r, httpx.Response) and r.status_code == 503:
            assert r.headers.get("retry-after") and r.json()["error_type"] == "unhealthy"
    # An upload while the replacement is not up yet: the replacement loads the store as it is then.
    assert _upload(client, tmp_path, "omega", 3, seed=33).status_code == 201
    # The survivor kept serving; Ray brings up a replacement that loads every task from the store.
    assert wait_until(
        lambda: len(replica_stats(client)) == 2 and victim not in replica_stats(client),
        timeout=120,
        interval=1.0,
    )
    stats = replica_stats(client)
    assert all(rep["tasks"] == sorted([*TASKS, "omega"]) for rep in stats.values()), stats
    assert client.delete("/tasks/omega", headers={"authorization": f"Bearer {ADMIN}"}).status_code == 200
    for task in TASKS:
        r = generate(client, task)
        assert r.status_code == 200 and r.headers[HEADER] in stats
    ingress = client.get("/stats").json()["ingress"]
    assert ingress["retried"] >= 1 or statuses[503] >= 1
