"""Tests for server/engine/threads.py: the engine's team shrinks to one thread while the cores are
contended (its thread's CPU time far below its passes' wall time) and tries the full team again."""

from __future__ import annotations

from server.engine.threads import RETRY_S, WINDOW, ThreadGovernor


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def governor() -> tuple[ThreadGovernor, list[int], Clock]:
    calls: list[int] = []
    clock = Clock()
    return ThreadGovernor(2, calls.append, clock), calls, clock


def test_uncontended_passes_keep_the_full_team() -> None:
    g, calls, _ = governor()
    for _ in range(10 * WINDOW):
        g.observe(0.03, 0.029)  # computing (or spinning) nearly the whole pass
    assert calls == [] and g.current == 2 and g.drops == 0


def test_contended_passes_drop_to_one_thread_then_the_full_team_is_tried_again() -> None:
    g, calls, clock = governor()
    g.observe(0.6, 0.2)  # one long pass, mostly asleep in barriers: a verdict at once
    assert calls == [1] and g.current == 1 and g.drops == 1
    for _ in range(3 * WINDOW):
        g.observe(0.03, 0.01)  # no retry before RETRY_S
    assert calls == [1]
    clock.now = RETRY_S + 0.1
    g.observe(0.03, 0.03)
    assert calls == [1, 2]  # tried again
    for _ in range(WINDOW):
        g.observe(0.03, 0.029)
    assert g.current == 2  # and kept, the cores being free now
    for _ in range(WINDOW):
        g.observe(0.05, 0.01)
    assert calls == [1, 2, 1] and g.drops == 2


def test_short_passes_and_single_thread_engines_are_left_alone() -> None:
    g, calls, _ = governor()
    for _ in range(10 * WINDOW):
        g.observe(0.001, 0.0)  # below the timer's say
    assert calls == []
    single: list[int] = []
    one = ThreadGovernor(1, single.append)
    one.observe(1.0, 0.0)
    assert single == [] and one.current == 1
