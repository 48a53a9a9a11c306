"""A small Python client for softmux's native API, sync and async, on httpx.

    from server.client import Client
    with Client("http://127.0.0.1:8000") as c:
        print(c.generate("sentiment", "I loved it", max_new_tokens=8).generated_text)
        for token in c.generate_stream("topic", "GPUs got cheaper"):
            print(token.text, end="")

Errors come back as `SoftmuxError` (status, error_type, message, request id). 429 and 503 are
retried with exponential backoff (honouring `Retry-After`) up to `retries` times; `retries=0`
turns that off. A stream is retried only before its first event.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import httpx

RETRY_STATUSES = frozenset({429, 503})
_STATUS_OF_TYPE = {
    "validation": 422,
    "not_found": 404,
    "generation": 424,
    "overloaded": 429,
    "unhealthy": 503,
}


# ---- results ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Details:
    finish_reason: str  # "length" | "eos_token" | "stop_sequence"
    generated_tokens: int
    input_tokens: int
    virtual_tokens: int
    seed: int | None


@dataclass(frozen=True)
class Generation:
    generated_text: str
    details: Details


@dataclass(frozen=True)
class Token:
    """One streamed token; the last of a stream also has `generated_text` and `details`."""

    id: int
    text: str
    logprob: float
    special: bool
    index: int = 0
    generated_text: str | None = None
    details: Details | None = None


@dataclass(frozen=True)
class Task:
    name: str
    peft_type: str
    num_virtual_tokens: int
    folder: str


@dataclass(frozen=True)
class Tasks:
    tasks: list[Task]
    failed: dict[str, str]  # store folder -> why it was skipped

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]


class SoftmuxError(Exception):
    """An error answer: HTTP `status` (for an error inside a stream, the status its type maps to),
    softmux's `error_type` (validation, not_found, overloaded, unhealthy, generation, ...)."""

    def __init__(self, status: int, error_type: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{status} {error_type}: {message}")
        self.status = status
        self.error_type = error_type
        self.message = message
        self.request_id = request_id


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _details(data: dict[str, Any] | None) -> Details | None:
    return None if data is None else Details(**_known(Details, data))


def _generation(data: dict[str, Any]) -> Generation:
    details = _details(data["details"])
    assert details is not None
    return Generation(generated_text=data["generated_text"], details=details)


def _tasks(data: dict[str, Any]) -> Tasks:
    return Tasks(
        tasks=[Task(**_known(Task, t)) for t in data.get("tasks", [])],
        failed={f["folder"]: f["reason"] for f in data.get("failed", [])},
    )


def _error(response: httpx.Response) -> SoftmuxError:
    rid = response.headers.get("x-request-id")
    try:
        body = response.json()
        error = body.get("error")
        if isinstance(error, dict):  # OpenAI's shape
            return SoftmuxError(
                response.status_code,
                str(error.get("code") or error.get("type")),
                str(error.get("message")),
                rid,
            )
        return SoftmuxError(response.status_code, str(body.get("error_type", "http")), str(error), rid)
    except (ValueError, AttributeError):
        return SoftmuxError(response.status_code, "http", response.text[:500] or response.reason_phrase, rid)


def _token(data: dict[str, Any], request_id: str | None) -> Token:
    if "error" in data:
        error_type = str(data.get("error_type", "generation"))
        raise SoftmuxError(_STATUS_OF_TYPE.get(error_type, 500), error_type, str(data["error"]), request_id)
    tok = data.get("token") or {"id": -1, "text": "", "logprob": 0.0, "special": True}
    return Token(
        id=tok["id"],
        text=tok["text"],
        logprob=tok["logprob"],
        special=tok["special"],
        index=data.get("index", 0),
        generated_text=data.get("generated_text"),
        details=_details(data.get("details")),
    )


def _sse_data(line: str) -> dict[str, Any] | None:
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    return None if not payload or payload == "[DONE]" else json.loads(payload)


def _payload(task: str, inputs: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"task": task, "inputs": inputs, "parameters": {k: v for k, v in params.items() if v is not None}}


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 3  # extra attempts after the first; 0: no retries
    backoff: float = 0.5  # first wait, doubled each retry
    max_backoff: float = 8.0  # no wait is longer, Retry-After included

    def delay(self, attempt: int, response: httpx.Response) -> float:
        """Seconds before attempt `attempt + 1`: Retry-After when the server gave one, else
        backoff * 2**attempt with jitter."""
        header = response.headers.get("retry-after")
        if header is not None:
            try:
                return min(max(float(header), 0.0), self.max_backoff)
            except ValueError:
                try:  # an HTTP date
                    when = email.utils.parsedate_to_datetime(header)
                    return min(max(when.timestamp() - time.time(), 0.0), self.max_backoff)
                except (TypeError, ValueError):
                    pass
        base = min(self.backoff * (2**attempt), self.max_backoff)
        return base * (0.5 + random.random() / 2)


# ---- sync --------------------------------------------------------------------------------------
class Client:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        headers: dict[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.retry = RetryPolicy(retries, backoff, max_backoff)
        self._sleep = sleep
        self._http = httpx.Client(base_url=base_url, timeout=timeout, headers=headers, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, *, stream: bool = False, **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            request = self._http.build_request(method, path, **kwargs)
            response = self._http.send(request, stream=stream)
            if response.status_code < 400:
                return response
            if stream:
                response.read()
                response.close()
            if response.status_code in RETRY_STATUSES and attempt < self.retry.retries:
                self._sleep(self.retry.delay(attempt, response))
                attempt += 1
                continue
            raise _error(response)

    def generate(
        self, task: str, inputs: str, *, request_id: str | None = None, **parameters: Any
    ) -> Generation:
        """`parameters`: /generate's (max_new_tokens, temperature, top_k, top_p, repetition_penalty,
        frequency_penalty, stop, seed, do_sample, ignore_eos, priority, top_n_tokens, grammar={"type": "json"
        | "regex", "value": ...})."""
        headers = {"x-request-id": request_id} if request_id else None
        return _generation(
            self._send("POST", "/generate", json=_payload(task, inputs, parameters), headers=headers).json()
        )

    def generate_stream(
        self, task: str, inputs: str, *, request_id: str | None = None, **parameters: Any
    ) -> Iterator[Token]:
        """Yield tokens as they come; leaving the loop early closes the stream (and cancels the request)."""
        headers = {"x-request-id": request_id} if request_id else None
        response = self._send(
            "POST", "/generate_stream", stream=True, json=_payload(task, inputs, parameters), headers=headers
        )
        rid = response.headers.get("x-request-id")
        try:
            for line in response.iter_lines():
                data = _sse_data(line)
                if data is not None:
                    yield _token(data, rid)
        finally:
            response.close()

    def tasks(self) -> Tasks:
        return _tasks(self._send("GET", "/tasks").json())

    def health(self) -> dict[str, Any]:
        return self._send("GET", "/health").json()

    def info(self) -> dict[str, Any]:
        return self._send("GET", "/info").json()


# ---- async -------------------------------------------------------------------------------------
class AsyncClient:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        headers: dict[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.retry = RetryPolicy(retries, backoff, max_backoff)
        self._sleep = sleep
        self._http = httpx.AsyncClient(
            base_url=base_url, timeout=timeout, headers=headers, transport=transport
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, path: str, *, stream: bool = False, **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            request = self._http.build_request(method, path, **kwargs)
            response = await self._http.send(request, stream=stream)
            if response.status_code < 400:
                return response
            if stream:
                await response.aread()
                await response.aclose()
            if response.status_code in RETRY_STATUSES and attempt < self.retry.retries:
                await self._sleep(self.retry.delay(attempt, response))
                attempt += 1
                continue
            raise _error(response)

    async def generate(
        self, task: str, inputs: str, *, request_id: str | None = None, **parameters: Any
    ) -> Generation:
        headers = {"x-request-id": request_id} if request_id else None
        response = await self._send(
            "POST", "/generate", json=_payload(task, inputs, parameters), headers=headers
        )
        return _generation(response.json())

    async def generate_stream(
        self, task: str, inputs: str, *, request_id: str | None = None, **parameters: Any
    ) -> AsyncIterator[Token]:
        headers = {"x-request-id": request_id} if request_id else None
        response = await self._send(
            "POST", "/generate_stream", stream=True, json=_payload(task, inputs, parameters), headers=headers
        )
        rid = response.headers.get("x-request-id")
        try:
            async for line in response.aiter_lines():
                data = _sse_data(line)
                if data is not None:
                    yield _token(data, rid)
        finally:
            await response.aclose()

    async def tasks(self) -> Tasks:
        return _tasks((await self._send("GET", "/tasks")).json())

    async def health(self) -> dict[str, Any]:
        return (await self._send("GET", "/health")).json()

    async def info(self) -> dict[str, Any]:
        return (await self._send("GET", "/info")).json()
