"""Bearer-token checks: the admin token for admin routes, the optional API key for generation routes.

Tokens are compared with `hmac.compare_digest` (constant time). The API-key check is an ASGI
middleware keyed on path prefixes, so every generation route (native, streaming, OpenAI-style
`/v1/*`) is covered however it is registered; streaming responses pass through untouched.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request

from server.api.errors import ApiError, send_json
from server.config import Settings

# Paths that run the model: /generate, /generate_stream, /v1/completions, /v1/chat/completions, /v1/models ...
GENERATION_PREFIXES = ("/generate", "/v1/")

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class Unauthorized(ApiError):
    status_code, error_type = 401, "unauthorized"


class Forbidden(ApiError):
    status_code, error_type = 403, "forbidden"


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def token_matches(given: str | None, expected: str) -> bool:
    # compare_digest on bytes: constant time for equal lengths, and never short-circuits on content.
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def require_admin(request: Request) -> None:
    """FastAPI dependency for admin routes: 403 when no admin token is configured,
    401 when it does not match."""
    settings: Settings = request.app.state.service.settings
    if not settings.admin_token:
        raise Forbidden(
            "admin routes are disabled: start the server with --admin-token TOKEN "
            "(or set SOFTMUX_ADMIN_TOKEN) and send 'Authorization: Bearer TOKEN'"
        )
    if not token_matches(bearer_token(request.headers.get("authorization")), settings.admin_token):
        raise Unauthorized("missing or wrong admin token: send 'Authorization: Bearer <admin token>'")


class ApiKeyMiddleware:
    """Rejects requests to generation paths without `Authorization: Bearer <api key>` (401)."""

    def __init__(self, app: ASGIApp, api_key: str, prefixes: tuple[str, ...] = GENERATION_PREFIXES) -> None:
        self.app = app
        self.api_key = api_key
        self.prefixes = prefixes

    async def __call__(
        self, scope: Scope, receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]
    ) -> None:
        if scope["type"] == "http" and scope.get("path", "").startswith(self.prefixes):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            if not token_matches(bearer_token(headers.get("authorization")), self.api_key):
                payload = {
                    "error": "missing or wrong API key: send 'Authorization: Bearer <api key>'",
                    "error_type": "unauthorized",
                }
                await send_json(send, 401, payload, ((b"www-authenticate", b"Bearer"),))
                return
        await self.app(scope, receive, send)


def install(app: FastAPI, settings: Settings) -> None:
    """Add the API-key middleware when an API key is configured (generation routes are open otherwise)."""
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
