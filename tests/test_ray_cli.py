"""`softmux serve-ray` as users run it: a local Ray instance, the same port and routes, and SIGTERM
drains like `softmux serve` (accepted requests finish, new ones get 503, exit 0)."""

from __future__ import annotations

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

pytest.importorskip("ray.serve")

from tests.api_support import free_port, make_store, wait_until  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]
REPO = Path(__file__).resolve().parents[1]


def test_serve_ray_serves_and_drains_on_sigterm(tmp_path, tiny_model_dir):
    store = tmp_path / "store"
    make_store(store, json.loads((tiny_model_dir / "config.json").read_text())["hidden_size"], broken=False)
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "server.cli",
        "serve-ray",
        "--replicas",
        "1",
        "--threads",
        "1",
        "--port",
        str(port),
        "--model",
        str(tiny_model_dir),
        "--dtype",
        "float32",
        "--store",
        str(store),
        "--max-new-tokens",
        "1500",
        "--max-batch-tokens",
        "4096",
        "--shutdown-grace",
        "60",
    ]
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()  # type: ignore[arg-type]
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(
            lambda: any("ready on" in line for line in lines) or proc.poll() is not None,
            timeout=240,
            interval=0.5,
        ), "".join(lines[-30:])
        assert proc.poll() is None, "".join(lines[-30:])
        assert httpx.get(f"{base}/ready", timeout=10).status_code == 200
        r = httpx.post(
            f"{base}/generate",
            json={"task": "alpha", "inputs": "hi", "parameters": {"max_new_tokens": 4}},
            timeout=30,
        )
        assert r.status_code == 200 and r.headers["x-softmux-replica"]

        results: list[httpx.Response] = []

        def long_request() -> None:  # EOS ignored by no one: the tiny random model rarely emits it
            results.append(
                httpx.post(
                    f"{base}/generate",
                    timeout=120,
                    json={"task": "beta", "inputs": "go on", "parameters": {"max_new_tokens": 1500}},
                )
            )

        workers = [threading.Thread(target=long_request) for _ in range(3)]
        for w in workers:
            w.start()
        assert wait_until(
            lambda: httpx.get(f"{base}/stats", timeout=10).json()["ingress"]["inflight"] >= 3, timeout=30
        )
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        refused = httpx.post(f"{base}/generate", json={"task": "alpha", "inputs": "hi"}, timeout=30)
        assert refused.status_code == 503 and refused.json()["error_type"] == "unhealthy"
        assert httpx.get(f"{base}/ready", timeout=10).status_code == 503
        for w in workers:
            w.join(120)
        assert [r.status_code for r in results] == [200, 200, 200], [r.text for r in results]
        assert proc.wait(120) == 0, "".join(lines[-30:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
