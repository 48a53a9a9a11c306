"""The bodies of the OpenAI-compatible routes (`/v1/completions`, `/v1/chat/completions`) and their
limits, as pydantic models: what a request may hold, refused with the field's name otherwise, and how
it becomes sampling parameters and a structured output. The routes are in openai_compat.py.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.api.outputs import ResponseFormat, from_response_format, from_structured_outputs, one_of
from server.api.schemas import MAX_SEED, MAX_STOP, finite_or_none, frequency_penalty_field
from server.engine.request import SamplingParams
from server.structured import OutputSpec

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

    frequency_penalty: float | None = frequency_penalty_field()
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
