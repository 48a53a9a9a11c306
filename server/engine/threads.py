"""How many threads the engine's passes use while another process or thread wants the same cores.

Torch's CPU ops and softmux's kernels split each pass into hundreds of OpenMP regions, each ending at a
barrier that waits for every thread of the team. While the cores are all busy (clients on the same box, a
refusal storm on the event loop, another service), a team member loses its core and every region waits out a
scheduler time slice, and a 2-thread engine falls far below a 1-thread one (the measurement:
docs/architecture.md, "Tasks as tenants", the contended-cores item). The sign is cheap to read: the engine
thread's own CPU time falls far below the wall time of its passes (it sleeps in barriers; uncontended it
computes or spins nearly all the time).

`ThreadGovernor` reads that ratio over recent passes, drops to one thread while it stays low, and tries the
full team again every few seconds (one verdict later it stays, or drops again). Results do not depend on the
team size: every kernel computes each output in one thread, in one order (tests/test_kernels.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("softmux.threads")

CONTENDED = 0.6  # engine thread CPU / wall over recent passes below this: the team is waiting on barriers
WINDOW = 16  # passes per verdict, or WINDOW_S seconds of passes, whichever comes first
WINDOW_S = 0.5
RETRY_S = 5.0  # seconds at one thread before trying the full team again
MIN_PASS_S = 0.002  # shorter passes say little (timer resolution, Python overhead)


class ThreadGovernor:
    """Engine thread only. `observe(wall, cpu)` after each forward pass."""

    def __init__(
        self, threads: int, set_threads: Callable[[int], None], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.full = threads
        self.current = threads
        self._set = set_threads
        self._clock = clock
        self._wall = 0.0
        self._cpu = 0.0
        self._passes = 0
        self._since = clock()
        self.drops = 0  # times the team was cut to one thread (read by /stats)

    def observe(self, wall: float, cpu: float) -> None:
        if self.full <= 1:
            return
        if self.current == 1 and self._clock() - self._since >= RETRY_S:
            self._switch(self.full)
            return
        if wall < MIN_PASS_S:
            return
        self._wall += wall
        self._cpu += cpu
        self._passes += 1
        if self._passes < WINDOW and self._wall < WINDOW_S:
            return
        ratio = self._cpu / self._wall
        self._wall = self._cpu = 0.0
        self._passes = 0
        if self.current > 1 and ratio < CONTENDED:
            self.drops += 1
            log.info(
                "cores contended (engine thread busy %.0f%% of its passes): running passes on 1 thread",
                100 * ratio,
            )
            self._switch(1)

    def _switch(self, threads: int) -> None:
        self._set(threads)
        self.current = threads
        self._since = self._clock()
        self._wall = self._cpu = 0.0
        self._passes = 0
