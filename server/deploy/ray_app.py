"""softmux on Ray Serve: an ingress deployment and N engine replicas over one shared store.

```
HTTP -> Ray proxy -> SoftmuxIngress (FastAPI: /stats, /metrics fan out; everything else forwarded)
          -> handle.options(stream=True, multiplexed_model_id=<task>).handle_http(request)
          -> SoftmuxEngine replica: the same FastAPI app as `softmux serve` (its own Service:
             model, registry over the shared store, engine loop that mixes tasks per pass)
```

- Task-affine routing: the task a request names is its `multiplexed_model_id`; the
  `TaskAffinityRouter` (`server.deploy.router`) sends it to the task's home replica while that one
  is not much busier than the least loaded, else (and for new tasks) to the least loaded; the
  `@serve.multiplexed` loader makes the prompt resident there. A replica holds many tasks and its
  engine still mixes them in one forward pass (no `@serve.batch`, which would split batches by
  model id). The first request of a task on a replica computes the task's key/value prefix;
  routing keeps later ones where that prefix is warm.
- Store changes (PUT/DELETE /tasks/{name} through the ingress) are published to every replica by
  the app's control actor (`server.deploy.control`); the answer waits until each live replica
  applied it (at most 2 s). Every replica's store watcher stays on as the backstop, and a replica
  started later (autoscaling, restart) loads the store as it is then.
- Faults: when the replica running a request dies before its answer started, the ingress retries
  it once on another replica, then answers 503 (retryable, `Retry-After: 1`); a stream already
  under way ends with an error event. Ray restarts the replica.
"""

import argparse
import asyncio
import json
import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from ray import serve
from ray.exceptions import RayError
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from starlette.responses import JSONResponse, Response, StreamingResponse

from server.config import Settings, from_namespace
from server.deploy.control import POLL_TIMEOUT_S, get_control
from server.deploy.options import APP_NAME, add_ray_arguments, args_to_argv
from server.deploy.wire import REPLICA_HEADER, WireRequest, WireStart, merge_metrics, run_asgi, task_of

log = logging.getLogger("softmux.deploy")

ENGINE = "SoftmuxEngine"
INGRESS = "SoftmuxIngress"
INGRESS_ID = "ingress"
_UPLOAD_OVERHEAD = 64 << 10  # multipart headers on top of --max-upload-bytes (as admin.py allows)


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

    async def __init__(self, settings: Settings, max_tasks_per_replica: int = 64, app_name: str = APP_NAME) -> None:  # type: ignore[misc]  # Ray Serve awaits async constructors
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
        log.info("replica %s (pid %d) ready with %d task(s)", self.replica_id, self.pid, 0 if registry is None else len(registry))

    def _identity(self) -> dict[str, Any]:
        return {"replica": self.replica_id, "pid": self.pid, "node_id": ray.get_runtime_context().get_node_id()}

    async def _load_task(self, task: str) -> _Resident:
        registry = self.service.registry
        if registry is not None:
            await asyncio.to_thread(registry.get, task)  # its tensors into memory (read from the store if dropped)
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
                f"replica {self.replica_id}: engine unhealthy ({self.service.engine and self.service.engine.error})"
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
            "engine": json.loads(body) if status == 200 else {"status": status, "error": body.decode(errors="replace")},
        }


# ---- the ingress ----------------------------------------------------------------------------------
ingress_app = FastAPI(title="softmux (Ray Serve)", docs_url=None, redoc_url=None, openapi_url=None)
_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


def _error(path: str, status: int, message: str, error_type: str, headers: dict[str, str] | None = None) -> JSONResponse:
    from server.api.errors import OPENAI_PREFIX, openai_body

    body = openai_body(message, error_type) if path.startswith(OPENAI_PREFIX) else {"error": message, "error_type": error_type}
    return JSONResponse(body, status_code=status, headers={REPLICA_HEADER: INGRESS_ID, **(headers or {})})


def _store_change(method: str, path: str, status: int) -> dict[str, Any] | None:
    """The broadcast an admin write through the ingress needs, once its replica answered 2xx."""
    if not path.startswith("/tasks/") or not 200 <= status < 300 or method not in ("PUT", "DELETE"):
        return None
    return {"kind": "store", "op": "load" if method == "PUT" else "remove", "name": path[len("/tasks/") :]}


@serve.deployment(name=INGRESS)
@serve.ingress(ingress_app)
class SoftmuxIngress:
    def __init__(self, engine: DeploymentHandle, settings: Settings, app_name: str = APP_NAME) -> None:
        self.engine = engine
        self.settings = settings
        self.control = get_control(app_name)
        self.draining = False
        self.inflight = 0
        self.counts: Counter[str] = Counter()  # forwarded, retried, failed (replica died), streams_broken

    # ---- fan-out routes -------------------------------------------------------------------------
    @ingress_app.get("/stats")
    async def stats(self) -> JSONResponse:
        """Every live replica's engine counters and tasks, and their sums."""
        got = await self.control.collect.remote("stats", 2.0)
        replicas = list(got["answers"].values())
        totals: Counter[str] = Counter()
        for rep in replicas:
            for key, value in rep.get("engine", {}).items():
                if isinstance(value, int) and not isinstance(value, bool):
                    totals[key] += value
        for key in ("max_tasks_in_pass", "max_rows_in_pass"):  # maxima, not sums
            totals[key] = max((rep.get("engine", {}).get(key, 0) for rep in replicas), default=0)
        body = {
            "replicas": replicas,
            "missing": got["missing"],
            "ingress": {**self.counts, "inflight": self.inflight},
            **dict(totals),
        }
        ids = ",".join(rep["replica"] for rep in replicas) or INGRESS_ID
        return JSONResponse(body, headers={REPLICA_HEADER: ids})

    @ingress_app.get("/metrics")
    async def metrics(self) -> Response:
        """The replicas' Prometheus metrics, each sample labelled `replica`, plus the ingress's own."""
        got = await self.control.collect.remote("metrics", 2.0)
        text = merge_metrics(got["answers"])
        own = [
            "# HELP softmux_ingress_replicas engine replicas that answered this scrape",
            "# TYPE softmux_ingress_replicas gauge",
            f"softmux_ingress_replicas {len(got['answers'])}",
            "# HELP softmux_ingress_requests_total requests the ingress forwarded, retried and failed",
            "# TYPE softmux_ingress_requests_total counter",
            *(
                f'softmux_ingress_requests_total{{outcome="{k}"}} {self.counts.get(k, 0)}'
                for k in ("forwarded", "retried", "failed", "streams_broken")
            ),
        ]
        ids = ",".join(got["answers"]) or INGRESS_ID
        return Response(
            text + "\n".join(own) + "\n", media_type="text/plain; version=0.0.4; charset=utf-8", headers={REPLICA_HEADER: ids}
        )

    # ---- everything else: forwarded to one engine replica -----------------------------------------
    @ingress_app.api_route("/{path:path}", methods=_METHODS)
    async def forward(self, path: str, request: Request) -> Response:
        url_path = request.url.path
        if self.draining and url_path != "/health":
            return _error(
                url_path, 503, "the server is shutting down and accepts no new requests", "unhealthy", {"Retry-After": "1"}
            )
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        wire = WireRequest(
            method=request.method,
            path=url_path,
            query_string=request.scope.get("query_string", b""),
            headers=[(k, v) for k, v in request.scope.get("headers", [])],
            body=body,
            client=tuple(request.scope["client"]) if request.scope.get("client") else None,
        )
        task = task_of(request.method, url_path, body)
        self.inflight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.inflight -= 1

        try:
            got = await self._start(wire, task)
            if isinstance(got, Response):
                release()
                return got
            gen, start = got
            change = _store_change(request.method, url_path, start.status)
            if change is not None:
                await self._publish(change)
            response: Response
            if start.more:  # a stream: relay the chunks as they come
                response = StreamingResponse(self._rest(gen, start, url_path, release), status_code=start.status)
            else:  # the whole answer arrived in one piece
                release()
                response = Response(start.body, status_code=start.status)
            # The replica's headers as they are; Ray's proxy adds X-Request-ID (the same id) itself.
            response.raw_headers = [(k, v) for k, v in start.headers if k.lower() != b"x-request-id"]
            return response
        except BaseException:
            release()
            raise

    async def _publish(self, change: dict[str, Any]) -> None:
        """Tell every replica about a store change and wait (at most 2 s) until each applied it.
        Never fails the admin request: the change is on disk, and the store watchers catch up."""
        try:
            published = await self.control.publish.remote(change, 2.0)
        except RayError as exc:
            log.warning("store change %s not broadcast (%s); replicas pick it up from the store", change, exc)
            return
        if published["pending"]:
            log.warning("store change %s not yet applied by %s", change, published["pending"])

    async def _body(self, request: Request) -> bytes | Response:
        """The request body, refused with 413 past the limit `softmux serve` applies to this path."""
        s, path = self.settings, request.url.path
        upload = request.method == "PUT" and path.startswith("/tasks/")
        limit = s.max_upload_bytes + _UPLOAD_OVERHEAD if upload else s.max_body_bytes
        if limit <= 0:
            return await request.body()
        declared = request.headers.get("content-length", "")
        too_big = _error(path, 413, f"request body is over {limit} bytes; at most {limit} are accepted", "too_large")
        if declared.isdigit() and int(declared) > limit:
            return too_big
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                return too_big
            chunks.append(chunk)
        return b"".join(chunks)

    async def _start(self, wire: WireRequest, task: str | None) -> tuple[Any, WireStart] | Response:
        """Send the request to a replica and wait for its answer to start; if that replica dies
        first, try once more on another one, then give up with a retryable 503."""
        for attempt in (1, 2):
            handle = self.engine.options(stream=True, multiplexed_model_id=task or "")
            gen: Any = handle.handle_http.remote(wire)
            try:
                start = await gen.__anext__()
                self.counts["forwarded"] += 1
                return gen, start
            except asyncio.CancelledError:  # the client left before the answer: the replica drops the row
                gen.cancel()
                raise
            except (RayError, StopAsyncIteration) as exc:
                self.counts["failed"] += 1
                log.warning(
                    "%s %s: engine replica failed before answering (%s: %s)%s",
                    wire.method,
                    wire.path,
                    type(exc).__name__,
                    exc,
                    "; retrying once" if attempt == 1 else "",
                )
                if attempt == 1:
                    self.counts["retried"] += 1
                    continue
        return _error(
            wire.path,
            503,
            "the engine replica running this request failed, and so did the retry; retry shortly",
            "unhealthy",
            {"Retry-After": "1"},
        )

    async def _rest(self, gen: Any, start: WireStart, path: str, release: Callable[[], None]) -> AsyncIterator[bytes]:
        finished = False
        try:
            if start.body:
                yield start.body
            async for chunk in gen:
                yield chunk
            finished = True
        except RayError as exc:
            self.counts["streams_broken"] += 1
            log.warning("%s: engine replica %s failed mid-answer (%s)", path, start.replica, type(exc).__name__)
            ctype = dict(start.headers).get(b"content-type", b"")
            if ctype.startswith(b"text/event-stream"):
                from server.api.errors import OPENAI_PREFIX, openai_body

                message = f"the engine replica {start.replica} failed mid-stream; retry the request"
                payload = (
                    openai_body(message, "unhealthy")
                    if path.startswith(OPENAI_PREFIX)
                    else {"error": message, "error_type": "unhealthy"}
                )
                yield f"data: {json.dumps(payload)}\n\n".encode()
        finally:
            if not finished:
                gen.cancel()  # the client left, or the stream broke: the replica drops the row
            release()

    # ---- lifecycle -----------------------------------------------------------------------------
    async def drain(self, grace: float) -> bool:
        """SIGTERM on serve-ray: new requests get 503, accepted ones finish for up to `grace` s."""
        self.draining = True
        deadline = time.monotonic() + grace
        while self.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.inflight == 0

    async def replicas(self) -> dict[str, Any]:
        """The live engine replicas as the control actor knows them (for tests and tools)."""
        return await self.control.roster.remote()


# ---- building the app -----------------------------------------------------------------------------
def build_app(
    settings: Settings,
    replicas: int | str = 2,
    *,
    max_ongoing_requests: int | None = None,
    max_tasks_per_replica: int = 64,
    imbalanced_threshold: int = 8,
    autoscaling: dict[str, Any] | None = None,
    app_name: str = APP_NAME,
) -> serve.Application:
    """The Ray Serve application: SoftmuxIngress over `replicas` SoftmuxEngine replicas
    (`"auto"` or an `autoscaling` config: Ray Serve autoscaling instead of a fixed count)."""
    threads = replica_threads(settings)
    engine_options: dict[str, Any] = {
        "max_ongoing_requests": max_ongoing_requests or 2 * settings.max_batch_size,
        "request_router_config": RequestRouterConfig(
            request_router_class="server.deploy.router.TaskAffinityRouter",  # type: ignore[arg-type]
            request_router_kwargs={"imbalanced_threshold": imbalanced_threshold},
        ),
        "ray_actor_options": {"num_cpus": threads},
        "graceful_shutdown_timeout_s": settings.shutdown_grace,
        "health_check_period_s": 5.0,
    }
    if autoscaling is not None:
        engine_options["autoscaling_config"] = autoscaling
    elif replicas != "auto":
        engine_options["num_replicas"] = int(replicas)
    engine = SoftmuxEngine.options(  # type: ignore[attr-defined]
        **engine_options
    ).bind(settings.replace(threads=threads), max_tasks_per_replica, app_name)
    return SoftmuxIngress.options(  # type: ignore[attr-defined]
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100_000
    ).bind(engine, settings, app_name)


def absolute(settings: Settings) -> Settings:
    """Paths as replicas (other processes, other working folders) must see them."""
    model = settings.model
    if model != "default" and Path(model).exists():
        model = str(Path(model).resolve())
    return settings.replace(store=Path(settings.store).resolve(), cache_dir=Path(settings.cache_dir).resolve(), model=model)


def app_from_namespace(ns: argparse.Namespace) -> serve.Application:
    settings = absolute(from_namespace(ns))
    autoscaling = None
    if ns.replicas == "auto":
        autoscaling = {
            "min_replicas": ns.min_replicas,
            "max_replicas": ns.max_replicas,
            "target_ongoing_requests": ns.target_ongoing_requests,
        }
    return build_app(
        settings,
        ns.replicas,
        max_ongoing_requests=ns.max_ongoing_requests,
        max_tasks_per_replica=ns.max_tasks_per_replica,
        imbalanced_threshold=ns.imbalanced_threshold,
        autoscaling=autoscaling,
        app_name=ns.app_name,
    )


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for `serve run` / `serve deploy` (`import_path: server.deploy.ray_app:app_builder`):
    `args` are `softmux serve-ray` flags with underscores."""
    parser = argparse.ArgumentParser(prog="softmux serve-ray (serve.yaml args)")
    add_ray_arguments(parser)
    return app_from_namespace(parser.parse_args(args_to_argv(args)))


# ---- softmux serve-ray ----------------------------------------------------------------------------
def serve_ray(ns: argparse.Namespace) -> int:
    """Start (or join) Ray, deploy the app on --host:--port, wait for SIGTERM/SIGINT, drain, exit 0."""
    from server.api.logs import configure_logging

    settings = absolute(from_namespace(ns))
    configure_logging(settings.log_level, settings.log_format)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started_ray = False
    if ns.ray_address:
        ray.init(address=ns.ray_address, namespace="serve")
    else:
        replicas = ns.max_replicas if ns.replicas == "auto" else int(ns.replicas)
        cpus = max(os.cpu_count() or 1, replicas * replica_threads(settings))
        ray.init(num_cpus=cpus, include_dashboard=False, namespace="serve", _node_ip_address="127.0.0.1", configure_logging=False)
        started_ray = True
    stop = threading.Event()
    signals: list[int] = []

    def on_signal(sig: int, _frame: Any) -> None:
        signals.append(sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    code = 0
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        handle = serve.run(app_from_namespace(ns), name=ns.app_name, route_prefix="/")
        log.info("serving on http://%s:%d (Ray Serve app %r)", settings.host, settings.port, ns.app_name)
        print(f"softmux serve-ray: ready on http://{settings.host}:{settings.port}", flush=True)
        while not stop.wait(0.5):
            pass
        log.info("signal %s: draining (grace %.1fs)", signals[0] if signals else "?", settings.shutdown_grace)
        finished = handle.drain.remote(settings.shutdown_grace).result(timeout_s=settings.shutdown_grace + 30)
        log.info("drained: %s", "every accepted request finished" if finished else "grace ran out")
    except Exception:
        log.exception("serve-ray failed")
        code = 1
    finally:
        try:
            serve.delete(ns.app_name)
            ray.kill(ray.get_actor(f"softmux-control-{ns.app_name}", namespace="serve"))
        except Exception:
            pass
        if started_ray:
            serve.shutdown()
            ray.shutdown()
    return code
