"""The engine replica deployment (`SoftmuxEngine`): one model copy, one registry over the shared
store and one engine loop per replica, the `softmux serve` FastAPI app inside.

It loads a task through the `@serve.multiplexed` loader when Ray routes it here, long polls the
control actor (`server.deploy.control`) for store changes and fan-out questions, and answers
Ray's health check. Its own module: the ingress needs none of it, the app builder only the class
and `replica_threads`; the heavy imports (torch, transformers) happen in the replica's constructor.
"""

import asyncio
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve

from server.config import Settings
from server.deploy.control import POLL_TIMEOUT_S, get_control
from server.deploy.options import APP_NAME
from server.deploy.wire import WireRequest, WireStart, run_asgi

log = logging.getLogger("softmux.deploy")

ENGINE = "SoftmuxEngine"


def replica_threads(settings: Settings) -> int:
    """Torch threads per replica (and the CPUs each replica reserves in Ray): --threads, 1 if 0."""
    return settings.threads if settings.threads > 0 else 1


# ---- the engine replica ---------------------------------------------------------------------------
class _Resident:
    """What the multiplexed loader returns: the task is resident on this replica. Ray calls
    `__del__` when it evicts the task from its multiplex cache (least recently used)."""

    def __init__(self, name: str, routed: set[str]) -> None:
        self.name, self._routed = name, routed
        routed.add(name)

    def __del__(self) -> None:
        self._routed.discard(self.name)


@serve.deployment(name=ENGINE)
class SoftmuxEngine:
    """One engine replica: one model copy, one registry over the shared store, one engine loop."""

    app: Any  # the FastAPI app of `softmux serve`
    service: Any  # its server.service.Service
    _stop: threading.Event

    async def __init__(  # type: ignore[misc]  # Ray Serve awaits async constructors
        self, settings: Settings, max_tasks_per_replica: int = 64, app_name: str = APP_NAME
    ) -> None:
        from server.api.app import create_app  # heavy (torch, transformers): only in replicas

        level = settings.log_level.upper()
        logging.getLogger("softmux").setLevel(level)
        self.settings = settings
        self.app_name = app_name
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.pid = os.getpid()
        self.loop = asyncio.get_running_loop()
        self.requests: Counter[str] = Counter()  # requests per task (routing key) since start
        self.routed: set[str] = set()  # tasks Ray routes here (loaded by the multiplexed loader)
        self.started = time.time()
        self.control = get_control(app_name)
        # Register before loading: a change published while the store loads is applied after.
        self.version: int = await self.control.register.remote(self.replica_id, self._identity())
        self.app = create_app(settings)
        self.service = self.app.state.service
        await asyncio.to_thread(self.service.start)
        if self.service.load_error is not None:
            raise RuntimeError(f"replica {self.replica_id} failed to load: {self.service.load_error}")

        async def load(task: str) -> _Resident:
            return await self._load_task(task)

        self._load: Any = serve.multiplexed(max_num_models_per_replica=max_tasks_per_replica)(load)
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_loop, name="softmux-control-poll", daemon=True)
        self._poller.start()
        registry = self.service.registry
        log.info(
            "replica %s (pid %d) ready with %d task(s)",
            self.replica_id,
            self.pid,
            0 if registry is None else len(registry),
        )

    def _identity(self) -> dict[str, Any]:
        return {
            "replica": self.replica_id,
            "pid": self.pid,
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    async def _load_task(self, task: str) -> _Resident:
        registry = self.service.registry
        if registry is not None:
            await asyncio.to_thread(
                registry.get, task
            )  # its tensors into memory (read from the store if dropped)
        return _Resident(task, self.routed)

    async def handle_http(self, request: WireRequest) -> AsyncIterator[WireStart | bytes]:
        """Run one forwarded HTTP request through this replica's app; stream its answer back."""
        task = serve.get_multiplexed_model_id()
        if task:
            self.requests[task] += 1
            registry = self.service.registry
            if registry is not None and task in registry:
                await self._load(task)
        async for item in run_asgi(self.app, request, self.replica_id):
            yield item

    def check_health(self) -> None:
        """Ray's health check: a replica whose engine died is restarted."""
        if not self.service.healthy:
            raise RuntimeError(
                f"replica {self.replica_id}: engine unhealthy "
                f"({self.service.engine and self.service.engine.error})"
            )

    def __del__(self) -> None:
        """Graceful replica shutdown (Ray waited for its ongoing requests first)."""
        stop = getattr(self, "_stop", None)
        if stop is None or stop.is_set():
            return
        stop.set()
        try:
            self.control.leave.remote(self.replica_id)
        except Exception:
            pass
        self.service.drain(min(self.settings.shutdown_grace, 5.0))
        self.service.stop()

    # ---- the control channel (a thread: long polls the control actor) ----------------------------
    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            try:
                ref: Any = self.control.poll.remote(self.replica_id, self.version, POLL_TIMEOUT_S)
                version, events, gap = ray.get(ref, timeout=POLL_TIMEOUT_S + 30)
            except Exception as exc:  # the control actor restarting, or this process stopping
                if self._stop.wait(1.0):
                    return
                log.warning("replica %s: control poll failed (%s); retrying", self.replica_id, exc)
                try:
                    self.control = get_control(self.app_name)
                    self.control.register.remote(self.replica_id, self._identity())
                except Exception:
                    pass
                continue
            if gap:
                self._refresh()
            for event in events:
                try:
                    self._apply(event)
                except Exception:
                    log.exception("replica %s: applying %s failed", self.replica_id, event)
            self.version = version
            self.control.ack.remote(self.replica_id, version)

    def _refresh(self) -> None:
        if self.service.registry is not None:
            self.service.registry.refresh()

    def _apply(self, event: dict[str, Any]) -> None:
        from server.prompts.types import PromptError

        if event.get("kind") == "store":
            registry = self.service.registry
            if registry is None:
                return
            name, op = event["name"], event["op"]
            if op == "remove":
                registry.remove_folder(name)
                log.info("replica %s: task folder %r removed (broadcast)", self.replica_id, name)
            else:
                try:
                    registry.load_folder(name)
                    log.info("replica %s: task folder %r loaded (broadcast)", self.replica_id, name)
                except PromptError as e:
                    log.warning("replica %s: task folder %r not loaded: %s", self.replica_id, name, e.reason)
        elif event.get("kind") == "collect":
            future = asyncio.run_coroutine_threadsafe(self.answer(event["what"]), self.loop)
            self.control.report.remote(event["cid"], self.replica_id, future.result(timeout=10))

    async def _local(self, path: str) -> tuple[int, bytes]:
        status, body = 0, b""
        async for item in run_asgi(self.app, WireRequest("GET", path), self.replica_id):
            if isinstance(item, WireStart):
                status, body = item.status, item.body
            else:
                body += item
        return status, body

    async def answer(self, what: str) -> Any:
        """This replica's part of a fan-out question: "stats" (dict) or "metrics" (Prometheus text)."""
        if what == "metrics":
            return (await self._local("/metrics"))[1].decode()
        status, body = await self._local("/stats")
        registry = self.service.registry
        return {
            **self._identity(),
            "started": self.started,
            "tasks": [] if registry is None else registry.names(),
            "resident_tasks": [] if registry is None else registry.resident(),
            "routed_tasks": sorted(self.routed),
            "requests": sum(self.requests.values()),
            "requests_by_task": dict(sorted(self.requests.items())),
            "engine": json.loads(body)
            if status == 200
            else {"status": status, "error": body.decode(errors="replace")},
        }
