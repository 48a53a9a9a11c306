"""The request lifecycle and the key/value pool's bookkeeping. No torch here: policy only.

waiting --schedule()--> running --finish()--> finished
               ^                  |
               +---- preempt() ---+   (pool exhausted, a starved task or a more urgent request:
                                        blocks taken back, recomputed later)

Waiting requests queue per task (server/engine/fairness.py): each task within its quota, the whole
queue within --max-queue. Admission takes the next request from the task served least (weighted),
under three limits: rows in the batch, tokens fed by one prefill pass, and what the key/value pool
can hold now (a row takes blocks for the tokens it feeds, plus its task's shared soft-prompt prefix
when that is not resident). When every row is taken, a task with no row, or a more urgent request,
takes one back from the most served task. Rows then grow one block at a time; when the pool runs
dry, cached prefixes nobody uses are evicted first, then rows are preempted (least urgent, youngest).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from server.engine.block_cache import BlockCache
from server.engine.fairness import Policy, TaskQueues
from server.engine.pool import BlockPool, SeqBlocks
from server.engine.prefix_cache import PrefixCache, PrefixEntry
from server.engine.request import Request, RequestStatus
from server.errors import QueueFull, ShuttingDown
from server.prompts.settings import TaskSettings
from server.prompts.types import SoftPrompt

__all__ = ["Policy", "QueueFull", "Scheduler", "SchedulerConfig", "ShuttingDown"]

log = logging.getLogger("softmux.scheduler")


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler's limits and policy (the engine builds the scheduler over its pool)."""

    max_batch_size: int = 32  # rows in the running batch
    max_batch_tokens: int = 16384  # tokens one prefill pass may feed
    max_queue: int = 256  # waiting requests of all tasks together
    max_queue_per_task: int = (
        0  # cap on one task's waiting requests unless its task.json says (0: its share only)
    )
    policy: Policy = Policy.FAIR


@dataclass
class Plan:
    """What one schedule() decided."""

    admitted: list[Request] = field(default_factory=list)  # rows to prefill now
    dropped: list[Request] = field(default_factory=list)  # cancelled or expired while waiting
    rejected: list[Request] = field(default_factory=list)  # can never fit in the pool
    preempted: list[Request] = field(
        default_factory=list
    )  # rows taken back for a starved task or a more urgent request
    new_prefixes: list[tuple[PrefixEntry, SoftPrompt]] = field(default_factory=list)  # to fill before prefill


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        pool: BlockPool,
        prefixes: PrefixCache,
        blocks: BlockCache | None = None,
    ) -> None:
        """`blocks`: the cache of input-token blocks (None: off)."""
        self.config = config
        self.pool, self.prefixes, self.blocks = pool, prefixes, blocks
        self._queues = TaskQueues(config.policy)
        self.running: list[Request] = []  # admission order: oldest first
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self.closed = False
        self._admissions = itertools.count(1)
        self.forked = 0  # samples that joined the batch sharing their parent's prefill

    def task_quota(self, settings: TaskSettings) -> int | None:
        """Waiting requests one task may hold whatever the others do (None: no cap but its share)."""
        if self.config.policy is Policy.FIFO:
            return None
        if settings.max_queue is not None:
            return settings.max_queue
        return self.config.max_queue_per_task or None

    # ---- any thread ---------------------------------------------------------------------------
    def add(self, request: Request, *, bounded: bool = True) -> None:
        """Raises ShuttingDown after close(), QueueFull when the queue or the task's quota is full.
        `bounded=False`: past the queue limits (the engine's own warm-up requests)."""
        with self._lock:
            if self.closed:
                raise ShuttingDown("the server is shutting down and accepts no new requests")
            if bounded:
                self._check_room(request.task, request.prompt.settings)
            self._queues.push(request)
            self._wakeup.notify()

    def check_room(self, task: str, settings: TaskSettings) -> None:
        """Raise QueueFull now if a request of `task` would be refused (before tokenising it)."""
        with self._lock:
            self._check_room(task, settings)

    def _check_room(self, task: str, settings: TaskSettings) -> None:
        """The queue holds --max-queue requests. When it is full, a task below its weighted share of it
        (weight / the weights of the tasks waiting, itself included) is still let in, so a flood that
        filled the queue alone never locks the other tasks out; the queue then holds at most twice
        --max-queue. A task's own cap (task.json max_queue, --max-queue-per-task) applies always."""
        queue = self._queues.task(task)
        waiting, total, size = len(queue.waiting), len(self._queues), self.config.max_queue
        quota = self.task_quota(settings)
        if quota is not None and waiting >= quota:
            queue.refused += 1
            raise QueueFull(
                f"task {task!r} has {quota} requests waiting, its quota (task.json max_queue, "
                "--max-queue-per-task)"
            )
        if total < size:
            return
        share = self._queues.share(task, settings.weight, size)
        if self.config.policy is Policy.FAIR and waiting < share and total < 2 * size:
            return
        queue.refused += 1
        raise QueueFull(
            f"queue is full ({total} waiting requests; task {task!r} holds {waiting}, "
            f"its share is {share:.0f})"
        )

    def wait_for_work(self, timeout: float) -> None:
        """Block the engine thread until something is waiting (or timeout)."""
        with self._lock:
            if not len(self._queues) and not self.running:
                self._wakeup.wait(timeout)

    def close(self) -> None:
        """Refuse new requests from now on; those already accepted still run."""
        with self._lock:
            self.closed = True
            self._wakeup.notify_all()

    @property
    def idle(self) -> bool:
        with self._lock:
            return not len(self._queues) and not self.running

    def notify(self) -> None:
        with self._lock:
            self._wakeup.notify_all()

    @property
    def num_waiting(self) -> int:
        return len(self._queues)

    def task_stats(self) -> dict[str, dict[str, float | int]]:
        """Per task: waiting, running, weight, fairness counter, tokens served, admitted, refused,
        preempted."""
        with self._lock:
            return self._queues.stats()

    def forget(self, task: str) -> None:
        """Drop an idle task's counters (the engine's warm-up task)."""
        with self._lock:
            self._queues.forget(task)

    @property
    def held_tokens(self) -> int:
        """Token slots held by running rows' own blocks (their tasks' shared prefixes not counted)."""
        return (
            sum(len(r.kv.own_blocks) for r in list(self.running) if r.kv is not None) * self.pool.block_size
        )

    # ---- engine thread ------------------------------------------------------------------------
    def schedule(self) -> Plan:
        """Admit waiting requests that fit now, the least served task first."""
        plan = Plan()
        with self._lock:
            self._drop_ended(plan, time.monotonic())
            fed = 0
            while heads := self._queues.candidates():
                head = heads[0]
                tokens = len(head.input_ids) + len(head.output_ids)
                if plan.admitted and fed + tokens > self.config.max_batch_tokens:
                    break
                # n samples take their rows together, forked from one prefill: rows for the forks of
                # requests admitted in this plan are spoken for.
                taken = len(self.running) + sum(len(r.forks) for r in plan.admitted)
                if head.forks and taken and taken + 1 + len(head.forks) > self.config.max_batch_size:
                    break
                if len(self.running) >= self.config.max_batch_size and not self._make_room(head, plan):
                    break
                verdict = self._admit(head, plan)
                if verdict == "wait":
                    break
                if verdict == "never":
                    self._queues.remove(head)
                    plan.rejected.append(head)
                    continue
                fed += tokens
                self._queues.admit(head)
                head.status = RequestStatus.RUNNING
                head.admit_order = next(self._admissions)
                self.running.append(head)
                plan.admitted.append(head)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("admit request %d of task %r: %s", head.id, head.task, self._why(head, heads))
        return plan

    def _drop_ended(self, plan: Plan, now: float) -> None:
        """Waiting requests whose client left or whose deadline passed leave the queue (caller holds the
        lock)."""
        ended = [r for r in self._queues if r.ended_reason(now) is not None]
        for r in ended:
            self._queues.remove(r)
        plan.dropped.extend(sorted(ended, key=lambda r: r.id))

    def _make_room(self, head: Request, plan: Plan) -> bool:
        """Every row is taken: preempt one for `head` if the policy says so (caller holds the lock)."""
        victim = self._queues.victim_for(head, [r for r in self.running if r not in plan.admitted])
        if victim is None:
            return False
        log.debug(
            "request %d of task %r takes the row of request %d (task %r)",
            head.id,
            head.task,
            victim.id,
            victim.task,
        )
        self._take_back(victim)
        plan.preempted.append(victim)
        return True

    def _why(self, head: Request, heads: list[Request]) -> str:
        stats = self._queues.task(head.task)
        rivals = ", ".join(f"{r.task}={self._queues.task(r.task).counter:.0f}" for r in heads[1:4])
        return (
            f"priority {head.priority}, counter {stats.counter:.0f}, {stats.running} running; "
            f"next in line: {rivals or 'none'}"
        )

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
        if not self._ensure_free(need + headroom, key, keep) and not (
            not self.running and self._ensure_free(need, key, keep)
        ):
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

    def _ensure_free(
        self,
        blocks: int,
        key: tuple[str, str] | None = None,
        keep: set[int] = frozenset(),  # type: ignore[assignment]
    ) -> bool:
        """Evict what no row uses until `blocks` are free: token blocks first, then task prefixes."""
        if self.pool.num_free >= blocks:
            return True
        if self.blocks is not None and self.blocks.free_blocks(blocks, keep):
            return True
        return self.prefixes.free_blocks(blocks, key)

    def prefilled(
        self, requests: list[Request], prefixes: Sequence[tuple[PrefixEntry, SoftPrompt]] = ()
    ) -> None:
        """After a prefill pass: the new prefixes and every row's tokens are now in their slots (the
        runner writes, the scheduler counts); the rows' full blocks of input tokens are offered to the
        token block cache."""
        for entry, _ in prefixes:
            entry.seq.own_len = entry.length
        for r in requests:
            assert r.kv is not None
            r.kv.own_len = len(r.input_ids) + len(r.output_ids)
            if self.blocks is not None:
                self.blocks.insert(r.prompt.cache_key, r.input_ids, r.kv.own_blocks)

    def decoded(self, requests: list[Request]) -> None:
        """After a decode pass: each row's newest token is now in its slot."""
        for r in requests:
            assert r.kv is not None
            r.kv.own_len += 1

    def fork(self, parent: Request, child: Request) -> list[tuple[int, int]] | None:
        """`child` (another sample of `parent`'s prompt) joins the batch holding what `parent` just
        prefilled: its full blocks and soft-prompt prefix by reference, and its own copy of the block
        the parent writes next. Returns the blocks to copy (source, destination), or None when there is
        no row or no memory for it now (the child then waits and is prefilled like any request)."""
        assert parent.kv is not None
        if len(self.running) >= self.config.max_batch_size:
            return None
        kv, bs = parent.kv, self.pool.block_size
        full = kv.own_len // bs
        private = len(kv.own_blocks) - full  # the block being written (and any after it)
        if not self._ensure_free(private + len(self.running)):
            return None
        own = self.pool.allocate(private)
        shared = kv.own_blocks[:full]
        self.pool.share(shared + parent.prefix_blocks)
        child.kv = SeqBlocks(
            bs, prefix_slots=list(kv.prefix_slots), own_blocks=shared + own, own_len=kv.own_len
        )
        child.prefix_blocks = list(parent.prefix_blocks)
        with self._lock:
            self._queues.joined(child)
        child.status = RequestStatus.RUNNING
        child.admit_order = next(self._admissions)
        self.running.append(child)
        self.forked += 1
        return [(kv.own_blocks[full], own[0])] if kv.own_len % bs else []

    def grow(self) -> list[Request]:
        """Before a decode step: make room for one more token in every running row, preempting
        (least urgent, then youngest) when the pool is exhausted. Returns the rows preempted."""
        preempted: list[Request] = []
        for req in list(self.running):
            if req not in self.running:  # preempted earlier in this loop
                continue
            assert req.kv is not None
            while req.kv.own_len + 1 > req.kv.own_capacity:
                if self._ensure_free(1):
                    req.kv.own_blocks += self.pool.allocate(1)
                    continue
                victim = self._queues.victim_for_memory(self.running)
                self.preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
        return preempted

    def preempt(self, req: Request) -> None:
        """Take a running row's blocks back; it waits again in its task's queue, ahead of the requests
        that came after it, and is recomputed (input plus what it generated so far) when readmitted."""
        with self._lock:
            self._take_back(req)

    def _take_back(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.status = RequestStatus.WAITING
        req.preemptions += 1
        self.pool.stats.preemptions += 1
        self._queues.push_back(req)

    def served(self, rows: list[Request]) -> None:
        """One generated token for each of `rows` (engine thread, after a pass): charged to their tasks."""
        with self._lock:
            for r in rows:
                self._queues.served(r)

    def finish(self, request: Request) -> None:
        """A running row leaves: its blocks return to the pool (engine thread only)."""
        self.running.remove(request)
        self._release(request)
        request.status = RequestStatus.FINISHED
        with self._lock:
            self._queues.left(request)
        self.prefixes.trim()

    def _release(self, req: Request) -> None:
        if req.kv is not None:
            self.pool.release(req.kv.own_blocks + req.prefix_blocks)
        req.kv, req.prefix_blocks = None, []

    def drain_waiting(self) -> list[Request]:
        """Remove and return every waiting request (used when the engine stops)."""
        with self._lock:
            return self._queues.drain()
