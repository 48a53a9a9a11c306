"""`softmux bench` against a live server on the tiny model: figures add up, errors are counted."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from server import bench
from server.api.app import create_app
from server.cli import build_parser
from server.models import load_model
from tests.api_support import live_server, make_store, settings_for


@pytest.fixture(scope="module")
def url_and_app(tiny_model_dir: Path, tmp_path_factory):
    lm = load_model(str(tiny_model_dir), dtype="float32")
    store = tmp_path_factory.mktemp("bench-store")
    make_store(store, lm.hidden_size, broken=False)
    app = create_app(settings_for(store), loader=lambda: lm, wait=True)
    with live_server(app) as url:
        yield url, app


def test_bench_reports_throughput_latency_and_batching(url_and_app, tmp_path):
    url, app = url_and_app
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    ns = build_parser().parse_args(
        [
            "bench",
            "--url",
            url,
            "--requests",
            "12",
            "--concurrency",
            "1",
            "6",
            "--max-new-tokens",
            "5",
            "--input-words",
            "6",
            "--json",
            str(out),
            "--plot",
            str(png),
            "--no-progress",
        ]
    )
    assert ns.func(ns) == 0
    reports = json.loads(out.read_text())
    assert [r["concurrency"] for r in reports] == [1, 6]
    for r in reports:
        assert r["requests"] == 12 and r["errors"] == {}
        assert r["tokens_per_s"] == pytest.approx(12 * 5 / r["seconds"])
        assert 0 < r["ttft"]["p50"] <= r["latency"]["p50"] <= r["latency"]["p99"]
    assert reports[0]["rows_per_pass"] == pytest.approx(1.0)  # one at a time
    assert reports[1]["rows_per_pass"] > 1.5 and reports[1]["tasks_per_pass"] > 1.0  # batched, mixed tasks
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_counts_errors_by_status(url_and_app, tmp_path):
    url, _ = url_and_app
    reqs = [
        bench.BenchRequest("alpha", "hello", 3),
        bench.BenchRequest("no-such-task", "hello", 3),
        bench.BenchRequest("beta", "hi", 10_000),
    ]
    report = asyncio.run(bench.run_load(url, reqs, concurrency=2, progress=False))
    assert report.errors == {"404": 1, "422": 1}
    assert report.requests == 3 and report.tokens_per_s > 0


def test_requests_file(tmp_path):
    path = tmp_path / "reqs.jsonl"
    path.write_text('{"task": "a", "inputs": "x"}\n\n{"task": "b", "inputs": "y", "max_new_tokens": 7}\n')
    assert bench.load_requests(path, 32) == [
        bench.BenchRequest("a", "x", 32),
        bench.BenchRequest("b", "y", 7),
    ]


def test_percentiles():
    p = bench.percentiles([float(i) for i in range(1, 101)])
    assert p["p50"] == 50.5 and p["p90"] == 91.0 and p["p99"] == 100.0
    assert bench.percentiles([]) == {}


def test_flag_values_are_read_as_the_server_reads_them():
    assert bench.flag_value(["--max-batch-size", "8", "--port", "1234"], "--port") == "1234"
    assert (
        bench.flag_value(["--port=99", "--port", "100"], "--port") == "100"
    )  # the last wins, as argparse does
    assert bench.flag_value(["--store", "x"], "--port") is None


def test_a_port_given_to_the_started_server_is_the_one_the_benchmark_polls(tiny_model_dir, tmp_path):
    """`--server-args '--port P'`: the server listens on P and the benchmark waits for P (it used to
    poll a port of its own choosing for its whole timeout, then fail)."""
    import os
    import signal
    import time

    store = tmp_path / "store"
    store.mkdir()
    port = bench.free_port()
    began = time.monotonic()
    proc, url = bench.start_server(
        ["--model", str(tiny_model_dir), "--store", str(store), "--port", str(port)], ready_timeout=120
    )
    try:
        assert url == f"http://127.0.0.1:{port}" and time.monotonic() - began < 120
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_a_plot_without_matplotlib_is_refused_before_any_load(tmp_path):
    """With matplotlib hidden, `--plot` stops at once with how to get it; no request is sent (the URL
    below has nothing listening, which would otherwise be the error)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from server.cli import main\n"
        f"sys.exit(main(['bench', '--url', 'http://127.0.0.1:9', '--plot', {str(tmp_path / 'p.png')!r}]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "needs matplotlib" in out.stderr and "softmux[bench]" in out.stderr, out.stderr[-1000:]
    assert "Connect" not in out.stderr and not (tmp_path / "p.png").exists()
