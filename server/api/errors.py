"""Errors at the edge: domain errors (`server.errors`) and HTTP-layer errors become TGI's shape,
`{"error": ..., "error_type": ...}`, on native routes and OpenAI's, `{"error": {"message", "type",
"param", "code"}}`, on /v1/ routes. `SHAPES` is the one table from a domain error kind to its status."""

from __future__ import annotations

import errno
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.errors import DomainError, ErrorKind, InvalidRequest, UnknownTask


async def send_json(
    send: Callable[[Any], Awaitable[None]],
    status: int,
    payload: dict[str, Any],
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    """A whole JSON reply over raw ASGI, for middleware that answers before the app runs."""
    body = json.dumps(payload).encode()
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": body})


class ApiError(Exception):
    """An error of the HTTP layer itself (auth, body size, a client gone): its status and TGI error_type.

    What goes wrong with a request below the API is a `server.errors.DomainError`; `SHAPES` maps it.
    """

    status_code = 500
    error_type = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Shape:
    """How one kind of domain error looks on the wire."""

    status: int
    error_type: str  # TGI's error_type (also the Prometheus outcome label of a refused request)
    openai_type: str  # OpenAI's error.type
    retry_after: bool = False  # worth retrying: answer with Retry-After


SHAPES: dict[ErrorKind, Shape] = {
    ErrorKind.UNKNOWN_TASK: Shape(404, "not_found", "invalid_request_error"),
    ErrorKind.INVALID_REQUEST: Shape(422, "validation", "invalid_request_error"),
    ErrorKind.OVERLOADED: Shape(429, "overloaded", "rate_limit_error", retry_after=True),
    ErrorKind.UNAVAILABLE: Shape(503, "unhealthy", "server_error", retry_after=True),
    ErrorKind.GENERATION_FAILED: Shape(424, "generation", "server_error"),
}


def tgi_error(kind: ErrorKind, message: str) -> dict[str, Any]:
    """TGI's error body, also the payload of a failed stream's last event."""
    return {"error": message, "error_type": SHAPES[kind].error_type}


def openai_error(exc: DomainError) -> dict[str, Any]:
    """OpenAI's error body for a domain error: the task is the `model`, an invalid field the `param`."""
    shape = SHAPES[exc.kind]
    if isinstance(exc, UnknownTask):
        return openai_body(
            exc.describe("model (task)"), shape.openai_type, param="model", code="model_not_found"
        )
    param = exc.field if isinstance(exc, InvalidRequest) else None
    return openai_body(exc.message, shape.openai_type, param=param, code=shape.error_type)


def _describe(error: dict[str, Any]) -> str:
    """One pydantic error as 'field: what is wrong (got X)'."""
    loc = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
    msg = error.get("msg", "invalid")
    if error.get("type") in {"json_invalid", "missing", "extra_forbidden", "model_attributes_type"}:
        return f"{loc}: {msg}"
    value = repr(error.get("input"))
    return f"{loc}: {msg} (got {value[:80]})"


OPENAI_PREFIX = "/v1/"
_HTTP_OPENAI_TYPES = {"validation": "invalid_request_error", "not_found": "invalid_request_error"}


def openai_body(
    message: str, openai_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": openai_type, "param": param, "code": code}}


def error_response(
    request: Request,
    status: int,
    message: str,
    error_type: str,
    *,
    headers: Mapping[str, str] | None = None,
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    """An HTTP-layer error: TGI's shape on native routes, OpenAI's on /v1/ routes."""
    if request.url.path.startswith(OPENAI_PREFIX):
        body = openai_body(
            message, _HTTP_OPENAI_TYPES.get(error_type, "server_error"), param, code or error_type
        )
    else:
        body = {"error": message, "error_type": error_type}
    return JSONResponse(body, status_code=status, headers=headers)


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def install(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain_error(request: Request, exc: DomainError) -> JSONResponse:
        """The one place where a domain error becomes an HTTP answer."""
        shape = SHAPES[exc.kind]
        headers = {"Retry-After": "1"} if shape.retry_after else None
        body = (
            openai_error(exc)
            if request.url.path.startswith(OPENAI_PREFIX)
            else tgi_error(exc.kind, exc.message)
        )
        return JSONResponse(body, status_code=shape.status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request, exc.status_code, exc.message, exc.error_type)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        message = "; ".join(_describe(e) for e in errors)
        first = next((".".join(str(p) for p in e.get("loc", ()) if p != "body") for e in errors), "") or None
        return error_response(request, 422, message, "validation", param=first, code="invalid_value")

    @app.exception_handler(OSError)
    async def _os_error(request: Request, exc: OSError) -> JSONResponse:
        """Disk trouble (the store full or read-only, on an upload or delete): say so, never a bare 500."""
        reason = exc.strerror or str(exc)
        if exc.errno in _FULL:
            return error_response(request, 507, f"the prompt store is full: {reason}", "insufficient_storage")
        if exc.errno in _READ_ONLY:
            return error_response(
                request,
                503,
                f"the prompt store is not writable: {reason}",
                "store_unavailable",
                headers={"Retry-After": "60"},
            )
        raise exc  # anything else stays an internal error (500, logged with its traceback)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = "not_found" if exc.status_code == 404 else "http"
        return error_response(request, exc.status_code, str(exc.detail), error_type, headers=exc.headers)
