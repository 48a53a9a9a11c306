"""A task's own settings: the optional `task.json` beside its adapter files.

Tasks are tenants of one server. An operator gives each task its share of the machine (`weight`),
a bound on its waiting requests (`max_queue`), an optional cap on its rows in the running batch
(`max_running`) and a priority class (`priority`, and `min_priority`, the most urgent value a request
of the task may ask for). Every field is optional; a folder without the file gets the defaults,
equal for every task. The file is validated like the adapter itself: a bad file refuses the task
with the reason, the other tasks keep serving.

A task is also a contract on its answers: `output` (vLLM's structured_outputs keys: json, json_object,
regex, choice, grammar) binds every request of the task, whatever the client sends; a request may
repeat it but not replace it. `defaults` are sampling parameters for requests that leave them unset;
a request's own value always wins.

Priorities follow vLLM's convention: a lower number is served first.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from server.structured import OutputSpec

SETTINGS_FILE = "task.json"
MAX_SETTINGS_BYTES = 64 << 10
PRIORITY_RANGE = (-1000, 1000)


class TaskDefaults(BaseModel):
    """Sampling parameters a task gives requests that leave them unset (the request's value wins)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float | None = Field(None, ge=0.0, le=100.0, description="0: greedy")
    top_k: int | None = Field(None, ge=0, le=1 << 20)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stop: tuple[str, ...] | None = Field(None, max_length=4)

    def given(self) -> dict[str, object]:
        """The parameters this task sets, by SamplingParams' names."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class TaskSettings(BaseModel):
    """The fields of `task.json` (unknown keys are refused, so a typo never passes silently)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: float = Field(
        1.0, gt=0, le=1000, description="share of the server relative to other tasks (tokens served)"
    )
    max_queue: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="waiting requests of this task at most (default: --max-queue-per-task)",
    )
    max_running: int | None = Field(
        None, ge=1, le=100_000, description="rows of the running batch at most (default: no cap)"
    )
    priority: int = Field(
        0, ge=PRIORITY_RANGE[0], le=PRIORITY_RANGE[1], description="default priority; lower is served first"
    )
    min_priority: int | None = Field(
        None,
        ge=PRIORITY_RANGE[0],
        le=PRIORITY_RANGE[1],
        description=(
            "the most urgent (lowest) priority a request of this task may ask for (default: priority)"
        ),
    )

    output: dict[str, object] | None = Field(
        None,
        description=(
            "structured output binding every request: one of json, json_object, regex, choice, grammar"
        ),
    )
    defaults: TaskDefaults = Field(
        default_factory=TaskDefaults, description="parameters for requests that leave them unset"
    )

    @field_validator("output")
    @classmethod
    def _output_shape(cls, v: dict[str, object] | None) -> dict[str, object] | None:
        if v is not None:
            OutputSpec.from_fields(v)  # a GrammarError is a ValueError: reported with the field's name
        return v

    def shown(self) -> dict[str, object]:
        """As GET /tasks shows it: every field, the defaults only where the task sets one."""
        return {**self.model_dump(exclude={"defaults"}), "defaults": self.defaults.given()}

    @property
    def output_spec(self) -> OutputSpec | None:
        return None if self.output is None else OutputSpec.from_fields(self.output)

    @model_validator(mode="after")
    def _min_priority_not_above_default(self) -> TaskSettings:
        if self.min_priority is not None and self.min_priority > self.priority:
            raise ValueError(
                f"min_priority ({self.min_priority}) must be <= priority ({self.priority}): "
                "lower is more urgent"
            )
        return self

    @property
    def most_urgent(self) -> int:
        """The lowest priority value a request of this task may carry."""
        return self.priority if self.min_priority is None else self.min_priority

    def allowed_priorities(self) -> tuple[int, int]:
        return self.most_urgent, PRIORITY_RANGE[1]


DEFAULT_SETTINGS = TaskSettings()


class SettingsError(ValueError):
    """A `task.json` that cannot be used; the message names the field and what is allowed."""


def parse_settings(data: bytes) -> TaskSettings:
    """`task.json`'s bytes -> TaskSettings; SettingsError naming the field and what is allowed."""
    if len(data) > MAX_SETTINGS_BYTES:
        raise SettingsError(
            f"{SETTINGS_FILE} is {len(data)} bytes; at most {MAX_SETTINGS_BYTES} are accepted"
        )
    try:
        raw: Any = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SettingsError(f"{SETTINGS_FILE} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise SettingsError(f"{SETTINGS_FILE} must hold a JSON object")
    try:
        return TaskSettings.model_validate(raw)
    except ValidationError as e:
        raise SettingsError(f"{SETTINGS_FILE}: {_describe(e)}") from None


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(file)"
        msg = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            model = TaskDefaults if item["loc"][:1] == ("defaults",) else TaskSettings
            msg = f"unknown field; allowed: {', '.join(model.model_fields)}"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)
