"""What travels between the Ray ingress and the engine replicas, without Ray itself.

The ingress forwards each HTTP request as a `WireRequest` (method, path, query, headers, body)
to one engine replica; the replica runs it through its own copy of the same FastAPI app that
`softmux serve` uses, and streams back the ASGI messages: first a `WireStart` (status, headers),
then body chunks (bytes). So every route answers exactly as with `softmux serve`.
Also here: which task a request names (the routing key), and merging the replicas' Prometheus
texts under a `replica` label.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("softmux.deploy")

REPLICA_HEADER = "x-softmux-replica"
AVOID_PREFIX = "avoid:"  # a request's session_id "avoid:<replica>": the router sends it to another replica
Headers = list[tuple[bytes, bytes]]
ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]


@dataclass(frozen=True)
class WireRequest:
    method: str
    path: str
    query_string: bytes = b""
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] | None = None

    def scope(self) -> dict[str, Any]:
        """An ASGI HTTP scope for this request, as uvicorn would build it."""
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": self.method,
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "root_path": "",
            "query_string": self.query_string,
            "headers": list(self.headers),
            "client": self.client,
            "server": ("127.0.0.1", 0),
            "state": {},
        }


@dataclass(frozen=True)
class WireStart:
    """The answer's status and headers with its first body chunk (a whole JSON answer travels as
    one item: a replica that dies can never leave half of it); `more`: chunks follow (a stream)."""

    status: int
    headers: Headers
    replica: str
    body: bytes = b""
    more: bool = False


def task_of(method: str, path: str, body: bytes) -> str | None:
    """The task a generation request names (`task` on native routes, `model` on /v1/): the
    routing key that sends a task's requests to the replica where its prompt is resident."""
    if method != "POST" or not body or not (path.startswith("/generate") or path.startswith("/v1/")):
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    name = data.get("model" if path.startswith("/v1/") else "task")
    return name if isinstance(name, str) and 0 < len(name) <= 128 else None


async def run_asgi(app: ASGIApp, request: WireRequest, replica: str) -> AsyncIterator[WireStart | bytes]:
    """Run one request through an in-process ASGI app; yield its start, then its body chunks.

    Closing the iterator early (the client left, the ingress cancelled) tells the app the client
    disconnected and cancels it, so the engine drops the request's row at its next step.
    """
    queue: asyncio.Queue[MutableMapping[str, Any] | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        await queue.put(message)

    async def run() -> None:
        try:
            await app(request.scope(), receive, send)
        except Exception:  # Starlette already answered 500 when it could; log and end the stream
            log.exception("request %s %s failed in the replica", request.method, request.path)
        finally:
            await queue.put(None)

    task = asyncio.create_task(run())
    start: MutableMapping[str, Any] | None = None
    sent = False
    try:
        while True:
            message = await queue.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                start = message
                continue
            if message["type"] != "http.response.body":
                continue
            chunk, more = bytes(message.get("body", b"")), bool(message.get("more_body", False))
            if not sent and start is not None:
                headers = [
                    (k, v) for k, v in start.get("headers", []) if k.lower() != REPLICA_HEADER.encode()
                ]
                headers.append((REPLICA_HEADER.encode(), replica.encode()))
                sent = True
                yield WireStart(
                    status=int(start["status"]), headers=headers, replica=replica, body=chunk, more=more
                )
            elif chunk:
                yield chunk
            if not more:
                break
        if not sent:  # the app ended without answering (should not happen)
            body = json.dumps(
                {"error": "the replica ended the request without an answer", "error_type": "internal"}
            ).encode()
            yield WireStart(
                500,
                [(b"content-type", b"application/json"), (REPLICA_HEADER.encode(), replica.encode())],
                replica,
                body,
            )
    finally:
        gone.set()
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=1.0)
            except (TimeoutError, Exception):
                task.cancel()


def _with_label(sample: str, replica: str) -> str:
    """`name{a="b"} 1` -> `name{replica="r",a="b"} 1`; `name 1` -> `name{replica="r"} 1`."""
    cut = min((i for i in (sample.find("{"), sample.find(" ")) if i >= 0), default=-1)
    if cut < 0:
        return sample
    label = f'replica="{replica}"'
    if sample[cut] == "{":
        rest = sample[cut + 1 :]
        return f"{sample[:cut]}{{{label}{'' if rest.startswith('}') else ','}{rest}"
    return f"{sample[:cut]}{{{label}}}{sample[cut:]}"


def merge_metrics(texts: dict[str, str]) -> str:
    """Merge Prometheus text expositions of several replicas into one, each sample labelled with
    its replica; each family's HELP/TYPE lines appear once, its samples together."""
    order: list[str] = []
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for replica, text in texts.items():
        family = ""
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    if family not in headers:
                        order.append(family)
                        headers[family], samples[family] = [], []
                    if not any(h.split(None, 3)[1] == parts[1] for h in headers[family]):
                        headers[family].append(line)
                continue
            if family not in samples:
                order.append(family)
                headers[family], samples[family] = [], []
            samples[family].append(_with_label(line, replica))
    out: list[str] = []
    for family in order:
        out.extend(headers[family])
        out.extend(samples[family])
    return "\n".join(out) + "\n"
