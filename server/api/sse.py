"""Server-sent events that notice a client leaving even while no token is due.

Starlette's StreamingResponse, under ASGI spec 2.4 (uvicorn), only learns of a disconnect when
a write fails, i.e. at the next token; a request still waiting in the queue or in a long
prefill would keep its place. This response always listens for `http.disconnect` next to the
stream and calls `on_close` however the stream ends, so the engine drops the row at its next step.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


def sse(data: Any) -> bytes:
    """One `data:` event; a str is sent as is (e.g. OpenAI's `[DONE]`), anything else as JSON."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


class EventStream(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[bytes],
        on_close: Callable[[], None],
        background: BackgroundTask | None = None,
    ) -> None:
        super().__init__(
            events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, background=background
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the socket went away mid-write
                        pass
                    tg.cancel_scope.cancel()

                async def listen() -> None:
                    await self.listen_for_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                tg.start_soon(listen)
        finally:
            self._on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
        if self.background is not None:
            await self.background()
