"""Errors in TGI's shape, `{"error": ..., "error_type": ...}`, and the handlers that produce them."""

from __future__ import annotations

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
        return {"error": self.message, "error_type": self.error_type, **self.extra}


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


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if isinstance(exc, (Overloaded, Unavailable)) else None
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message = "; ".join(_describe(e) for e in exc.errors())
        return JSONResponse({"error": message, "error_type": "validation"}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = "not_found" if exc.status_code == 404 else "http"
        return JSONResponse({"error": str(exc.detail), "error_type": error_type}, status_code=exc.status_code)
