"""The FastAPI app factory and the uvicorn entry point."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

import server
from server.api import errors, routes
from server.config import Settings
from server.models import LoadedModel
from server.service import Service


def create_app(settings: Settings, loader: Callable[[], LoadedModel] | None = None, *, wait: bool = False) -> FastAPI:
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
    errors.install(app)
    app.include_router(routes.router)
    return app


def run_server(settings: Settings) -> None:
    import uvicorn

    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)
