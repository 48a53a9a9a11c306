"""Waiting and running queues and the admission policy. No torch here: policy only."""

from __future__ import annotations

import threading
import time
from collections import deque

from server.engine.request import Request, RequestStatus
from server.errors import QueueFull, ShuttingDown

__all__ = ["QueueFull", "Scheduler", "ShuttingDown"]


class Scheduler:
    """FIFO admission under two limits: rows in the batch and tokens reserved by them.

    Each running row reserves its virtual + input + max_new_tokens, so a batch once admitted can
    always run to completion without running out of room. Admission is strictly FIFO: a request
    that does not fit yet blocks those behind it, so large requests are not starved.
    """

    def __init__(self, max_batch_size: int, max_batch_tokens: int, max_queue: int) -> None:
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        self._waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._reserved = 0
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self.closed = False

    def add(self, request: Request) -> None:
        """Called from any thread. Raises QueueFull when the queue is at its limit."""
        with self._lock:
            if self.closed:
                raise ShuttingDown("the server is shutting down and accepts no new requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"queue is full ({self.max_queue} waiting requests)")
            self._waiting.append(request)
            self._wakeup.notify()

    def wait_for_work(self, timeout: float) -> None:
        """Block the engine thread until something is waiting (or timeout)."""
        with self._lock:
            if not self._waiting and not self.running:
                self._wakeup.wait(timeout)

    def close(self) -> None:
        """Refuse new requests from now on; those already accepted still run."""
        with self._lock:
            self.closed = True
            self._wakeup.notify_all()

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._waiting and not self.running

    def notify(self) -> None:
        with self._lock:
            self._wakeup.notify_all()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def reserved_tokens(self) -> int:
        return self._reserved

    def schedule(self) -> tuple[list[Request], list[Request]]:
        """Admit waiting requests that fit. Returns (admitted, cancelled or expired while waiting)."""
        admitted: list[Request] = []
        dropped: list[Request] = []
        now = time.monotonic()
        with self._lock:
            if any(r.deadline is not None or r.cancelled for r in self._waiting):
                ended = [r for r in self._waiting if r.ended_reason(now) is not None]
                for r in ended:
                    self._waiting.remove(r)
                dropped.extend(ended)
            while self._waiting:
                head = self._waiting[0]
                rows = len(self.running) + len(admitted)
                if rows >= self.max_batch_size or self._reserved + head.reserved_tokens > self.max_batch_tokens:
                    break
                self._waiting.popleft()
                self._reserved += head.reserved_tokens
                head.status = RequestStatus.RUNNING
                admitted.append(head)
        self.running.extend(admitted)
        return admitted, dropped

    def finish(self, request: Request) -> None:
        """Release a running row's reservation (engine thread only)."""
        self.running.remove(request)
        self._reserved -= request.reserved_tokens
        request.status = RequestStatus.FINISHED

    def drain_waiting(self) -> list[Request]:
        """Remove and return every waiting request (used when the engine stops)."""
        with self._lock:
            out = list(self._waiting)
            self._waiting.clear()
        return out
