"""What `softmux serve` checks before it loads anything: the model, the store and the port, each
refused with what to do instead of a library's stack trace minutes later."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

from server.config import Settings

DEFAULT_MODEL = "default"  # server.models.DEFAULT_MODEL, not imported: that module imports torch


def problems(settings: Settings) -> list[str]:
    """Everything wrong with the model, store and port settings (empty: go ahead)."""
    found = [
        p
        for p in (_model(settings.model), _store(Path(settings.store)), _port(settings.host, settings.port))
        if p
    ]
    return found


def _model(model: str) -> str | None:
    if model == DEFAULT_MODEL:
        return None
    path = Path(model).expanduser()
    looks_like_path = model.startswith((".", "/", "~")) or path.exists()
    if not looks_like_path:
        return None  # a Hugging Face hub id: models.load_model looks in the local cache
    what = (
        "--model takes 'default', a model folder (config.json, *.safetensors, "
        "the tokenizer's files) or a hub id in the local cache"
    )
    if not path.exists():
        return f"--model {model}: no such folder. {what}."
    if not path.is_dir() or not (path / "config.json").is_file():
        return f"--model {model}: not a model folder (no config.json in it). {what}."
    return None


def _store(store: Path) -> str | None:
    if store.is_dir():
        return None
    if store.exists():
        return (
            f"--store {store}: not a folder. It names the folder that holds one folder per task "
            "(the repository's prompts_store/)."
        )
    return (
        f"--store {store}: no such folder. Point it at the folder of tasks (the repository's "
        f"prompts_store/), or create an empty one (mkdir -p {store}) to start with none and upload them "
        "(PUT /tasks/NAME)."
    )


def _port(host: str, port: int) -> str | None:
    if port == 0:  # any free port
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as uvicorn binds: only a live listener conflicts
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (
                    f"--port {port}: {host}:{port} is already in use "
                    "(another softmux?). Choose another with --port or SOFTMUX_PORT."
                )
            if exc.errno == errno.EACCES:
                return f"--port {port}: binding {host}:{port} needs privileges. Use a port above 1023."
            return f"--host {host} --port {port}: cannot listen there ({exc.strerror})."
    return None
