"""Helpers for HTTP tests: a store of random prompt-tuning tasks, settings, an in-process ASGI
client, and a real uvicorn server on a free loopback port (for disconnects and real clients)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
import uvicorn
from safetensors.torch import save_file

from server.config import Settings
from tests.support import wait_until

__all__ = [
    "TASKS",
    "free_port",
    "live_server",
    "make_store",
    "open_client",
    "settings_for",
    "wait_until",
    "write_task",
]

TASKS = {"alpha": 2, "beta": 5, "gamma": 11}


def write_task(store: Path, name: str, num_virtual: int, hidden: int, seed: int) -> torch.Tensor:
    folder = store / name
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(num_virtual, hidden, generator=g) * 0.5  # [P, H]
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": num_virtual}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file({"prompt_embeddings": emb}, str(folder / "adapter_model.safetensors"))
    return emb


def make_store(root: Path, hidden: int, *, broken: bool = True) -> dict[str, torch.Tensor]:
    """TASKS as valid folders, plus (when `broken`) one folder of the wrong width."""
    embeddings = {
        name: write_task(root, name, p, hidden, seed=i) for i, (name, p) in enumerate(TASKS.items())
    }
    if broken:
        write_task(root, "wrong-width", 3, hidden + 1, seed=9)
    return embeddings


def settings_for(store: Path, **changes) -> Settings:
    return Settings(store=store, max_input_tokens=64, max_new_tokens=64, max_batch_tokens=4096).replace(
        **changes
    )


async def open_client(app) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as client:
            yield client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(app) -> Iterator[str]:
    """Serve `app` with uvicorn on 127.0.0.1:<free port> in a thread; yields the base URL."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=free_port(), log_level="warning", lifespan="on", log_config=None
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(30)
