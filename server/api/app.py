"""The FastAPI app factory and the uvicorn entry point."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

import server
from server.api import admin, auth, errors, openai_compat, routes
from server.api.limits import BodyLimitMiddleware, DrainingServer
from server.api.logs import RequestIdMiddleware, configure_logging
from server.config import Settings
from server.models import LoadedModel
from server.service import Service


def create_app(
    settings: Settings, loader: Callable[[], LoadedModel] | None = None, *, wait: bool = False
) -> FastAPI:
    """Build the app. The model loads in a background thread at startup (routes answer 503 until
    it is ready), unless `wait` is set, as tests do, to block startup until it is loaded."""
    service = Service(settings, loader)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loading = threading.Thread(target=service.start, name="softmux-load", daemon=True)
        loading.start()
        if wait:
            loading.join()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(title="softmux", version=server.__version__, lifespan=lifespan)
    app.state.service = service
    app.state.admin_lock = threading.Lock()  # serialises this server's store writes (admin routes)
    errors.install(app)
    app.include_router(routes.router)
    app.include_router(openai_compat.router)
    app.include_router(admin.router)
    auth.install(app, settings)  # API key on generation routes, when one is configured
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)  # 413 for oversized bodies
    app.add_middleware(RequestIdMiddleware)
    return app


def run_server(settings: Settings) -> None:
    import uvicorn

    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    # log_config=None keeps our handler (request ids, JSON); our middleware writes the access lines.
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,
        access_log=False,
        limit_concurrency=settings.limit_concurrency or None,
        timeout_keep_alive=settings.timeout_keep_alive,
        # after the drain every accepted request has its answer; this bounds
        # how long slow readers may hold their connection open
        timeout_graceful_shutdown=max(math.ceil(settings.shutdown_grace), 1),
    )
    # SIGTERM/SIGINT: drain the engine (503 for new requests, accepted ones finish), then exit 0.
    server = DrainingServer(config, app.state.service, settings.shutdown_grace)
    threading.Thread(
        target=_exit_if_unservable, args=(server,), name="softmux-startup-watch", daemon=True
    ).start()
    server.run()
    error = app.state.service.load_error
    if error is not None:
        raise SystemExit(f"softmux serve: the model cannot be served: {error}")


def _exit_if_unservable(server: DrainingServer) -> None:
    """A model that fails to load (unsupported, limits it cannot hold, a broken folder) stops the process
    with the reason, instead of leaving a server that is never ready."""
    service = server.service
    while not service.ready.is_set() and service.load_error is None:
        time.sleep(0.2)
    if service.load_error is not None:
        server.should_exit = True
