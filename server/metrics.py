"""Prometheus metrics, TGI-style names with a `softmux_` prefix and per-task labels.

One `Metrics` per service with its own `CollectorRegistry` (no module-global state), so a process
can hold several apps (tests do). Request metrics are recorded when a request ends; forward-pass
metrics come from the engine's observer hook; queue size, running rows and prompt-load failures
are read from the live objects at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.engine.request import FinishEvent
from server.errors import ErrorKind

# Outcomes of a request that reached the engine: its finish reason, or "error".
# Requests refused before the engine get a label for their error kind (TGI's error_type names).
OUTCOME_ERROR = "error"
REFUSED_OUTCOMES: dict[ErrorKind, str] = {
    ErrorKind.UNKNOWN_TASK: "not_found",
    ErrorKind.INVALID_REQUEST: "validation",
    ErrorKind.OVERLOADED: "overloaded",
    ErrorKind.UNAVAILABLE: "unhealthy",
    ErrorKind.GENERATION_FAILED: "generation",
}
UNKNOWN_TASK = "_unknown"  # label for requests naming a task that does not exist (bounded label values)

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_LENGTH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TASK_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


@dataclass(frozen=True)
class LiveState:
    """What the scrape-time collector reads; None for anything not loaded yet."""

    waiting: int | None
    running: int | None
    prompt_load_failures: int | None
    tasks: int | None
    kv_blocks_used: int | None = None
    kv_blocks_total: int | None = None
    kv_blocks_touched: int | None = None
    preemptions: int | None = None  # counters from here on
    prefix_hit_tokens: int | None = None
    prefix_hit_requests: int | None = None
    soft_prompt_hits: int | None = None
    soft_prompt_misses: int | None = None
    per_task: dict[str, dict[str, float | int]] | None = None  # the scheduler's task_stats()


class _LiveCollector(Collector):
    def __init__(self, read: Callable[[], LiveState]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        state = self._read()
        for name, doc, value in (
            ("softmux_queue_size", "requests waiting for admission", state.waiting),
            ("softmux_batch_current_size", "rows in the running batch", state.running),
            (
                "softmux_prompt_load_failures",
                "store folders that failed to load at the last scan",
                state.prompt_load_failures,
            ),
            ("softmux_tasks", "servable tasks", state.tasks),
        ):
            yield GaugeMetricFamily(name, doc, value=0 if value is None else value)
        yield GaugeMetricFamily(
            "softmux_kv_cache_blocks_used",
            "key/value pool blocks in use (rows, prefixes, cached blocks)",
            value=state.kv_blocks_used or 0,
        )
        yield GaugeMetricFamily(
            "softmux_kv_cache_blocks_total", "key/value pool blocks", value=state.kv_blocks_total or 0
        )
        yield GaugeMetricFamily(
            "softmux_kv_cache_blocks_touched",
            "key/value pool blocks ever used: the pool's committed memory (the rest is never faulted in)",
            value=state.kv_blocks_touched or 0,
        )
        for name, doc, value in (
            (
                "softmux_preemptions",
                "rows preempted when the key/value pool ran out (recomputed later)",
                state.preemptions,
            ),
            (
                "softmux_prefix_cache_hit_tokens",
                "input tokens whose keys and values came from the per-task token cache",
                state.prefix_hit_tokens,
            ),
            (
                "softmux_prefix_cache_hit_requests",
                "requests that reused cached input-token blocks",
                state.prefix_hit_requests,
            ),
            (
                "softmux_soft_prompt_cache_hits",
                "admissions whose task's soft-prompt keys and values were already in the pool",
                state.soft_prompt_hits,
            ),
            (
                "softmux_soft_prompt_cache_misses",
                "admissions that computed (or copied in) their task's soft-prompt keys and values",
                state.soft_prompt_misses,
            ),
        ):
            yield CounterMetricFamily(name, doc, value=value or 0)
        yield from _task_metrics(state.per_task or {})


# Per task, from the scheduler (server/engine/fairness.py): (metric, kind, help, stats key).
_TASK_METRICS = (
    ("softmux_task_queue_size", "gauge", "requests of the task waiting for admission", "waiting"),
    ("softmux_task_running", "gauge", "rows of the task in the running batch", "running"),
    ("softmux_task_weight", "gauge", "the task's weight (task.json)", "weight"),
    (
        "softmux_task_fairness_counter",
        "gauge",
        "weighted service the task received (input + 2 x output tokens) / weight",
        "counter",
    ),
    ("softmux_task_input_tokens", "counter", "input tokens of the task's admitted requests", "input_tokens"),
    ("softmux_task_generated_tokens", "counter", "tokens generated for the task", "output_tokens"),
    ("softmux_task_admitted", "counter", "requests of the task admitted into the batch", "admitted"),
    (
        "softmux_task_queue_refused",
        "counter",
        "requests of the task refused because its quota or the queue was full",
        "refused",
    ),
    (
        "softmux_task_preemptions",
        "counter",
        "rows of the task taken back (memory, a starved task, a more urgent request)",
        "preempted",
    ),
)


def _task_metrics(per_task: dict[str, dict[str, float | int]]) -> Iterable[Metric]:
    for name, kind, doc, key in _TASK_METRICS:
        family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, doc, labels=("task",))
        for task, stats in per_task.items():
            if not task.startswith("_"):  # the engine's own warm-up
                family.add_metric((task,), float(stats[key]))
        yield family


class Metrics:
    """Implements the engine's `EngineObserver` protocol (`on_pass`)."""

    def __init__(self, read_state: Callable[[], LiveState]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        labels = ("task", "outcome")
        self.requests = Counter("softmux_request_count", "requests by task and outcome", labels, registry=r)
        self.duration = Histogram(
            "softmux_request_duration_seconds",
            "arrival to finish",
            labels,
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "softmux_request_queue_duration_seconds",
            "arrival to admission into the batch",
            labels,
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "softmux_request_time_to_first_token_seconds",
            "arrival to the first generated token",
            labels,
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.per_token = Histogram(
            "softmux_request_time_per_output_token_seconds",
            "mean time between generated tokens after the first",
            labels,
            buckets=_TOKEN_TIME_BUCKETS,
            registry=r,
        )
        self.input_length = Histogram(
            "softmux_request_input_length",
            "input tokens (virtual tokens not counted)",
            labels,
            buckets=_LENGTH_BUCKETS,
            registry=r,
        )
        self.generated = Histogram(
            "softmux_request_generated_tokens",
            "generated tokens",
            labels,
            buckets=_LENGTH_BUCKETS,
            registry=r,
        )
        self.forward_duration = Histogram(
            "softmux_batch_forward_duration_seconds",
            "one forward pass",
            ("phase",),
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.forward_size = Histogram(
            "softmux_batch_forward_size",
            "rows in one forward pass",
            ("phase",),
            buckets=_ROW_BUCKETS,
            registry=r,
        )
        self.tasks_per_forward = Histogram(
            "softmux_batch_tasks_per_forward",
            "distinct tasks in one forward pass",
            ("phase",),
            buckets=_TASK_BUCKETS,
            registry=r,
        )
        r.register(_LiveCollector(read_state))

    # ---- engine observer (engine thread: cheap, never raises) --------------------------------
    def on_pass(self, phase: str, rows: int, tasks: int, seconds: float) -> None:
        self.forward_duration.labels(phase).observe(seconds)
        self.forward_size.labels(phase).observe(rows)
        self.tasks_per_forward.labels(phase).observe(tasks)

    # ---- requests ----------------------------------------------------------------------------
    def finished(self, task: str, event: FinishEvent) -> None:
        outcome = event.finish_reason.value
        key = (task, outcome)
        self.requests.labels(*key).inc()
        self.duration.labels(*key).observe(event.total_time)
        self.queue.labels(*key).observe(event.queue_time)
        self.input_length.labels(*key).observe(event.input_tokens)
        self.generated.labels(*key).observe(event.generated_tokens)
        if event.first_token_time is not None:
            self.first_token.labels(*key).observe(event.first_token_time)
            if event.generated_tokens > 1:
                per = (event.total_time - event.first_token_time) / (event.generated_tokens - 1)
                self.per_token.labels(*key).observe(max(per, 0.0))

    def failed(self, task: str, input_tokens: int) -> None:
        """A request the engine accepted and then failed."""
        self.requests.labels(task, OUTCOME_ERROR).inc()
        self.input_length.labels(task, OUTCOME_ERROR).observe(input_tokens)

    def rejected(self, task: str, kind: ErrorKind) -> None:
        """A request refused before it reached the engine (validation, unknown task, queue full,
        not ready)."""
        self.requests.labels(task, REFUSED_OUTCOMES[kind]).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
