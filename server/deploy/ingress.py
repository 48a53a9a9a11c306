"""The HTTP ingress deployment (`SoftmuxIngress`): the FastAPI app Ray's proxy hands every request to.

`/stats` and `/metrics` fan out to every replica through the control actor; everything else is forwarded, with
its task as `multiplexed_model_id`, to one engine replica (retried once on another if that one dies before
answering or refuses it with 429), and a 2xx admin write is broadcast as a store change. It also holds the
body limits and the SIGTERM drain. Its own module: it talks to replicas only through a deployment handle and
the control actor, never by importing the replica's code.
"""

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from ray import serve
from ray.exceptions import RayError
from ray.serve.handle import DeploymentHandle
from starlette.responses import JSONResponse, Response, StreamingResponse

from server.config import Settings
from server.deploy.control import get_control
from server.deploy.options import APP_NAME
from server.deploy.wire import AVOID_PREFIX, REPLICA_HEADER, WireRequest, WireStart, merge_metrics, task_of

log = logging.getLogger("softmux.deploy")

INGRESS = "SoftmuxIngress"
INGRESS_ID = "ingress"
_UPLOAD_OVERHEAD = 64 << 10  # multipart headers on top of --max-upload-bytes (as admin.py allows)


ingress_app = FastAPI(title="softmux (Ray Serve)", docs_url=None, redoc_url=None, openapi_url=None)
_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


def _error(
    path: str, status: int, message: str, error_type: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    from server.api.errors import OPENAI_PREFIX, openai_body

    body = (
        openai_body(message, error_type)
        if path.startswith(OPENAI_PREFIX)
        else {"error": message, "error_type": error_type}
    )
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
        self.counts: Counter[str] = (
            Counter()
        )  # forwarded, retried, overloaded_retried, failed (replica died), streams_broken

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
                for k in ("forwarded", "retried", "overloaded_retried", "failed", "streams_broken")
            ),
        ]
        ids = ",".join(got["answers"]) or INGRESS_ID
        return Response(
            text + "\n".join(own) + "\n",
            media_type="text/plain; version=0.0.4; charset=utf-8",
            headers={REPLICA_HEADER: ids},
        )

    # ---- everything else: forwarded to one engine replica -----------------------------------------
    @ingress_app.api_route("/{path:path}", methods=_METHODS)
    async def forward(self, path: str, request: Request) -> Response:
        url_path = request.url.path
        if self.draining and url_path != "/health":
            return _error(
                url_path,
                503,
                "the server is shutting down and accepts no new requests",
                "unhealthy",
                {"Retry-After": "1"},
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
                response = StreamingResponse(
                    self._rest(gen, start, url_path, release), status_code=start.status
                )
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
        too_big = _error(
            path, 413, f"request body is over {limit} bytes; at most {limit} are accepted", "too_large"
        )
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
        """Send the request to a replica and wait for its answer to start. If that replica dies first,
        try once more on another one, then give up with a retryable 503. If it refuses with 429 (its
        queue, or the task's share of it, is full), try once more on the least loaded replica: a task
        is never refused on its home replica while another one has room."""
        avoid = ""  # after a 429: the replica that refused, which the router then passes over
        for attempt in (1, 2):
            handle = self.engine.options(stream=True, multiplexed_model_id=task or "", session_id=avoid)
            gen: Any = handle.handle_http.remote(wire)
            try:
                start = await gen.__anext__()
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
                break
            if start.status == 429 and attempt == 1 and task:
                gen.cancel()
                self.counts["overloaded_retried"] += 1
                avoid = AVOID_PREFIX + start.replica
                continue
            self.counts["forwarded"] += 1
            return gen, start
        return _error(
            wire.path,
            503,
            "the engine replica running this request failed, and so did the retry; retry shortly",
            "unhealthy",
            {"Retry-After": "1"},
        )

    async def _rest(
        self, gen: Any, start: WireStart, path: str, release: Callable[[], None]
    ) -> AsyncIterator[bytes]:
        finished = False
        try:
            if start.body:
                yield start.body
            async for chunk in gen:
                yield chunk
            finished = True
        except RayError as exc:
            self.counts["streams_broken"] += 1
            log.warning(
                "%s: engine replica %s failed mid-answer (%s)", path, start.replica, type(exc).__name__
            )
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
