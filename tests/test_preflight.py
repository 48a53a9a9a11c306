"""server/preflight.py: `softmux serve` refuses a missing or wrong model, store or port before loading
anything, each with what to do instead; a good configuration passes."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from server.config import Settings
from server.preflight import problems


def settings(tmp_path: Path, **overrides: object) -> Settings:
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    base: dict[str, object] = {"model": "default", "store": str(store), "port": 0}
    return Settings(**{**base, **overrides})  # type: ignore[arg-type]


def test_a_good_configuration_passes(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert problems(settings(tmp_path)) == []
    assert problems(settings(tmp_path, model=str(model))) == []
    assert (
        problems(settings(tmp_path, model="HuggingFaceTB/SmolLM2-135M")) == []
    )  # a hub id: the cache decides


def test_a_missing_or_wrong_model_folder_says_what_it_takes(tmp_path):
    (tmp_path / "empty").mkdir()
    missing = problems(settings(tmp_path, model=str(tmp_path / "nope")))
    wrong = problems(settings(tmp_path, model=str(tmp_path / "empty")))
    assert len(missing) == 1 and "no such folder" in missing[0] and "'default', a model folder" in missing[0]
    assert len(wrong) == 1 and "not a model folder (no config.json" in wrong[0]


def test_a_missing_store_says_how_to_make_one(tmp_path):
    (found,) = problems(settings(tmp_path, store=str(tmp_path / "tasks")))
    assert (
        f"--store {tmp_path / 'tasks'}: no such folder" in found and f"mkdir -p {tmp_path / 'tasks'}" in found
    )
    (tmp_path / "file").write_text("")
    (found,) = problems(settings(tmp_path, store=str(tmp_path / "file")))
    assert "not a folder" in found


def test_a_port_in_use_is_refused_and_a_free_one_passes(tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        (found,) = problems(settings(tmp_path, host="127.0.0.1", port=port))
        assert f"127.0.0.1:{port} is already in use" in found and "--port" in found
    assert problems(settings(tmp_path, host="127.0.0.1", port=port)) == []  # closed: free again


def test_softmux_serve_exits_with_every_problem_before_loading(tmp_path):
    """Exit 2 and one line per problem, in seconds (no model is loaded)."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--model",
            str(tmp_path / "m"),
            "--store",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [line for line in run.stderr.splitlines() if line.startswith("softmux serve:")]
    assert run.returncode == 2 and len(lines) == 2, run.stderr[-2000:]
    assert "--model" in lines[0] and "--store" in lines[1]
