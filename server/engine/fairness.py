"""Tasks as tenants: per-task waiting queues, quotas and the Virtual Token Counter. No torch here.

Each task has its own queue (ordered by priority, then arrival) and a counter of the service it
received: input tokens when a request is admitted and generated tokens as they come, each divided
by the task's weight (VTC, Sheng et al., OSDI 2024). Admission takes the next request from the task
with the most urgent head priority, then the smallest counter, then the fewest running rows, then
the oldest head. A task that starts waiting again has its counter lifted to the smallest counter
among the tasks still waiting (or, when none waits, to the counter of the last task admitted), so
an idle spell banks no credit for a later burst. Nothing else waits: the one task takes every row.

`fifo` keeps one arrival order over all tasks (softmux before tenants; for comparisons).
"""

from __future__ import annotations

import bisect
import enum
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from server.engine.request import Request

# Service charged per token, VTC's defaults: a generated token costs a full pass per step while
# prompt tokens share one batched pass, so output counts double.
INPUT_TOKEN_COST = 1.0
OUTPUT_TOKEN_COST = 2.0


class Policy(str, enum.Enum):
    FAIR = "fair"  # per-task queues, VTC, priorities, a starved task takes a row from the most served
    FIFO = "fifo"  # one arrival order, no per-task quota, no preemption but for memory


@dataclass
class TaskQueue:
    """One task's waiting requests and what it has been served."""

    name: str
    weight: float = 1.0  # from the latest request's task settings
    max_running: int | None = None  # likewise: rows of the running batch at most (None: no cap)
    waiting: list[Request] = field(default_factory=list)  # sorted by (priority, id)
    running: int = 0
    counter: float = 0.0  # weighted service: (input + 2 x output tokens) / weight, lifted on return
    input_tokens: int = 0
    output_tokens: int = 0
    admitted: int = 0
    refused: int = 0  # queue full (this task's quota or the global limit)
    preempted: int = 0  # rows taken back: for memory, for a starved task or for a more urgent request

    def insert(self, req: Request) -> None:
        keys = [(r.priority, r.id) for r in self.waiting]
        self.waiting.insert(bisect.bisect(keys, (req.priority, req.id)), req)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "waiting": len(self.waiting),
            "running": self.running,
            "weight": self.weight,
            "counter": round(self.counter, 3),
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "admitted": self.admitted,
            "refused": self.refused,
            "preempted": self.preempted,
        }


class TaskQueues:
    """Waiting requests by task and the fairness counters. The scheduler holds the lock around every call."""

    def __init__(self, policy: Policy = Policy.FAIR) -> None:
        self.policy = policy
        self._tasks: dict[str, TaskQueue] = {}
        self._count = 0
        self._last_admitted_counter = 0.0

    def task(self, name: str) -> TaskQueue:
        queue = self._tasks.get(name)
        if queue is None:
            queue = self._tasks[name] = TaskQueue(name)
        return queue

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Request]:
        """Every waiting request (task by task)."""
        for queue in list(self._tasks.values()):
            yield from queue.waiting

    def forget(self, name: str) -> None:
        queue = self._tasks.get(name)
        if queue is not None and not queue.waiting and queue.running == 0:
            del self._tasks[name]

    def share(self, name: str, weight: float, size: int) -> float:
        """Task `name`'s weighted share of `size` queue places among the tasks waiting (itself included)."""
        others = sum(q.weight for q in self._tasks.values() if q.waiting and q.name != name)
        return size * weight / (weight + others)

    # ---- in and out ---------------------------------------------------------------------------
    def push(self, req: Request) -> None:
        """A new request joins its task's queue (quotas are the scheduler's to check first)."""
        queue = self.task(req.task)
        queue.weight, queue.max_running = req.prompt.settings.weight, req.prompt.settings.max_running
        if not queue.waiting:
            self._lift(queue)
        queue.insert(req)
        self._count += 1

    def push_back(self, req: Request) -> None:
        """A preempted row waits again, in its place by priority and arrival (no lift, no quota)."""
        queue = self.task(req.task)
        queue.running -= 1
        queue.preempted += 1
        queue.insert(req)
        self._count += 1

    def remove(self, req: Request) -> None:
        self.task(req.task).waiting.remove(req)
        self._count -= 1

    def drain(self) -> list[Request]:
        out = sorted(self, key=lambda r: r.id)
        for queue in self._tasks.values():
            queue.waiting.clear()
        self._count = 0
        return out

    def _lift(self, queue: TaskQueue) -> None:
        """Idling banks no credit: a task that starts waiting again catches up with the others."""
        others = [q.counter for q in self._tasks.values() if q.waiting and q is not queue]
        floor = min(others) if others else self._last_admitted_counter
        queue.counter = max(queue.counter, floor)

    # ---- choosing ------------------------------------------------------------------------------
    def candidates(self) -> list[Request]:
        """Each task's head, best first; tasks at their cap of running rows are left out."""
        heads = [
            q.waiting[0]
            for q in self._tasks.values()
            if q.waiting and (q.max_running is None or q.running < q.max_running)
        ]
        return sorted(heads, key=self._order)

    def _order(self, head: Request) -> tuple[float, ...]:
        if self.policy is Policy.FIFO:
            return (head.id,)
        queue = self._tasks[head.task]
        return (head.priority, queue.counter, queue.running, head.id)

    def admit(self, req: Request) -> None:
        """`req` leaves its queue for the running batch; its input tokens are charged once."""
        queue = self.task(req.task)
        queue.waiting.remove(req)
        self._count -= 1
        queue.running += 1
        self._last_admitted_counter = queue.counter
        if not req.charged:
            req.charged = True
            queue.admitted += 1
            queue.input_tokens += len(req.input_ids)
            queue.counter += INPUT_TOKEN_COST * len(req.input_ids) / req.prompt.settings.weight

    def joined(self, req: Request) -> None:
        """A sample forked from a running row joins the batch: it never waited, and its input was
        prefilled (and charged) once, for its parent."""
        queue = self.task(req.task)
        queue.running += 1
        queue.admitted += 1
        req.charged = True

    def served(self, req: Request, tokens: int = 1) -> None:
        """`tokens` generated for a running row."""
        queue = self.task(req.task)
        queue.output_tokens += tokens
        queue.counter += OUTPUT_TOKEN_COST * tokens / req.prompt.settings.weight

    def left(self, req: Request) -> None:
        """A running row finished or failed."""
        self.task(req.task).running -= 1

    # ---- taking a row back -----------------------------------------------------------------
    def victim_for(self, starved: Request, running: list[Request]) -> Request | None:
        """A running row to preempt so that `starved` runs now, or None.

        A more urgent request takes the youngest row of the least urgent priority below its own. Under
        the fair policy, a task with no running row takes the youngest row of the most served task
        among those holding two rows or more: the victim keeps a row, so two tasks never take one
        row back and forth, and a quiet task never waits out a flood's whole wave.
        """
        if self.policy is Policy.FIFO:
            return None
        worse = [r for r in running if r.priority > starved.priority]
        if worse:
            return _youngest_of_least_urgent(worse)
        if self.task(starved.task).running > 0:
            return None
        rows = Counter(r.task for r in running)
        rich = [task for task, n in rows.items() if n >= 2 and task != starved.task]
        if not rich:
            return None
        most_served = max(rich, key=lambda task: (self.task(task).counter, rows[task]))
        return _youngest_of_least_urgent([r for r in running if r.task == most_served])

    def victim_for_memory(self, running: list[Request]) -> Request:
        """The row to take back when the pool runs dry: least urgent first, then the youngest."""
        if self.policy is Policy.FIFO:
            return max(running, key=lambda r: r.admit_order)
        return _youngest_of_least_urgent(running)

    def stats(self) -> dict[str, dict[str, float | int]]:
        return {name: q.as_dict() for name, q in sorted(self._tasks.items())}


def _youngest_of_least_urgent(rows: list[Request]) -> Request:
    """Memory pressure and priority preemption take the least urgent row first, then the youngest."""
    return max(rows, key=lambda r: (r.priority, r.admit_order))
