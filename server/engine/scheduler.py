"""The request lifecycle and the key/value pool's bookkeeping. No torch here: policy only.

waiting --schedule()--> running --finish()--> finished
               ^                  |
               +---- preempt() ---+   (pool exhausted mid-generation: blocks taken back, recomputed later)

Admission is FIFO under three limits: rows in the batch, tokens fed by one prefill pass, and what
the key/value pool can hold now (a row takes blocks for the tokens it feeds, plus its task's
shared soft-prompt prefix when that is not resident). Rows then grow one block at a time; when the
pool runs dry, cached prefixes nobody uses are evicted first, then the youngest rows are preempted.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from server.engine.block_cache import BlockCache
from server.engine.pool import BlockPool
from server.engine.prefix_cache import PrefixCache, PrefixEntry
from server.engine.request import Request, RequestStatus
from server.errors import QueueFull, ShuttingDown
from server.prompts.types import SoftPrompt

__all__ = ["QueueFull", "Scheduler", "ShuttingDown"]


@dataclass
class Plan:
    """What one schedule() decided."""

    admitted: list[Request] = field(default_factory=list)  # rows to prefill now
    dropped: list[Request] = field(default_factory=list)  # cancelled or expired while waiting
    rejected: list[Request] = field(default_factory=list)  # can never fit in the pool
    new_prefixes: list[tuple[PrefixEntry, SoftPrompt]] = field(default_factory=list)  # to fill before prefill


class Scheduler:
    def __init__(self, max_batch_size: int, max_batch_tokens: int, max_queue: int) -> None:
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens  # tokens one prefill pass may feed
        self.max_queue = max_queue
        self._waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: oldest first
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self.closed = False
        self._pool: BlockPool | None = None
        self._prefixes: PrefixCache | None = None
        self.blocks: BlockCache | None = None

    def bind(self, pool: BlockPool, prefixes: PrefixCache, blocks: BlockCache | None = None) -> None:
        """Attach the key/value pool, the soft-prompt prefixes and (optionally) the cache of input
        token blocks (the engine does this once)."""
        self._pool, self._prefixes, self.blocks = pool, prefixes, blocks

    @property
    def pool(self) -> BlockPool:
        assert self._pool is not None, "Scheduler.bind(pool, prefixes) first"
        return self._pool

    @property
    def prefixes(self) -> PrefixCache:
        assert self._prefixes is not None, "Scheduler.bind(pool, prefixes) first"
        return self._prefixes

    # ---- any thread ---------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Raises ShuttingDown after close(), QueueFull when the queue is at its limit."""
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
    def held_tokens(self) -> int:
        """Token slots held by running rows' own blocks (their tasks' shared prefixes not counted)."""
        return sum(len(r.kv.own_blocks) for r in list(self.running) if r.kv is not None) * self.pool.block_size

    # ---- engine thread ------------------------------------------------------------------------
    def schedule(self) -> Plan:
        """Admit waiting requests that fit now, oldest first."""
        plan = Plan()
        now = time.monotonic()
        fed = 0
        with self._lock:
            if any(r.deadline is not None or r.cancelled for r in self._waiting):
                ended = [r for r in self._waiting if r.ended_reason(now) is not None]
                for r in ended:
                    self._waiting.remove(r)
                plan.dropped.extend(ended)
            while self._waiting and len(self.running) < self.max_batch_size:
                head = self._waiting[0]
                tokens = len(head.input_ids) + len(head.output_ids)
                if plan.admitted and fed + tokens > self.max_batch_tokens:
                    break
                verdict = self._admit(head, plan)
                if verdict == "wait":
                    break
                self._waiting.popleft()
                if verdict == "never":
                    plan.rejected.append(head)
                    continue
                fed += tokens
                head.status = RequestStatus.RUNNING
                self.running.append(head)
                plan.admitted.append(head)
        return plan

    def _admit(self, req: Request, plan: Plan) -> str:
        """Give `req` its blocks: 'ok', 'wait' (not now) or 'never' (larger than the whole pool)."""
        pool, prefixes = self.pool, self.prefixes
        key = req.prompt.cache_key
        tokens = req.input_ids + req.output_ids
        entry = prefixes.peek(key)
        cached = self.blocks.match(key, tokens) if self.blocks is not None else []
        total = pool.blocks_for(len(tokens) + 1)  # +1: the first decode step
        need = total - len(cached) + (0 if entry is not None else pool.blocks_for(req.virtual_tokens))
        if need > pool.capacity:
            return "never"
        headroom = len(self.running)  # about one growth block per running row
        keep = set(cached)
        if not self._ensure_free(need + headroom, key, keep) and not (not self.running and self._ensure_free(need, key, keep)):
            return "wait"
        entry = prefixes.lookup(key)  # counted once, on admission
        if entry is None:
            entry = prefixes.create(key, req.virtual_tokens)
            plan.new_prefixes.append((entry, req.prompt))
        req.kv = prefixes.attach(entry)
        req.prefix_blocks = list(entry.seq.own_blocks)
        pool.share(cached)
        req.kv.own_blocks = cached + pool.allocate(total - len(cached))
        req.kv.own_len = len(cached) * pool.block_size  # already computed: prefill starts after them
        if self.blocks is not None:
            self.blocks.record_hit(len(cached))
        return "ok"

    def _ensure_free(self, blocks: int, key: tuple[str, str] | None = None, keep: set[int] = frozenset()) -> bool:  # type: ignore[assignment]
        """Evict what no row uses until `blocks` are free: token blocks first, then task prefixes."""
        if self.pool.num_free >= blocks:
            return True
        if self.blocks is not None and self.blocks.free_blocks(blocks, keep):
            return True
        return self.prefixes.free_blocks(blocks, key)

    def prefilled(self, requests: list[Request]) -> None:
        """Offer the rows' full blocks of input tokens to the token block cache."""
        if self.blocks is None:
            return
        for r in requests:
            if r.kv is not None:
                self.blocks.insert(r.prompt.cache_key, r.input_ids, r.kv.own_blocks)

    def grow(self) -> list[Request]:
        """Before a decode step: make room for one more token in every running row, preempting the
        youngest rows when the pool is exhausted. Returns the rows preempted."""
        preempted: list[Request] = []
        for req in list(self.running):
            if req not in self.running:  # preempted earlier in this loop
                continue
            assert req.kv is not None
            while req.kv.own_len + 1 > req.kv.own_capacity:
                if self._ensure_free(1):
                    req.kv.own_blocks += self.pool.allocate(1)
                    continue
                victim = self.running[-1]
                self.preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
        return preempted

    def preempt(self, req: Request) -> None:
        """Take a running row's blocks back; it waits at the head of the queue and is recomputed
        (input plus what it generated so far) when readmitted."""
        self.running.remove(req)
        self._release(req)
        req.status = RequestStatus.WAITING
        req.preemptions += 1
        self.pool.stats.preemptions += 1
        with self._lock:
            self._waiting.appendleft(req)

    def finish(self, request: Request) -> None:
        """A running row leaves: its blocks return to the pool (engine thread only)."""
        self.running.remove(request)
        self._release(request)
        request.status = RequestStatus.FINISHED
        self.prefixes.trim()

    def _release(self, req: Request) -> None:
        if req.kv is not None:
            self.pool.release(req.kv.own_blocks + req.prefix_blocks)
        req.kv, req.prefix_blocks = None, []

    def drain_waiting(self) -> list[Request]:
        """Remove and return every waiting request (used when the engine stops)."""
        with self._lock:
            out = list(self._waiting)
            self._waiting.clear()
        return out
