"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

`model` names the task (its soft prompt goes in front of everything, chat template included);
an unknown model is a 404 in OpenAI's error shape, never a fallback to the base model.
Errors on these routes use `{"error": {"message", "type", "param", "code"}}` (see errors.py).
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.api.errors import openai_error
from server.api.logprobs import chat_logprobs, completion_logprobs
from server.api.outputs import ResponseFormat, from_response_format, from_structured_outputs, one_of
from server.api.routes import samples_stream, samples_unless_gone
from server.api.schemas import MAX_SEED, MAX_STOP, finite_or_none
from server.api.sse import sse
from server.engine.request import (
    ErrorEvent,
    Event,
    FinishEvent,
    FinishReason,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
)
from server.errors import InvalidRequest, UnknownTask, error_of
from server.generation import Generation
from server.prompts.registry import Registry
from server.prompts.settings import DEFAULT_SETTINGS
from server.service import Service
from server.structured import OutputSpec

router = APIRouter(prefix="/v1", tags=["openai"])

# Fields OpenAI clients send routinely: accepted at their neutral value, refused otherwise.
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_LOGIT_BIAS = 300  # tokens one request may bias (OpenAI's own limit)
MAX_N = 16  # choices per request
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "tools": (None, []),
    "tool_choice": (None, "none"),
}
# Request fields that are SamplingParams' own, by their SamplingParams name: unset ones take the task's
# defaults.
_DEFAULTABLE = {
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "stop": "stop",
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1, max_length=64, description="the task (soft prompt) to apply")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0: greedy; default 1 (sampling)")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(
        1,
        ge=1,
        le=MAX_N,
        description=f"choices (samples of the prompt: one prefill, its blocks shared), 1 to {MAX_N}",
    )
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description=f"a stop string or up to {MAX_STOP}")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    ignore_eos: bool = Field(
        False, description="vLLM's extension: keep generating past end-of-sequence tokens"
    )
    user: str | None = None
    priority: int | None = Field(
        None,
        ge=-1000,
        le=1000,
        description="vLLM's extension: lower is served first; default and range from the task's task.json",
    )

    frequency_penalty: float | None = Field(
        None,
        ge=-2.0,
        le=2.0,
        description="logit -= its count among the generated tokens x this (OpenAI's formula)",
    )
    presence_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, description="logit -= this once a token was generated"
    )
    logit_bias: dict[str, float] | None = Field(
        None,
        max_length=MAX_LOGIT_BIAS,
        description="{token id: -100..100} added to the token's logit before sampling",
    )
    top_logprobs: int | None = Field(
        None,
        ge=0,
        le=20,
        description="chat: alternatives per token (0-20) with logprobs=true; completions use logprobs",
    )
    best_of: int | None = None
    response_format: ResponseFormat | None = Field(
        None,
        description=(
            '{"type": "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}'
        ),
    )
    structured_outputs: dict[str, Any] | None = Field(
        None,
        description=(
            "vLLM's extension: one of json (a schema), json_object, regex, choice (strings), grammar "
            "(Lark or GBNF)"
        ),
    )

    _finite = field_validator("temperature", "top_p", "frequency_penalty", "presence_penalty")(finite_or_none)

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (v or {}).items():
            if not token.isdigit():
                raise ValueError(f"keys are token ids (non-negative integers as strings); got {token!r}")
            if not math.isfinite(bias) or not -100.0 <= bias <= 100.0:
                raise ValueError(f"biases must be between -100 and 100; got {bias} for token {token}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop strings must be 1 to 256 characters")
        return stops

    @model_validator(mode="after")
    def _neutral(self) -> _Common:
        for name, allowed in _NEUTRAL.items():
            if name in type(self).model_fields:
                value = getattr(self, name)
                if value not in allowed:
                    raise ValueError(
                        f"{name}={value!r} is not supported by softmux (allowed: "
                        f"{', '.join(map(repr, allowed))})"
                    )
        return self

    def sampling(self, max_new_tokens: int) -> SamplingParams:
        """OpenAI samples by default (temperature 1); temperature 0 is greedy."""
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            stop=tuple(self.stop or ()),
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            logit_bias=tuple(sorted((int(t), float(b)) for t, b in (self.logit_bias or {}).items())),
            logprobs=self.wants_logprobs,
            top_logprobs=self.alternatives,
        )

    @property
    def wants_logprobs(self) -> bool:
        return False

    def output(self) -> tuple[OutputSpec | None, str]:
        """The one structured output asked (response_format or structured_outputs) and its field."""
        return one_of(
            (from_response_format(self.response_format), "response_format"),
            (from_structured_outputs(self.structured_outputs), "structured_outputs"),
        )

    @property
    def explicit(self) -> frozenset[str]:
        """The SamplingParams fields this request set itself."""
        return frozenset(_DEFAULTABLE[f] for f in self.model_fields_set if f in _DEFAULTABLE)

    @property
    def alternatives(self) -> int:
        return 0

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Common):
    prompt: str | list[str] = Field(
        ..., description="the text after the soft prompt (a string, or a list of one)"
    )
    max_tokens: int | None = Field(
        COMPLETIONS_MAX_TOKENS, ge=1, description="tokens to generate at most (OpenAI's default: 16)"
    )
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = Field(
        None,
        ge=0,
        le=5,
        description="log-probabilities of each token and of its N most likely alternatives (0-5)",
    )

    @model_validator(mode="after")
    def _no_top_logprobs(self) -> CompletionRequest:
        if self.top_logprobs is not None:
            raise ValueError(
                "top_logprobs belongs to chat completions; on /v1/completions ask logprobs=N (0-5)"
            )
        return self

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

    @property
    def alternatives(self) -> int:
        return self.logprobs or 0

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        texts = [v] if isinstance(v, str) else v
        if len(texts) != 1:
            raise ValueError(
                "give one prompt (a string, or a list of exactly one string); batch with concurrent requests"
            )
        if not texts[0]:
            raise ValueError("prompt must not be empty")
        return v

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_message(self) -> dict[str, str]:
        content = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        )
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="alias of max_tokens (newer clients)")
    logprobs: bool | None = Field(
        None, description="log-probabilities of each token (with top_logprobs alternatives)"
    )
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.logprobs)

    @property
    def alternatives(self) -> int:
        return self.top_logprobs or 0


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
