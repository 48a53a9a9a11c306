"""Request and response bodies of the native (TGI-shaped) API."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.api.outputs import TgiGrammar

MAX_STOP = 4
MAX_SEED = 2**63 - 1
MAX_TIMEOUT = 3600.0  # seconds; parameters.timeout above this is refused
MAX_TOP_K = 1 << 20  # larger than any vocabulary; bigger values only overflow the sampler

# TGI fields that clients send routinely: accepted at their neutral value, refused otherwise.
_TGI_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1),
    "decoder_input_details": (None, False),
    "return_full_text": (None, False),
    "truncate": (None,),
    "typical_p": (None, 1.0),
    "watermark": (None, False),
    "adapter_id": (None,),
}


def frequency_penalty_field(note: str = "") -> Any:
    """OpenAI's frequency penalty, as both APIs take it: optional, within [-2, 2]."""
    return Field(
        None,
        ge=-2.0,
        le=2.0,
        description=f"logit -= its count among the generated tokens x this (OpenAI's formula{note})",
    )


def finite_or_none(v: float | None) -> float | None:
    """Field validator shared with the OpenAI schemas: JSON NaN and Infinity are refused."""
    if v is not None and not math.isfinite(v):
        raise ValueError("must be a finite number")
    return v


class GenerateParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(20, ge=1, description="tokens to generate at most (the server caps it)")
    do_sample: bool = Field(False, description="sample instead of greedy decoding")
    temperature: float | None = Field(
        None, ge=0.0, le=100.0, description="0 means greedy; setting it turns sampling on"
    )
    top_k: int | None = Field(None, ge=0, le=MAX_TOP_K, description="keep the k most likely tokens (0: off)")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="nucleus sampling mass")
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0, description="1.0: off")
    stop: list[str] = Field(
        default_factory=list, max_length=MAX_STOP, description=f"up to {MAX_STOP} stop strings"
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="seed for sampling; same seed, same text")
    timeout: float | None = Field(
        None,
        gt=0.0,
        le=MAX_TIMEOUT,
        description=(
            "seconds this request may take, queue included; when they pass it ends with finish_reason "
            "'timeout' and the text so far (the server's --request-timeout, when set, "
            "is the default and the ceiling)"
        ),
    )
    ignore_eos: bool = Field(
        False,
        description=(
            "keep generating past end-of-sequence tokens, up to max_new_tokens or a stop string (vLLM's name)"
        ),
    )
    details: bool = Field(True, description="accepted for TGI compatibility; details are always returned")
    priority: int | None = Field(
        None,
        ge=-1000,
        le=1000,
        description="lower is served first (vLLM's convention); default and range from the task's task.json",
    )

    best_of: int | None = None
    decoder_input_details: bool | None = None
    return_full_text: bool | None = None
    truncate: int | None = None
    typical_p: float | None = None
    watermark: bool | None = None
    top_n_tokens: int | None = Field(
        None,
        ge=0,
        le=5,
        description=(
            "the N most likely tokens at each step (details.top_tokens, "
            "and details.tokens with each token's logprob)"
        ),
    )
    frequency_penalty: float | None = frequency_penalty_field("; 0: off")
    grammar: TgiGrammar | None = Field(
        None,
        description=(
            'structured output: {"type": "json", "value": <JSON schema>} or '
            '{"type": "regex", "value": <pattern>}'
        ),
    )
    adapter_id: str | None = None

    _finite = field_validator("temperature", "top_p", "repetition_penalty", "timeout", "frequency_penalty")(
        finite_or_none
    )

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: list[str]) -> list[str]:
        if any(len(s) == 0 for s in v):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > 256 for s in v):
            raise ValueError("stop strings must be at most 256 characters")
        return v

    @model_validator(mode="after")
    def _neutral_tgi_fields(self) -> GenerateParameters:
        for name, allowed in _TGI_NEUTRAL.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(
                    f"{name}={value!r} is not supported by softmux (allowed: {', '.join(map(repr, allowed))})"
                )
        return self


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(..., min_length=1, max_length=64, description="the task (soft prompt) to apply")
    inputs: str = Field(..., min_length=1, description="the text that follows the soft prompt")
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)


class TokenDetail(BaseModel):
    id: int
    text: str
    logprob: float
    special: bool


class Details(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence", "timeout"]
    generated_tokens: int
    input_tokens: int
    virtual_tokens: int
    seed: int | None
    tokens: list[TokenDetail] | None = Field(
        None, description="with top_n_tokens: each generated token and its logprob"
    )
    top_tokens: list[list[TokenDetail]] | None = Field(
        None, description="with top_n_tokens: each step's N most likely tokens"
    )


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details


class ErrorBody(BaseModel):
    error: str
    error_type: str
