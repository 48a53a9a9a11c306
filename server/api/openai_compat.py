"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

`model` names the task (its soft prompt goes in front of everything, chat template included);
an unknown model is a 404 in OpenAI's error shape, never a fallback to the base model.
Errors on these routes use `{"error": {"message", "type", "param", "code"}}` (see errors.py).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.api.errors import openai_error
from server.api.logprobs import chat_logprobs, completion_logprobs
from server.api.routes import event_stream, generate_unless_gone
from server.api.schemas import MAX_SEED, MAX_STOP, finite_or_none
from server.api.sse import sse
from server.engine.request import ErrorEvent, FinishEvent, FinishReason, SamplingParams, TokenEvent, TokenLogprob
from server.errors import InvalidRequest, UnknownTask, error_of
from server.service import Generation, Service

router = APIRouter(prefix="/v1", tags=["openai"])

# Fields OpenAI clients send routinely: accepted at their neutral value, refused otherwise.
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_LOGIT_BIAS = 300  # tokens one request may bias (OpenAI's own limit)
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
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
    n: int | None = Field(1, description="choices per request: softmux returns exactly one")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description=f"a stop string or up to {MAX_STOP}")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    ignore_eos: bool = Field(False, description="vLLM's extension: keep generating past end-of-sequence tokens")
    user: str | None = None
    priority: int | None = Field(
        None,
        ge=-1000,
        le=1000,
        description="vLLM's extension: lower is served first; default and range from the task's task.json",
    )

    frequency_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, description="logit -= its count among the generated tokens x this (OpenAI's formula)"
    )
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="logit -= this once a token was generated")
    logit_bias: dict[str, float] | None = Field(
        None, max_length=MAX_LOGIT_BIAS, description="{token id: -100..100} added to the token's logit before sampling"
    )
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="chat: alternatives per token (0-20) with logprobs=true; completions use logprobs"
    )
    best_of: int | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError("only n=1 is supported: softmux returns one choice per request; send several requests instead")
        return v

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
                    raise ValueError(f"{name}={value!r} is not supported by softmux (allowed: {', '.join(map(repr, allowed))})")
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

    @property
    def alternatives(self) -> int:
        return 0

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Common):
    prompt: str | list[str] = Field(..., description="the text after the soft prompt (a string, or a list of one)")
    max_tokens: int | None = Field(COMPLETIONS_MAX_TOKENS, ge=1, description="tokens to generate at most (OpenAI's default: 16)")
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = Field(
        None, ge=0, le=5, description="log-probabilities of each token and of its N most likely alternatives (0-5)"
    )

    @model_validator(mode="after")
    def _no_top_logprobs(self) -> CompletionRequest:
        if self.top_logprobs is not None:
            raise ValueError("top_logprobs belongs to chat completions; on /v1/completions ask logprobs=N (0-5)")
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
            raise ValueError("give one prompt (a string, or a list of exactly one string); batch with concurrent requests")
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
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="alias of max_tokens (newer clients)")
    logprobs: bool | None = Field(None, description="log-probabilities of each token (with top_logprobs alternatives)")
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
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


def _usage(event: FinishEvent) -> dict[str, int]:
    # prompt_tokens counts the input text's tokens; the task's virtual tokens are reported apart.
    return {
        "prompt_tokens": event.input_tokens,
        "completion_tokens": event.generated_tokens,
        "total_tokens": event.input_tokens + event.generated_tokens,
        "virtual_tokens": event.virtual_tokens,
    }


async def _openai_stream(
    generation: Generation, chunk: Any, include_usage: bool, logprobs: Callable[[TokenEvent], Any] | None = None
) -> AsyncIterator[bytes]:
    """`chunk(text, finish_reason, first, logprobs)` builds one chunk; then the usage chunk if asked, then
    [DONE]. With `logprobs` every token gets a chunk (its text may be ""), carrying its log-probabilities."""
    first = True
    async for event in generation:
        if isinstance(event, TokenEvent):
            if logprobs is not None:
                yield sse(chunk(event.text, None, first, logprobs(event)))
                first = False
            elif event.text or first:
                yield sse(chunk(event.text, None, first))
                first = False
        elif isinstance(event, FinishEvent):
            yield sse(chunk("", _finish_reason(event.finish_reason), first))
            if include_usage:
                final = chunk("", None, False)
                final["choices"], final["usage"] = [], _usage(event)
                yield sse(final)
            yield sse("[DONE]")
        elif isinstance(event, ErrorEvent):
            yield sse(openai_error(error_of(event.kind, event.message)))


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    """Every task, as an OpenAI model."""
    _, registry, _ = _service(request).require_ready()
    return {"object": "list", "data": [_model_card(name) for name in registry.names()]}


@router.get("/models/{model}")
async def get_model(model: str, request: Request) -> dict[str, Any]:
    _, registry, _ = _service(request).require_ready()
    if model not in registry:
        raise UnknownTask(model)
    return _model_card(model)


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "softmux"}


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    service = _service(request)
    limit = COMPLETIONS_MAX_TOKENS if body.max_tokens is None else body.max_tokens  # an explicit null: OpenAI's default
    prepared = await service.prepare(
        body.model,
        body.text,
        body.sampling(limit),
        names=("prompt", "max_tokens"),
        priority=body.priority,
        priority_name="priority",
    )
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    tokenizer = service.require_ready()[2].tokenizer

    def chunk(text: str, finish: str | None, _: bool, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        }

    if body.stream:
        offset = [0]

        def per_token(event: TokenEvent) -> dict[str, Any]:
            out = completion_logprobs(tokenizer, [TokenLogprob(event.token_id, event.logprob, event.top)], offset[0])
            offset[0] += len(out["tokens"][0])
            return out

        per = per_token if body.wants_logprobs else None
        return event_stream(service, prepared, lambda generation: _openai_stream(generation, chunk, body.include_usage, per))
    result = await generate_unless_gone(service, prepared, request)
    logprobs = completion_logprobs(tokenizer, result.logprobs) if body.wants_logprobs else None
    out = chunk(result.generated_text, _finish_reason(result.finish_reason), False, logprobs)
    out["usage"] = _usage(result)
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
    )
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(text: str, finish: str | None, first: bool, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        delta: dict[str, Any] = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        }

    if body.stream:

        def per_token(event: TokenEvent) -> dict[str, Any]:
            return chat_logprobs(tokenizer, [TokenLogprob(event.token_id, event.logprob, event.top)])

        per = per_token if body.wants_logprobs else None
        return event_stream(service, prepared, lambda generation: _openai_stream(generation, chunk, body.include_usage, per))
    result = await generate_unless_gone(service, prepared, request)
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.generated_text},
                "logprobs": chat_logprobs(tokenizer, result.logprobs) if body.wants_logprobs else None,
                "finish_reason": _finish_reason(result.finish_reason),
            }
        ],
        "usage": _usage(result),
    }
