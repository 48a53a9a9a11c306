"""Tests for server/engine/scheduler.py: FIFO admission under row and token limits."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from server.engine.request import Request, RequestStatus, SamplingParams
from server.engine.scheduler import QueueFull, Scheduler, ShuttingDown
from server.prompts.types import PromptKind, SoftPrompt


def soft_prompt(p: int) -> SoftPrompt:
    return SoftPrompt(name=f"task{p}", kind=PromptKind.PROMPT_TUNING, embeddings=torch.zeros(p, 8), content_hash="", source=Path("."))


def req(virtual: int = 2, inputs: int = 3, max_new: int = 5, task: str = "t") -> Request:
    return Request(
        task=task,
        prompt=soft_prompt(virtual),
        input_ids=list(range(inputs)),
        params=SamplingParams(max_new_tokens=max_new),
        seed=0,
        sink=lambda event: None,
    )


def test_reserved_tokens_is_virtual_plus_input_plus_max_new() -> None:
    assert req(virtual=4, inputs=7, max_new=11).reserved_tokens == 22
    assert req(virtual=0, inputs=1, max_new=1).reserved_tokens == 2


def test_fifo_admission_and_status() -> None:
    s = Scheduler(max_batch_size=10, max_batch_tokens=10_000, max_queue=100)
    reqs = [req() for _ in range(5)]
    for r in reqs:
        s.add(r)
    assert s.num_waiting == 5
    admitted, dropped = s.schedule()
    assert admitted == reqs  # same objects, arrival order
    assert dropped == []
    assert s.running == reqs
    assert all(r.status is RequestStatus.RUNNING for r in reqs)
    assert s.num_waiting == 0
    assert s.reserved_tokens == sum(r.reserved_tokens for r in reqs)
    assert s.schedule() == ([], [])  # nothing new


def test_row_limit() -> None:
    s = Scheduler(max_batch_size=3, max_batch_tokens=10_000, max_queue=100)
    reqs = [req() for _ in range(5)]
    for r in reqs:
        s.add(r)
    admitted, _ = s.schedule()
    assert admitted == reqs[:3]
    assert s.num_waiting == 2
    assert all(r.status is RequestStatus.WAITING for r in reqs[3:])
    assert s.schedule()[0] == []  # still full
    s.finish(reqs[1])
    admitted, _ = s.schedule()
    assert admitted == [reqs[3]]  # exactly one row freed, the next in line takes it
    assert s.running == [reqs[0], reqs[2], reqs[3]]


def test_token_limit_counts_virtual_input_and_max_new() -> None:
    # each reserves 2 + 3 + 5 = 10 tokens
    s = Scheduler(max_batch_size=100, max_batch_tokens=35, max_queue=100)
    reqs = [req(virtual=2, inputs=3, max_new=5) for _ in range(4)]
    for r in reqs:
        s.add(r)
    admitted, _ = s.schedule()
    assert admitted == reqs[:3]
    assert s.reserved_tokens == 30
    # an exact fit is allowed
    s2 = Scheduler(max_batch_size=100, max_batch_tokens=40, max_queue=100)
    for r in [req(virtual=2, inputs=3, max_new=5) for _ in range(4)]:
        s2.add(r)
    assert len(s2.schedule()[0]) == 4
    assert s2.reserved_tokens == 40
    # virtual tokens alone can tip it over: 9 + 1 + 1 = 11 > 10
    s3 = Scheduler(max_batch_size=100, max_batch_tokens=10, max_queue=100)
    s3.add(req(virtual=9, inputs=1, max_new=1))
    assert s3.schedule()[0] == []
    # and max_new_tokens alone too: 1 + 1 + 9 = 11 > 10
    s4 = Scheduler(max_batch_size=100, max_batch_tokens=10, max_queue=100)
    s4.add(req(virtual=1, inputs=1, max_new=9))
    assert s4.schedule()[0] == []


def test_finish_releases_the_reservation() -> None:
    s = Scheduler(max_batch_size=100, max_batch_tokens=25, max_queue=100)
    a, b, c = req(max_new=5), req(max_new=5), req(max_new=5)  # 10 each
    for r in (a, b, c):
        s.add(r)
    assert s.schedule()[0] == [a, b]
    assert s.reserved_tokens == 20
    s.finish(a)
    assert s.reserved_tokens == 10
    assert a.status is RequestStatus.FINISHED
    assert a not in s.running
    assert s.schedule()[0] == [c]
    s.finish(b)
    s.finish(c)
    assert s.reserved_tokens == 0
    assert s.running == []


def test_head_of_line_blocking_prevents_starvation_of_large_requests() -> None:
    s = Scheduler(max_batch_size=100, max_batch_tokens=100, max_queue=100)
    running = req(virtual=0, inputs=10, max_new=40)  # 50
    s.add(running)
    assert s.schedule()[0] == [running]
    big = req(virtual=0, inputs=20, max_new=40)  # 60: does not fit next to 50
    small = [req(virtual=0, inputs=1, max_new=4) for _ in range(3)]  # 5 each: would fit
    s.add(big)
    for r in small:
        s.add(r)
    # The small ones must wait behind the big one rather than overtake it.
    assert s.schedule()[0] == []
    assert big.status is RequestStatus.WAITING and all(r.status is RequestStatus.WAITING for r in small)
    assert s.num_waiting == 4
    # More small arrivals cannot overtake it either.
    late = req(virtual=0, inputs=1, max_new=1)
    s.add(late)
    assert s.schedule()[0] == []
    s.finish(running)
    admitted, _ = s.schedule()
    assert admitted[0] is big  # the big request goes first once room frees up
    assert admitted == [big, *small, late]  # 60 + 15 + 2 <= 100
    assert s.reserved_tokens == 77


def test_queue_full_beyond_max_queue() -> None:
    s = Scheduler(max_batch_size=1, max_batch_tokens=1000, max_queue=3)
    for _ in range(3):
        s.add(req())
    with pytest.raises(QueueFull):
        s.add(req())
    assert s.num_waiting == 3
    s.schedule()  # one leaves the queue for the batch
    s.add(req())  # so there is room again
    with pytest.raises(QueueFull):
        s.add(req())
    assert s.num_waiting == 3


def test_cancelled_waiting_requests_are_dropped_not_admitted() -> None:
    s = Scheduler(max_batch_size=10, max_batch_tokens=1000, max_queue=100)
    reqs = [req() for _ in range(5)]
    for r in reqs:
        s.add(r)
    reqs[0].cancel()
    reqs[3].cancel()
    admitted, dropped = s.schedule()
    assert admitted == [reqs[1], reqs[2], reqs[4]]
    assert dropped == [reqs[0], reqs[3]]
    assert all(r not in s.running for r in dropped)
    assert s.reserved_tokens == 3 * reqs[1].reserved_tokens  # the dropped reserve nothing
    assert s.num_waiting == 0
    assert s.schedule() == ([], [])  # reported once


def test_cancelled_request_behind_a_blocked_head_is_never_admitted() -> None:
    s = Scheduler(max_batch_size=1, max_batch_tokens=1000, max_queue=100)
    first, second, third = req(), req(), req()
    for r in (first, second, third):
        s.add(r)
    assert s.schedule()[0] == [first]
    second.cancel()
    s.finish(first)
    admitted, dropped = s.schedule()
    assert admitted == [third]
    assert dropped == [second]
    assert second.status is RequestStatus.WAITING  # never ran


def test_close_refuses_new_requests_and_keeps_the_accepted_ones() -> None:
    s = Scheduler(max_batch_size=1, max_batch_tokens=1000, max_queue=100)
    accepted = [req(), req()]
    for r in accepted:
        s.add(r)
    s.close()
    late = req()
    with pytest.raises(ShuttingDown):
        s.add(late)
    assert s.num_waiting == 2
    assert s.schedule() == ([accepted[0]], [])
    s.finish(accepted[0])
    assert s.schedule() == ([accepted[1]], [])
    assert late.status is RequestStatus.WAITING and late not in s.running


def test_drain_waiting_returns_everything_waiting() -> None:
    s = Scheduler(max_batch_size=1, max_batch_tokens=1000, max_queue=100)
    reqs = [req() for _ in range(4)]
    for r in reqs:
        s.add(r)
    s.schedule()
    assert s.drain_waiting() == reqs[1:]
    assert s.num_waiting == 0
    assert s.drain_waiting() == []
    assert s.running == [reqs[0]]


def test_concurrent_add_from_many_threads() -> None:
    threads_n, per_thread = 8, 200
    s = Scheduler(max_batch_size=10_000, max_batch_tokens=10**9, max_queue=threads_n * per_thread - 50)
    made: list[list[Request]] = [[] for _ in range(threads_n)]
    rejected = [0] * threads_n
    barrier = threading.Barrier(threads_n)

    def worker(k: int) -> None:
        barrier.wait()
        for _ in range(per_thread):
            r = req(task=f"thread{k}")
            try:
                s.add(r)
                made[k].append(r)
            except QueueFull:
                rejected[k] += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Exactly max_queue were accepted: none lost, none over the limit.
    assert sum(rejected) == 50
    assert s.num_waiting == s.max_queue
    admitted, dropped = s.schedule()
    assert dropped == []
    assert len(admitted) == s.max_queue
    assert len({id(r) for r in admitted}) == len(admitted)
    assert {id(r) for r in admitted} == {id(r) for rs in made for r in rs}
    # Per thread, the queue keeps each thread's own order.
    for k in range(threads_n):
        assert [r for r in admitted if r.task == f"thread{k}"] == made[k]


def test_concurrent_add_while_the_engine_thread_schedules() -> None:
    producers, per_thread = 4, 250
    s = Scheduler(max_batch_size=7, max_batch_tokens=10**9, max_queue=10**6)
    seen: list[Request] = []
    done = threading.Event()
    errors: list[BaseException] = []

    def engine() -> None:
        try:
            run_engine()
        except BaseException as e:  # surface assertion failures from this thread
            errors.append(e)

    def run_engine() -> None:
        while True:
            finished_adding = done.is_set()
            admitted, dropped = s.schedule()
            assert dropped == []
            assert len(s.running) <= 7
            seen.extend(admitted)
            for r in list(s.running):
                s.finish(r)
            if finished_adding and not admitted and s.num_waiting == 0:
                return

    def producer(k: int) -> None:
        for _ in range(per_thread):
            s.add(req(task=f"p{k}"))

    eng = threading.Thread(target=engine)
    eng.start()
    ps = [threading.Thread(target=producer, args=(k,)) for k in range(producers)]
    for t in ps:
        t.start()
    for t in ps:
        t.join()
    done.set()
    eng.join(timeout=10)
    assert not eng.is_alive()
    assert errors == []
    assert len(seen) == producers * per_thread
    assert len({id(r) for r in seen}) == len(seen)  # each admitted exactly once
    assert all(r.status is RequestStatus.FINISHED for r in seen)
    assert s.reserved_tokens == 0 and s.running == []
