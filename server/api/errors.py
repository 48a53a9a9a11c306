"""Errors in TGI's shape, `{"error": ..., "error_type": ...}`, and the handlers that produce them."""

from __future__ import annotations

import errno
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    """An error a client should see: HTTP status, TGI error_type and a message saying what to change."""

    status_code = 500
    error_type = "internal"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        extra = {k: v for k, v in self.extra.items() if k not in {"param", "code"}}
        return {"error": self.message, "error_type": self.error_type, **extra}


class ValidationFailed(ApiError):
    status_code, error_type = 422, "validation"


class NotFound(ApiError):
    status_code, error_type = 404, "not_found"


class Overloaded(ApiError):
    status_code, error_type = 429, "overloaded"


class Unavailable(ApiError):
    status_code, error_type = 503, "unhealthy"


class GenerationFailed(ApiError):
    status_code, error_type = 424, "generation"


def _describe(error: dict[str, Any]) -> str:
    """One pydantic error as 'field: what is wrong (got X)'."""
    loc = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
    msg = error.get("msg", "invalid")
    if error.get("type") in {"json_invalid", "missing", "extra_forbidden", "model_attributes_type"}:
        return f"{loc}: {msg}"
    value = repr(error.get("input"))
    return f"{loc}: {msg} (got {value[:80]})"


OPENAI_PREFIX = "/v1/"
_OPENAI_TYPES = {
    "validation": "invalid_request_error",
    "not_found": "invalid_request_error",
    "overloaded": "rate_limit_error",
    "unhealthy": "server_error",
    "generation": "server_error",
}


def openai_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": _OPENAI_TYPES.get(error_type, "server_error"),
                      "param": param, "code": code or error_type}}


def error_response(
    request: Request, status: int, message: str, error_type: str, *,
    headers: dict[str, str] | None = None, param: str | None = None, code: str | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    """TGI's shape on native routes, OpenAI's on /v1/ routes."""
    if request.url.path.startswith(OPENAI_PREFIX):
        body = openai_body(message, error_type, param, code)
    else:
        body = {"error": message, "error_type": error_type, **(extra or {})}
    return JSONResponse(body, status_code=status, headers=headers)


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if isinstance(exc, (Overloaded, Unavailable)) else None
        extra = {k: v for k, v in exc.extra.items() if k not in {"param", "code"}}
        return error_response(request, exc.status_code, exc.message, exc.error_type, headers=headers,
                              param=exc.extra.get("param"), code=exc.extra.get("code"), extra=extra)

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
            return error_response(request, 503, f"the prompt store is not writable: {reason}", "store_unavailable",
                                  headers={"Retry-After": "60"})
        raise exc  # anything else stays an internal error (500, logged with its traceback)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = "not_found" if exc.status_code == 404 else "http"
        return error_response(request, exc.status_code, str(exc.detail), error_type, headers=exc.headers)
