"""Tests for server/engine/fairness.py through the scheduler: tasks as tenants. Counters (VTC), lifting,
weights, per-task quotas and caps, priorities and the preemptions that make a starved task or a
more urgent request run now. No model: the decode loop is simulated on the torch-free scheduler."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from server.engine.fairness import INPUT_TOKEN_COST, OUTPUT_TOKEN_COST, Policy
from server.engine.pool import BlockPool
from server.engine.prefix_cache import PrefixCache
from server.engine.request import Request, RequestStatus, SamplingParams
from server.engine.scheduler import QueueFull, Scheduler, SchedulerConfig
from server.prompts.settings import TaskSettings
from server.prompts.types import PromptKind, SoftPrompt

BS = 4


def prompt(task: str, **settings: Any) -> SoftPrompt:
    return SoftPrompt(
        name=task,
        kind=PromptKind.PROMPT_TUNING,
        embeddings=torch.zeros(2, 8),
        content_hash=task,
        source=Path("."),
        settings=TaskSettings(**settings),
    )


def req(task: str, inputs: int = 3, max_new: int = 4, priority: int = 0, **settings: Any) -> Request:
    return Request(
        task=task,
        prompt=prompt(task, **settings),
        input_ids=list(range(inputs)),
        params=SamplingParams(max_new_tokens=max_new),
        seed=0,
        sink=lambda event: None,
        priority=priority,
    )


def sched(
    rows: int = 4, queue: int = 1000, per_task: int = 0, blocks: int = 10_000, policy: Policy = Policy.FAIR
) -> Scheduler:
    pool = BlockPool(blocks + 1, BS)
    cache = PrefixCache(pool, 1, 1 << 20)
    return Scheduler(SchedulerConfig(rows, 1 << 20, queue, per_task, policy), pool, cache)


def step(s: Scheduler) -> list[Request]:
    """One engine step without a model: admit, 'prefill' the admitted rows, one token per running
    row (charged to its task), finish the rows that reached max_new_tokens. Returns the admitted."""
    admitted = s.schedule().admitted
    for r in admitted:
        assert r.kv is not None
        r.kv.own_len = len(r.input_ids) + len(r.output_ids)
    s.grow()
    rows = list(s.running)
    for r in rows:
        assert r.kv is not None
        r.output_ids.append(1)
        r.kv.own_len += 1
    s.served(rows)
    for r in rows:
        if len(r.output_ids) >= r.params.max_new_tokens:
            s.finish(r)
    return admitted


def counter(s: Scheduler, task: str) -> float:
    return float(s.task_stats()[task]["counter"])


def test_counters_charge_input_once_and_each_generated_token_weighted() -> None:
    s = sched(rows=2)
    a = req("a", inputs=6, max_new=3, weight=2.0)
    s.add(a)
    step(s)  # admitted and one token
    assert counter(s, "a") == pytest.approx((INPUT_TOKEN_COST * 6 + OUTPUT_TOKEN_COST * 1) / 2.0)
    step(s)
    step(s)  # finished: 3 tokens
    stats = s.task_stats()["a"]
    assert stats["input_tokens"] == 6 and stats["output_tokens"] == 3 and stats["running"] == 0
    assert stats["counter"] == pytest.approx((6 + 2 * 3) / 2.0)


def test_the_least_served_task_is_admitted_first_not_the_oldest_request() -> None:
    s = sched(rows=1)
    flood = [req("flood") for _ in range(5)]
    for r in flood:
        s.add(r)
    step(s)  # flood[0] runs and is charged
    quiet = req("quiet")
    s.add(quiet)  # arrives after four waiting flood requests
    while flood[0].status is RequestStatus.RUNNING:
        step(s)
    assert step(s) == [quiet]  # the freed row goes to the task served least


def test_an_idle_task_banks_no_credit_its_counter_is_lifted() -> None:
    s = sched(rows=1)
    for _ in range(3):
        s.add(req("busy"))
    for _ in range(12):  # busy alone: served, counter grows
        step(s)
    s.add(req("busy"))  # still backlogged
    returning = req("idle")
    s.add(returning)
    lifted = counter(s, "idle")
    assert lifted == counter(s, "busy") > 0  # not 0: the time it was away is not owed to it
    # With nobody waiting, a returning task is lifted to the counter of the last task admitted.
    s2 = sched(rows=1)
    s2.add(req("a"))
    for _ in range(4):
        step(s2)
    s2.add(req("a"))
    step(s2)  # admitted at a's counter, nobody else waiting
    s2.add(req("b"))
    assert counter(s2, "b") == counter(s2, "a") - OUTPUT_TOKEN_COST - INPUT_TOKEN_COST * 3


def shares(weights: dict[str, float], steps: int, rows: int = 4) -> Counter[str]:
    """Tokens each task receives when every task keeps its queue full for `steps` steps."""
    s = sched(rows=rows)
    for _ in range(steps):
        for task, w in weights.items():
            while s.task_stats().get(task, {}).get("waiting", 0) < rows:
                s.add(req(task, max_new=8, weight=w))
        step(s)
    return Counter({task: int(stats["output_tokens"]) for task, stats in s.task_stats().items()})


def test_equal_weights_share_equally_and_3_to_1_weights_share_75_25() -> None:
    equal = shares({"a": 1.0, "b": 1.0}, steps=400)
    assert abs(equal["a"] / (equal["a"] + equal["b"]) - 0.5) < 0.03
    weighted = shares({"a": 3.0, "b": 1.0}, steps=400)
    assert abs(weighted["a"] / (weighted["a"] + weighted["b"]) - 0.75) < 0.03


def test_a_task_over_its_quota_is_refused_while_other_tasks_are_admitted() -> None:
    s = sched(rows=1, queue=100, per_task=3)
    for _ in range(3):
        s.add(req("flood"))
    with pytest.raises(QueueFull, match="'flood' has 3 requests waiting"):
        s.add(req("flood"))
    with pytest.raises(QueueFull):
        s.check_room("flood", TaskSettings())  # the same answer before tokenising
    s.add(req("quiet"))  # still admitted
    for _ in range(6):
        s.add(req("big", max_queue=6))  # task.json overrides the server's per-task cap
    with pytest.raises(QueueFull, match="'big' has 6"):
        s.add(req("big", max_queue=6))
    assert s.task_stats()["flood"]["refused"] == 2 and s.num_waiting == 10


def test_a_full_queue_still_admits_a_task_below_its_weighted_share() -> None:
    s = sched(rows=1, queue=8)
    for _ in range(8):
        s.add(req("flood"))  # alone, the flood may fill the whole queue
    with pytest.raises(QueueFull, match="share is 8"):
        s.add(req("flood"))
    s.add(req("quiet", weight=3.0))  # the queue is full, but quiet's share is 8 * 3 / (3 + 1) = 6
    with pytest.raises(QueueFull, match="share is 2"):  # and the flood's is now 2: it holds 8
        s.add(req("flood"))
    for _ in range(5):
        s.add(req("quiet", weight=3.0))
    with pytest.raises(QueueFull, match="'quiet' holds 6, its share is 6"):
        s.add(req("quiet", weight=3.0))
    assert s.num_waiting == 14  # at most twice --max-queue, whatever the tasks do
    fifo = sched(rows=1, queue=8, policy=Policy.FIFO)
    for _ in range(8):
        fifo.add(req("flood"))
    with pytest.raises(QueueFull):
        fifo.add(req("quiet"))  # one arrival order, one bound


def test_max_running_caps_a_tasks_rows_and_the_rest_go_to_others() -> None:
    s = sched(rows=4)
    for _ in range(4):
        s.add(req("capped", max_running=1))
    s.add(req("free"))
    admitted = s.schedule().admitted
    assert Counter(r.task for r in admitted) == {"capped": 1, "free": 1}


def test_a_more_urgent_request_is_served_first_and_takes_the_least_urgent_youngest_row() -> None:
    s = sched(rows=2)
    low_old, low_young = req("batch", max_new=50, priority=5), req("batch", max_new=50, priority=5)
    s.add(low_old)
    s.add(low_young)
    step(s)
    urgent = req("online", priority=-1, min_priority=-1)
    s.add(urgent)
    plan = s.schedule()
    assert plan.admitted == [urgent] and plan.preempted == [low_young]
    assert low_young.status is RequestStatus.WAITING and low_young.kv is None and low_young.preemptions == 1
    assert s.running == [low_old, urgent]
    while urgent.status is RequestStatus.RUNNING:
        step(s)
    step(s)
    assert low_young in s.running  # resumed as soon as the urgent row left, with what it generated


def test_a_task_with_no_row_takes_one_from_the_most_served_task_and_no_row_ping_pongs() -> None:
    s = sched(rows=4)
    flood = [req("flood", max_new=100) for _ in range(8)]
    for r in flood:
        s.add(r)
    step(s)
    assert [r.task for r in s.running] == ["flood"] * 4
    quiet = req("quiet", max_new=3)
    s.add(quiet)
    plan = s.schedule()
    assert plan.admitted == [quiet] and plan.preempted == [flood[3]]  # the youngest flood row, now
    for _ in range(30):  # the preempted row waits; the flood, which still runs 3 rows, never takes back
        assert s.schedule().preempted == []
        step(s)
    assert s.task_stats()["flood"]["preempted"] == 1


def test_memory_pressure_preempts_the_least_urgent_row_first() -> None:
    s = sched(rows=3, blocks=9)  # 3 prefix blocks + one own block per row; 3 free
    urgent, low, normal = req("u", priority=-1, min_priority=-1), req("l", priority=3), req("n")
    s.add(low)
    s.schedule()  # low is the oldest row
    s.add(urgent)
    s.add(normal)
    s.schedule()
    assert [r.task for r in s.running] == ["l", "u", "n"]
    for r in s.running:
        assert r.kv is not None
        r.output_ids += [1] * 5
        r.kv.own_len = 8  # each row now needs two more blocks: 6 wanted, 3 free
    assert s.grow() == [low]  # the least urgent, though n is the youngest


def test_fifo_policy_keeps_arrival_order_across_tasks_and_never_preempts_for_a_task() -> None:
    s = sched(rows=1, policy=Policy.FIFO)
    reqs = [req("a"), req("a"), req("b"), req("a")]
    for r in reqs:
        s.add(r)
    order = []
    for _ in range(40):
        order += step(s)
    assert order == reqs
    s2 = sched(rows=1, policy=Policy.FIFO)
    s2.add(req("a", max_new=50))
    step(s2)
    s2.add(req("b", priority=-5, min_priority=-5))
    assert s2.schedule().preempted == []
