"""What the engine counts: its passes (EngineStats, read by /stats and tests), what structured outputs
cost (MaskStats), and the hook metrics implement (EngineObserver)."""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from typing import Protocol

from server.engine.request import Request


@dataclass
class EngineStats:
    """Counters that show what batching did (read by /stats and by tests)."""

    prefill_passes: int = 0
    prefix_passes: int = 0  # prefill passes that also computed soft prompts' key/value prefixes
    decode_passes: int = 0
    rows_prefilled: int = 0
    rows_decoded: int = 0
    mixed_task_passes: int = 0  # forward passes whose rows belong to more than one task
    tasks_summed: int = 0  # distinct tasks per pass, summed over passes (mean = tasks_summed / passes)
    max_tasks_in_pass: int = 0
    max_rows_in_pass: int = 0
    joined_running_batch: int = 0  # rows admitted while other rows were mid-generation
    requests_finished: int = 0
    requests_failed: int = 0

    def record_pass(self, phase: str, requests: list[Request]) -> int:
        """Count one forward pass; returns how many distinct tasks it held."""
        tasks = len({r.task for r in requests})
        if phase == "prefill":
            self.prefill_passes += 1
            self.rows_prefilled += len(requests)
        else:
            self.decode_passes += 1
            self.rows_decoded += len(requests)
        self.mixed_task_passes += tasks > 1
        self.tasks_summed += tasks
        self.max_tasks_in_pass = max(self.max_tasks_in_pass, tasks)
        self.max_rows_in_pass = max(self.max_rows_in_pass, len(requests))
        return tasks

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class MaskStats:
    """What structured outputs cost: passes with a constrained row, the mask fill's own time, and the
    part of it the engine waited for after the forward pass (the rest was hidden behind the pass)."""

    passes: int = 0
    fill_seconds: float = 0.0
    waited_seconds: float = 0.0
    grammar_errors: int = 0  # rows failed because their matcher refused a token or broke a limit

    def __post_init__(self) -> None:
        self.recent: deque[tuple[float, float]] = deque(
            maxlen=4096
        )  # (fill, waited) per pass, for percentiles

    def record(self, fill: float, waited: float) -> None:
        self.passes += 1
        self.fill_seconds += fill
        self.waited_seconds += waited
        self.recent.append((fill, waited))


class EngineObserver(Protocol):
    """Hooks for metrics; called on the engine thread, so they must be cheap and never raise."""

    def on_pass(self, phase: str, rows: int, tasks: int, seconds: float) -> None: ...
