"""The asyncio side of one submitted request: its events as the engine thread hands them over."""

from __future__ import annotations

import asyncio
import logging

from server.engine.engine import Engine
from server.engine.request import ErrorEvent, Event, FinishEvent, Request, TokenEvent
from server.errors import ErrorKind, GenerationFailed, error_of

log = logging.getLogger("softmux.service")


class Generation:
    """One submitted request: iterate it for its events (the last is a FinishEvent or an
    ErrorEvent). `cancel()` (idempotent, a no-op once it ended) makes the engine drop its row
    at its next step; callers must call it when they stop listening early."""

    def __init__(self, request: Request, queue: asyncio.Queue[Event], engine: Engine) -> None:
        self.request = request
        self._queue = queue
        self._engine = engine
        self.done = False

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> Event:
        if self.done:
            raise StopAsyncIteration
        while True:
            try:  # wake up now and then: a request must not wait forever on an engine that died
                event = await asyncio.wait_for(self._queue.get(), timeout=1.0)
                break
            except TimeoutError:
                if not self._engine.alive and self._queue.empty():
                    # A loop that died fails what it held with this same event; its own may still be in
                    # flight to this queue, and the answer must not depend on which arrives first.
                    error = self._engine.error
                    event = (
                        ErrorEvent(f"engine failure: {error}", ErrorKind.GENERATION_FAILED)
                        if error is not None
                        else ErrorEvent("the engine stopped: shut down", ErrorKind.UNAVAILABLE)
                    )
                    break
        if not isinstance(event, TokenEvent):
            self.done = True
            how = (
                event.finish_reason.value if isinstance(event, FinishEvent) else f"error ({event.kind.value})"
            )
            log.info(
                "request %d (task %r) ended: %s, %d token(s)",
                self.request.id,
                self.request.task,
                how,
                len(self.request.output_ids),
            )
        return event

    def cancel(self) -> None:
        if not self.done:
            self.done = True
            self.request.cancel()
            self._engine.notify()


async def result(generation: Generation) -> FinishEvent:
    async for event in generation:
        if isinstance(event, ErrorEvent):
            raise error_of(event.kind, event.message)
        if isinstance(event, FinishEvent):
            return event
    raise GenerationFailed("the request ended without a result")
