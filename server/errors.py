"""Domain errors: what can go wrong with a request, said without HTTP.

The service, the scheduler and the engine raise these (or, for the engine's events, name their
`ErrorKind`); `server/api/errors.py` maps each kind once to the HTTP status and to TGI's and
OpenAI's error bodies. Nothing below `server/api/` knows about status codes or error shapes.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import ClassVar


class ErrorKind(enum.Enum):
    UNKNOWN_TASK = "unknown_task"  # the request names no servable task
    INVALID_REQUEST = "invalid_request"  # a field breaks a limit (input too long, too many new tokens, ...)
    OVERLOADED = "overloaded"  # the queue is full: retry later
    UNAVAILABLE = "unavailable"  # loading, shutting down, or the engine stopped
    GENERATION_FAILED = "generation_failed"  # accepted, then failed in the engine


class DomainError(Exception):
    """Base of the errors a client should see; `message` says what happened and what to change."""

    kind: ClassVar[ErrorKind]

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownTask(DomainError):
    """`task` is not served. `known` (when given) lists the tasks that are; `reason` adds why not."""

    kind = ErrorKind.UNKNOWN_TASK

    def __init__(
        self,
        task: str,
        known: Sequence[str] | None = None,
        *,
        reason: str | None = None,
        message: str | None = None,
    ) -> None:
        self.task = task
        self.known = None if known is None else list(known)
        self.reason = reason
        self._message = message
        super().__init__(self.describe())

    def describe(self, noun: str = "task") -> str:
        """The message, naming the task as `noun` (OpenAI's routes call a task a model)."""
        if self._message is not None:
            return self._message
        text = f"unknown {noun} {self.task!r}"
        if self.known is not None:
            text += f"; known tasks: {', '.join(self.known) or '(none)'}"
        if self.reason:
            text += f"; {self.reason}"
        return text


class InvalidRequest(DomainError):
    """A request (or upload) that breaks a rule;
    `field` names the offending field as the caller's API calls it."""

    kind = ErrorKind.INVALID_REQUEST

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Overloaded(DomainError):
    kind = ErrorKind.OVERLOADED


class Unavailable(DomainError):
    kind = ErrorKind.UNAVAILABLE


class GenerationFailed(DomainError):
    kind = ErrorKind.GENERATION_FAILED


class QueueFull(Overloaded):
    """The scheduler's waiting queue is at its limit."""


class ShuttingDown(Unavailable, RuntimeError):
    """The scheduler is closed (the server drains): no new requests."""


_BY_KIND: dict[ErrorKind, type[DomainError]] = {
    ErrorKind.INVALID_REQUEST: InvalidRequest,
    ErrorKind.OVERLOADED: Overloaded,
    ErrorKind.UNAVAILABLE: Unavailable,
    ErrorKind.GENERATION_FAILED: GenerationFailed,
}


def error_of(kind: ErrorKind, message: str) -> DomainError:
    """The exception for an engine ErrorEvent's kind and message."""
    if kind is ErrorKind.UNKNOWN_TASK:
        return UnknownTask("", message=message)
    return _BY_KIND[kind](message)
