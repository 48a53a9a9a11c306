"""Request-body size limit (413) and the uvicorn server that drains the engine on SIGTERM."""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from types import FrameType
from typing import Any

import uvicorn

from server.api.errors import OPENAI_PREFIX, openai_body, send_json
from server.service import Service

log = logging.getLogger("softmux.server")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _is_upload(scope: Scope) -> bool:
    """PUT /tasks/{name}: adapter uploads have their own, larger limit (--max-upload-bytes, admin.py)."""
    return scope.get("method") == "PUT" and scope.get("path", "").startswith("/tasks/")


class BodyLimitMiddleware:
    """Answers 413 (TGI's error shape; OpenAI's on /v1/) to bodies over `limit` bytes.

    A declared Content-Length over the limit is refused before reading anything; a chunked body
    is read up to the limit and then refused, or replayed to the app when it fits.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.limit <= 0 or _is_upload(scope):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            size = int(declared) if declared.strip().isdigit() else -1
            if size > self.limit:
                await self._refuse(
                    scope, send, f"request body is {size} bytes; at most {self.limit} are accepted"
                )
                return
            await self.app(scope, receive, send)  # the server stops at Content-Length bytes
            return
        # No Content-Length (chunked): read it here, up to the limit.
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.limit:
                await self._refuse(
                    scope, send, f"request body is over {self.limit} bytes; at most {self.limit} are accepted"
                )
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for http.disconnect

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: Scope, send: Send, message: str) -> None:
        if scope.get("path", "").startswith(OPENAI_PREFIX):
            payload: dict[str, Any] = openai_body(message, "server_error", code="request_too_large")
        else:
            payload = {"error": message, "error_type": "too_large"}
        await send_json(send, 413, payload, ((b"connection", b"close"),))


class DrainingServer(uvicorn.Server):
    """uvicorn, with a graceful drain on the first SIGTERM/SIGINT.

    While draining the socket stays open: new requests get 503 (and /ready says 503, so a load
    balancer stops sending), accepted requests run to their end for up to `grace` seconds, and
    those still running then fail with "the server is shutting down" (never dropped silently).
    Only then does uvicorn's own shutdown start; the process exits 0. A second signal forces exit.
    """

    def __init__(self, config: uvicorn.Config, service: Service, grace: float) -> None:
        super().__init__(config)
        self.service = service
        self.grace = grace
        self._drain_thread: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_thread is not None:  # second signal: stop now
            log.warning("signal %d during drain: exiting now", sig)
            self.should_exit = self.force_exit = True
            return
        log.info("signal %d: draining (grace %.1fs)", sig, self.grace)
        self._drain_thread = threading.Thread(target=self._drain, name="softmux-drain", daemon=True)
        self._drain_thread.start()

    def _drain(self) -> None:
        try:
            self.service.drain(self.grace)
        except Exception:  # pragma: no cover - exit anyway
            log.exception("drain failed")
        finally:
            self.should_exit = True
