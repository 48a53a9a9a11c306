"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

`model` names the task (its soft prompt goes in front of everything, chat template included);
an unknown model is a 404 in OpenAI's error shape, never a fallback to the base model.
Errors on these routes use `{"error": {"message", "type", "param", "code"}}` (see errors.py).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import anyio
from fastapi import APIRouter, Request

from server.api.errors import openai_error
from server.api.logprobs import chat_logprobs, completion_logprobs
from server.api.openai_schemas import COMPLETIONS_MAX_TOKENS, ChatCompletionRequest, CompletionRequest
from server.api.routes import samples_stream, samples_unless_gone
from server.api.sse import sse
from server.engine.request import (
    ErrorEvent,
    Event,
    FinishEvent,
    FinishReason,
    TokenEvent,
    TokenLogprob,
)
from server.errors import InvalidRequest, UnknownTask, error_of
from server.generation import Generation
from server.prompts.registry import Registry
from server.prompts.settings import DEFAULT_SETTINGS
from server.service import Service

router = APIRouter(prefix="/v1", tags=["openai"])


def _service(request: Request) -> Service:
    return request.app.state.service


def _finish_reason(reason: FinishReason) -> str:
    """OpenAI knows "stop" and "length"; a request cut short by its deadline was truncated: "length"."""
    return "length" if reason in (FinishReason.LENGTH, FinishReason.TIMEOUT) else "stop"


def _usage(events: list[FinishEvent]) -> dict[str, int]:
    """OpenAI's counts: the prompt once, the completion tokens of every choice; the task's virtual
    tokens are reported apart."""
    prompt, completion = events[0].input_tokens, sum(e.generated_tokens for e in events)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "virtual_tokens": events[0].virtual_tokens,
    }


async def _merged(generations: list[Generation]) -> AsyncIterator[tuple[int, Event]]:
    """Every sample's events as they come, tagged with the sample's index."""
    if len(generations) == 1:
        async for event in generations[0]:
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, Event | None]] = asyncio.Queue()

    async def pump(i: int, generation: Generation) -> None:
        async for event in generation:
            await queue.put((i, event))
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    try:
        open_ = len(tasks)
        while open_:
            i, item = await queue.get()
            if item is None:
                open_ -= 1
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


Chunk = Callable[
    ..., dict[str, Any]
]  # chunk(text, finish_reason, first, logprobs=None, index=0) -> one chunk


async def _openai_stream(
    generations: list[Generation],
    chunk: Chunk,
    include_usage: bool,
    logprobs: Callable[[int, TokenEvent], Any] | None = None,
) -> AsyncIterator[bytes]:
    """`chunk` builds one chunk of choice `index`; each choice ends with its finish chunk; then the
    usage chunk if asked, then [DONE]. With `logprobs` every token gets a chunk (its text may be ""),
    carrying its log-probabilities. An error ends the stream."""
    first = [True] * len(generations)
    finished: list[FinishEvent] = []
    async for i, event in _merged(generations):
        if isinstance(event, TokenEvent):
            if logprobs is not None:
                yield sse(chunk(event.text, None, first[i], logprobs(i, event), index=i))
                first[i] = False
            elif event.text or first[i]:
                yield sse(chunk(event.text, None, first[i], index=i))
                first[i] = False
        elif isinstance(event, FinishEvent):
            yield sse(chunk("", _finish_reason(event.finish_reason), first[i], index=i))
            finished.append(event)
        elif isinstance(event, ErrorEvent):
            yield sse(openai_error(error_of(event.kind, event.message)))
            return
    if include_usage and finished:
        final = chunk("", None, False)
        final["choices"], final["usage"] = [], _usage(finished)
        yield sse(final)
    yield sse("[DONE]")


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    """Every task, as an OpenAI model."""
    _, registry, _ = _service(request).require_ready()
    return {"object": "list", "data": [_model_card(name, registry) for name in registry.names()]}


@router.get("/models/{model}")
async def get_model(model: str, request: Request) -> dict[str, Any]:
    _, registry, _ = _service(request).require_ready()
    if model not in registry:
        raise UnknownTask(model)
    return _model_card(model, registry)


def _model_card(name: str, registry: Registry) -> dict[str, Any]:
    """OpenAI's model object, plus the task's contract: the output every answer matches, its defaults."""
    info = registry.info(name)
    settings = DEFAULT_SETTINGS if info is None else info.settings
    contract = {"output": settings.output, "defaults": settings.defaults.given()}
    return {"id": name, "object": "model", "created": 0, "owned_by": "softmux", "contract": contract}


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    service = _service(request)
    limit = (
        COMPLETIONS_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    )  # an explicit null: OpenAI's default
    prepared = await service.prepare(
        body.model,
        body.text,
        body.sampling(limit),
        names=("prompt", "max_tokens"),
        priority=body.priority,
        priority_name="priority",
        output=body.output(),
        explicit=body.explicit,
    )
    prepared = replace(prepared, n=body.n or 1)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    tokenizer = service.require_ready()[2].tokenizer

    def chunk(
        text: str, finish: str | None, _: bool, logprobs: dict[str, Any] | None = None, index: int = 0
    ) -> dict[str, Any]:
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        }

    if body.stream:
        offsets = [0] * prepared.n

        def per_token(i: int, event: TokenEvent) -> dict[str, Any]:
            out = completion_logprobs(
                tokenizer, [TokenLogprob(event.token_id, event.logprob, event.top)], offsets[i]
            )
            offsets[i] += len(out["tokens"][0])
            return out

        per = per_token if body.wants_logprobs else None
        return samples_stream(
            service, prepared, lambda gens: _openai_stream(gens, chunk, body.include_usage, per)
        )
    results = await samples_unless_gone(service, prepared, request)
    choices = []
    for i, result in enumerate(results):
        logprobs = completion_logprobs(tokenizer, result.logprobs) if body.wants_logprobs else None
        choices += chunk(
            result.generated_text, _finish_reason(result.finish_reason), False, logprobs, index=i
        )["choices"]
    out = chunk("", None, False)
    out["choices"], out["usage"] = choices, _usage(results)
    return out


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    service = _service(request)
    _, _, lm = service.require_ready()
    tokenizer = lm.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest(f"the model {lm.name} has no chat template; use /v1/completions", "messages")
    messages = [m.as_template_message() for m in body.messages]
    try:
        text: str = await anyio.to_thread.run_sync(
            lambda: str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        )
    except Exception as exc:  # a template that refuses this conversation (e.g. role order)
        raise InvalidRequest(f"the chat template refused these messages: {exc}", "messages") from exc
    limit = body.max_completion_tokens or body.max_tokens
    fit = limit is None
    # The template already holds the special tokens it wants; the soft prompt still comes first.
    prepared = await service.prepare(
        body.model,
        text,
        body.sampling(limit or service.settings.max_new_tokens),
        add_special_tokens=False,
        fit_new_tokens=fit,
        names=("messages", "max_tokens"),
        priority=body.priority,
        priority_name="priority",
        output=body.output(),
        explicit=body.explicit,
    )
    prepared = replace(prepared, n=body.n or 1)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(
        text: str, finish: str | None, first: bool, logprobs: dict[str, Any] | None = None, index: int = 0
    ) -> dict[str, Any]:
        delta: dict[str, Any] = (
            {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        )
        return {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        }

    if body.stream:

        def per_token(_: int, event: TokenEvent) -> dict[str, Any]:
            return chat_logprobs(tokenizer, [TokenLogprob(event.token_id, event.logprob, event.top)])

        per = per_token if body.wants_logprobs else None
        return samples_stream(
            service, prepared, lambda gens: _openai_stream(gens, chunk, body.include_usage, per)
        )
    results = await samples_unless_gone(service, prepared, request)
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": result.generated_text},
                "logprobs": chat_logprobs(tokenizer, result.logprobs) if body.wants_logprobs else None,
                "finish_reason": _finish_reason(result.finish_reason),
            }
            for i, result in enumerate(results)
        ],
        "usage": _usage(results),
    }
