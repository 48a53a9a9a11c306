"""A task's own settings: the optional `task.json` beside its adapter files.

Tasks are tenants of one server. An operator gives each task its share of the machine (`weight`),
a bound on its waiting requests (`max_queue`), an optional cap on its rows in the running batch
(`max_running`) and a priority class (`priority`, and `min_priority`, the most urgent value a request
of the task may ask for). Every field is optional; a folder without the file gets the defaults,
equal for every task. The file is validated like the adapter itself: a bad file refuses the task
with the reason, the other tasks keep serving.

Priorities follow vLLM's convention: a lower number is served first.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SETTINGS_FILE = "task.json"
MAX_SETTINGS_BYTES = 64 << 10
PRIORITY_RANGE = (-1000, 1000)


class TaskSettings(BaseModel):
    """The fields of `task.json` (unknown keys are refused, so a typo never passes silently)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: float = Field(1.0, gt=0, le=1000, description="share of the server relative to other tasks (tokens served)")
    max_queue: int | None = Field(
        None, ge=1, le=1_000_000, description="waiting requests of this task at most (default: --max-queue-per-task)"
    )
    max_running: int | None = Field(None, ge=1, le=100_000, description="rows of the running batch at most (default: no cap)")
    priority: int = Field(0, ge=PRIORITY_RANGE[0], le=PRIORITY_RANGE[1], description="default priority; lower is served first")
    min_priority: int | None = Field(
        None,
        ge=PRIORITY_RANGE[0],
        le=PRIORITY_RANGE[1],
        description="the most urgent (lowest) priority a request of this task may ask for (default: priority)",
    )

    @model_validator(mode="after")
    def _min_priority_not_above_default(self) -> TaskSettings:
        if self.min_priority is not None and self.min_priority > self.priority:
            raise ValueError(f"min_priority ({self.min_priority}) must be <= priority ({self.priority}): lower is more urgent")
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
        raise SettingsError(f"{SETTINGS_FILE} is {len(data)} bytes; at most {MAX_SETTINGS_BYTES} are accepted")
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
            msg = f"unknown field; allowed: {', '.join(TaskSettings.model_fields)}"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)
