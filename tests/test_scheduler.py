"""Tests for server/engine/scheduler.py: FIFO admission against the key/value pool, shared prefixes,
growth, preemption and resume, and the queue's thread safety. No model, no torch tensors needed."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from server.engine.block_cache import BlockCache
from server.engine.pool import BlockPool
from server.engine.prefix_cache import PrefixCache
from server.engine.request import Request, RequestStatus, SamplingParams
from server.engine.scheduler import Policy, QueueFull, Scheduler, SchedulerConfig, ShuttingDown
from server.prompts.types import PromptKind, SoftPrompt

BS = 4  # block size in these tests


def soft_prompt(p: int, name: str | None = None) -> SoftPrompt:
    return SoftPrompt(
        name=name or f"task{p}",
        kind=PromptKind.PROMPT_TUNING,
        embeddings=torch.zeros(p, 8),
        content_hash="",
        source=Path("."),
    )


def req(virtual: int = 2, inputs: int = 3, max_new: int = 5, task: str | None = None) -> Request:
    return Request(
        task=task or f"task{virtual}",
        prompt=soft_prompt(virtual, task),
        input_ids=list(range(inputs)),
        params=SamplingParams(max_new_tokens=max_new),
        seed=0,
        sink=lambda event: None,
    )


def sched(
    rows: int = 100,
    tokens: int = 10_000,
    queue: int = 100,
    blocks: int = 1000,
    prefix_bytes: int = 1 << 20,
    **config: Any,
) -> Scheduler:
    pool = BlockPool(blocks + 1, BS)  # + the reserved block
    cache = PrefixCache(pool, 1, prefix_bytes)
    return Scheduler(
        SchedulerConfig(max_batch_size=rows, max_batch_tokens=tokens, max_queue=queue, **config), pool, cache
    )


def test_fifo_admission_and_status() -> None:
    s = sched()
    reqs = [req() for _ in range(5)]
    for r in reqs:
        s.add(r)
    assert s.num_waiting == 5
    plan = s.schedule()
    assert plan.admitted == reqs  # same objects, arrival order
    assert plan.dropped == [] and plan.rejected == []
    assert s.running == reqs
    assert all(r.status is RequestStatus.RUNNING for r in reqs)
    assert s.num_waiting == 0
    assert s.schedule().admitted == []  # nothing new


def test_row_limit() -> None:
    s = sched(rows=3)
    reqs = [req() for _ in range(5)]
    for r in reqs:
        s.add(r)
    assert s.schedule().admitted == reqs[:3]
    assert s.num_waiting == 2
    assert all(r.status is RequestStatus.WAITING for r in reqs[3:])
    assert s.schedule().admitted == []  # still full
    s.finish(reqs[1])
    assert s.schedule().admitted == [reqs[3]]  # exactly one row freed, the next in line takes it
    assert s.running == [reqs[0], reqs[2], reqs[3]]


def test_prefill_token_limit_counts_fed_tokens_but_always_admits_one() -> None:
    s = sched(tokens=10)
    reqs = [req(inputs=4) for _ in range(3)] + [req(inputs=30)]
    for r in reqs:
        s.add(r)
    assert s.schedule().admitted == reqs[:2]  # 4 + 4 <= 10 < 12
    assert s.schedule().admitted == [reqs[2]]  # the next pass
    assert s.schedule().admitted == [reqs[3]]  # larger than the limit alone: runs alone


def test_a_row_takes_blocks_for_its_own_tokens_and_shares_its_task_prefix() -> None:
    s = sched()
    a, b = req(virtual=6, inputs=5, task="t"), req(virtual=6, inputs=9, task="t")
    for r in (a, b):
        s.add(r)
    plan = s.schedule()
    assert [e.key[0] for e, _ in plan.new_prefixes] == ["t"]  # computed once for both rows
    assert a.kv is not None and b.kv is not None
    assert len(a.kv.own_blocks) == 2 and len(b.kv.own_blocks) == 3  # ceil((L + 1) / 4): own tokens only
    assert a.kv.prefix_slots == b.kv.prefix_slots and len(a.kv.prefix_slots) == 6  # the same slots
    assert not set(a.kv.own_blocks) & set(b.kv.own_blocks)
    prefix_block = a.prefix_blocks[0]
    assert s.pool.refs(prefix_block) == 3  # the cache and both rows
    assert s.pool.num_used == 2 + 2 + 3
    s.finish(a)
    s.finish(b)
    assert s.pool.refs(prefix_block) == 1 and s.pool.num_used == 2  # only the cached prefix is left
    assert s.held_tokens == 0


def test_cached_prefix_is_reused_and_counted() -> None:
    s = sched()
    first = req(task="t")
    s.add(first)
    assert len(s.schedule().new_prefixes) == 1
    s.finish(first)
    second = req(task="t")
    s.add(second)
    assert s.schedule().new_prefixes == []  # resident: nothing to compute
    assert s.prefixes.stats.misses == 1 and s.prefixes.stats.hits == 1


def test_without_a_budget_a_prefix_lives_only_while_used() -> None:
    s = sched(prefix_bytes=0)
    a, b = req(task="t"), req(task="t")
    s.add(a)
    s.add(b)
    assert len(s.schedule().new_prefixes) == 1  # still shared by rows running together
    s.finish(a)
    assert len(s.prefixes) == 1  # b still uses it
    s.finish(b)
    assert len(s.prefixes) == 0 and s.pool.num_used == 0


def test_admission_waits_for_the_pool_fifo_and_unused_prefixes_are_evicted_for_room() -> None:
    s = sched(blocks=8)
    old = req(virtual=4, inputs=3, task="old")  # prefix 1 block + own 1 block
    s.add(old)
    s.schedule()
    s.finish(old)  # its prefix stays cached (1 block)
    big = req(virtual=4, inputs=24, task="big")  # 1 + 7 blocks: fits only if "old"'s prefix goes
    small = req(virtual=4, inputs=1, task="old")
    s.add(big)
    s.add(small)
    assert s.schedule().admitted == [big]
    assert "old" not in {k[0] for k in (e.key for e in s.prefixes.entries())}
    assert s.prefixes.stats.evictions == 1
    assert s.schedule().admitted == []  # small waits behind: no room, and it cannot overtake
    s.finish(big)
    assert s.schedule().admitted == [small]


def test_larger_than_the_whole_pool_is_rejected_not_waited_for() -> None:
    s = sched(blocks=4)
    huge, fine = req(inputs=40), req()
    s.add(huge)
    s.add(fine)
    plan = s.schedule()
    assert plan.rejected == [huge] and plan.admitted == [fine]


def test_rows_grow_one_block_at_a_time() -> None:
    s = sched()
    r = req(virtual=0, inputs=3)
    s.add(r)
    s.schedule()
    r.kv.own_len = 3  # prefilled
    s.grow()
    assert len(r.kv.own_blocks) == 1  # 3 tokens + the first decode token fit in one block
    r.kv.own_len = 4
    s.grow()  # the 5th own token needs a second block
    assert len(r.kv.own_blocks) == 2 and s.pool.num_used == 2


def test_exhausted_pool_preempts_the_youngest_and_resumes_it_first() -> None:
    s = sched(blocks=6)
    a, b, c = (req(virtual=0, inputs=3, task=f"t{i}") for i in range(3))  # 1 own block each, no prefix

    def write(tokens: int) -> None:
        for r in s.running:
            for _ in range(tokens):
                r.output_ids.append(0)
                r.kv.own_len += 1

    for r in (a, b, c):
        s.add(r)
    assert s.schedule().admitted == [a, b, c]
    for r in (a, b, c):
        r.kv.own_len = 3  # prefilled
    assert s.grow() == [] and s.pool.num_free == 3  # the first decode token fits the first block
    write(1)
    assert s.grow() == [] and s.pool.num_free == 0  # each row takes its second block
    write(4)
    preempted = s.grow()  # a needs a third block: c, the youngest, gives its two back
    assert preempted == [c] and c.status is RequestStatus.WAITING and c.kv is None
    assert s.running == [a, b] and all(len(r.kv.own_blocks) == 3 for r in (a, b))
    assert c.preemptions == 1 and s.pool.stats.preemptions == 1
    # c waits at the head of the queue, keeping what it generated: on resume it feeds input + output
    # so far (recompute) and takes blocks for exactly that.
    late = req(virtual=0, inputs=1, task="late")
    s.add(late)
    s.finish(a)
    assert s.schedule().admitted == []  # 3 blocks free: c's 3 plus one block of headroom for b do not fit yet
    s.finish(b)
    plan = s.schedule()
    assert plan.admitted == [c, late]
    assert len(c.kv.own_blocks) == s.pool.blocks_for(len(c.input_ids) + len(c.output_ids) + 1)


def test_cancelled_waiting_requests_are_dropped_not_admitted() -> None:
    s = sched()
    reqs = [req() for _ in range(5)]
    for r in reqs:
        s.add(r)
    reqs[0].cancel()
    reqs[3].cancel()
    plan = s.schedule()
    assert plan.admitted == [reqs[1], reqs[2], reqs[4]]
    assert plan.dropped == [reqs[0], reqs[3]]
    assert all(r not in s.running and r.kv is None for r in plan.dropped)  # they hold no blocks
    assert s.num_waiting == 0
    assert s.schedule().dropped == []  # reported once


def test_cancelled_request_behind_a_blocked_head_is_never_admitted() -> None:
    s = sched(rows=1)
    first, second, third = req(), req(), req()
    for r in (first, second, third):
        s.add(r)
    assert s.schedule().admitted == [first]
    second.cancel()
    s.finish(first)
    plan = s.schedule()
    assert plan.admitted == [third] and plan.dropped == [second]
    assert second.status is RequestStatus.WAITING  # never ran


def test_queue_full_beyond_max_queue() -> None:
    s = sched(rows=1, queue=3)
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


def test_close_refuses_new_requests_and_keeps_the_accepted_ones() -> None:
    s = sched(rows=1)
    accepted = [req(), req()]
    for r in accepted:
        s.add(r)
    s.close()
    late = req()
    with pytest.raises(ShuttingDown):
        s.add(late)
    assert s.num_waiting == 2
    assert s.schedule().admitted == [accepted[0]]
    s.finish(accepted[0])
    assert s.schedule().admitted == [accepted[1]]
    assert late.status is RequestStatus.WAITING and late not in s.running


def test_drain_waiting_returns_everything_waiting() -> None:
    s = sched(rows=1)
    reqs = [req() for _ in range(4)]
    for r in reqs:
        s.add(r)
    s.schedule()
    assert s.drain_waiting() == reqs[1:]
    assert s.num_waiting == 0
    assert s.drain_waiting() == []
    assert s.running == [reqs[0]]


@pytest.mark.parametrize("policy", [Policy.FIFO, Policy.FAIR])
def test_concurrent_add_from_many_threads(policy: Policy) -> None:
    threads_n, per_thread = 8, 200
    s = sched(rows=10_000, tokens=10**9, queue=threads_n * per_thread - 50, blocks=20_000, policy=policy)
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
    accepted = sum(len(m) for m in made)
    assert accepted + sum(rejected) == threads_n * per_thread and s.num_waiting == accepted  # none lost
    if policy is Policy.FIFO:
        assert sum(rejected) == 50  # exactly max_queue accepted, none over the limit
    else:  # a full queue still lets in a task below its share: every task holds at least its share
        assert all(len(m) >= s.config.max_queue / threads_n for m in made)
    admitted = s.schedule().admitted
    assert len(admitted) == accepted
    assert {id(r) for r in admitted} == {id(r) for rs in made for r in rs}
    for k in range(threads_n):  # per thread, the queue keeps each thread's own order
        assert [r for r in admitted if r.task == f"thread{k}"] == made[k]


def test_concurrent_add_while_the_engine_thread_schedules() -> None:
    producers, per_thread = 4, 250
    s = sched(rows=7, tokens=10**9, queue=10**6)
    seen: list[Request] = []
    done = threading.Event()
    errors: list[BaseException] = []

    def engine() -> None:
        try:
            while True:
                finished_adding = done.is_set()
                plan = s.schedule()
                assert plan.dropped == [] and len(s.running) <= 7
                seen.extend(plan.admitted)
                for r in list(s.running):
                    s.finish(r)
                if finished_adding and not plan.admitted and s.num_waiting == 0:
                    return
        except BaseException as e:  # surface assertion failures from this thread
            errors.append(e)

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
    eng.join(timeout=30)
    assert not eng.is_alive() and errors == []
    assert len(seen) == producers * per_thread
    assert len({id(r) for r in seen}) == len(seen)  # each admitted exactly once
    assert all(r.status is RequestStatus.FINISHED for r in seen)
    assert s.held_tokens == 0 and s.running == []


def sched_with_blocks(blocks: int = 1000) -> Scheduler:
    pool = BlockPool(blocks + 1, BS)
    cache = PrefixCache(pool, 1, 1 << 20)
    return Scheduler(
        SchedulerConfig(max_batch_size=100, max_batch_tokens=10_000, max_queue=100),
        pool,
        cache,
        BlockCache(pool),
    )


def test_token_blocks_are_reused_by_the_same_task_version_only() -> None:
    s = sched_with_blocks()
    first = req(virtual=2, inputs=13, task="t")  # 3 full blocks of 4
    s.add(first)
    s.schedule()
    first.kv.own_len = 13
    s.prefilled([first])
    cached = first.kv.own_blocks[:3]
    s.finish(first)
    assert len(s.blocks) == 3 and all(s.pool.refs(b) == 1 for b in cached)  # kept by the cache alone
    again = req(virtual=2, inputs=13, task="t")
    s.add(again)
    s.schedule()
    assert again.kv.own_blocks[:3] == cached and again.kv.own_len == 12  # feeds only the 13th token
    replaced = Request(
        task="t",
        prompt=SoftPrompt(
            name="t",
            kind=PromptKind.PROMPT_TUNING,
            embeddings=torch.zeros(2, 8),
            content_hash="v2",
            source=Path("."),
        ),
        input_ids=list(range(13)),
        params=SamplingParams(max_new_tokens=5),
        seed=0,
        sink=lambda e: None,
    )
    s.add(replaced)
    s.schedule()
    assert replaced.kv.own_len == 0 and not set(replaced.kv.own_blocks) & set(cached)
    assert s.blocks.stats.hit_tokens == 12 and s.blocks.stats.queries == 3


def test_unused_token_blocks_are_evicted_for_room_chain_ends_first() -> None:
    s = sched_with_blocks(blocks=6)
    first = req(virtual=0, inputs=12, task="t")  # 3 full blocks + 1 for the first decode token
    s.add(first)
    s.schedule()
    first.kv.own_len = 12
    s.prefilled([first])
    chain = first.kv.own_blocks[:3]
    s.finish(first)
    other = req(virtual=0, inputs=19, task="u")  # needs 5 blocks: 3 free + 2 evicted from the cached chain
    s.add(other)
    assert s.schedule().admitted == [other]
    assert s.blocks.stats.evictions == 2 and s.pool.refs(chain[0]) == 1  # the chain's head survives
    assert len(s.blocks) == 1
