"""What else runs on the machine while a benchmark does: CPU time of this process tree against every other
process, sampled from /proc, so that a result can say whether the machine was shared (the figures of a shared
machine are noisier)."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path


class CpuWatch:
    """Samples /proc every `period` s: CPU time of this process tree (softmux, the vLLM worker and its
    engine-core process) vs every other process, to say whether the machine was shared during the run."""

    def __init__(self, period: float = 2.0) -> None:
        self.period = period
        self.ours = 0.0
        self.others = 0.0
        self.peak_others = 0.0  # busiest window, in cores
        self.top: dict[str, float] = {}
        self.samples: list[
            tuple[float, float]
        ] = []  # (monotonic time at a window's end, other processes' cores)
        self._stop = threading.Event()
        self._last: dict[int, float] = {}
        self._tick = os.sysconf("SC_CLK_TCK")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> dict[int, tuple[int, str, float]]:
        out = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                raw = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            comm = raw[raw.index("(") + 1 : raw.rindex(")")]
            f = raw[raw.rindex(")") + 2 :].split()
            out[int(d)] = (int(f[1]), comm, (int(f[11]) + int(f[12])) / self._tick)  # ppid, name, cpu s
        return out

    def _ours(self, procs: dict[int, tuple[int, str, float]], root: int | None = None) -> set[int]:
        """`root` (default: this process) and its descendants."""
        me, mine = root or os.getpid(), set()
        for pid in procs:
            p, seen = pid, 0
            while p and p in procs and seen < 64:
                if p == me:
                    mine.add(pid)
                    break
                p, seen = procs[p][0], seen + 1
        return mine

    def tree_cpu(self, root: int) -> float:
        """CPU seconds used so far by the live processes of `root`'s tree (e.g. a server and its workers)."""
        procs = self._sample()
        return sum(procs[pid][2] for pid in self._ours(procs, root))

    def _run(self) -> None:
        self._last = {pid: v[2] for pid, v in self._sample().items()}
        while not self._stop.wait(self.period):
            procs = self._sample()
            mine = self._ours(procs)
            window = 0.0
            for pid, (_, comm, cpu) in procs.items():
                delta = max(0.0, cpu - self._last.get(pid, cpu))
                if pid in mine:
                    self.ours += delta
                else:
                    self.others += delta
                    window += delta
                    self.top[comm] = self.top.get(comm, 0.0) + delta
            self.peak_others = max(self.peak_others, window / self.period)
            self.samples.append((time.monotonic(), window / self.period))
            self._last = {pid: v[2] for pid, v in procs.items()}

    def others_between(self, t0: float, t1: float) -> float | None:
        """Mean cores used by other processes in the windows that ended within [t0, t1 + period]."""
        xs = [c for t, c in list(self.samples) if t0 < t <= t1 + self.period]
        return statistics.mean(xs) if xs else None

    def watched(self, fn: Callable[[], dict | None]) -> dict | None:
        """`fn()`'s result (None: nothing measured), with `others_cores`:
        what other processes used while it ran."""
        t0 = time.monotonic()
        out = fn()
        t1 = time.monotonic()
        time.sleep(self.period)  # let the watch close the run's last window
        if out is not None:
            out["others_cores"] = self.others_between(t0, t1)
        return out

    def start(self) -> CpuWatch:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        wall = time.monotonic() - self.started
        top = sorted(self.top.items(), key=lambda kv: -kv[1])[:5]
        return {
            "wall_s": wall,
            "others_cores": self.others / wall,
            "ours_cores": self.ours / wall,
            "peak_others_cores": self.peak_others,
            "top_others": {k: round(v, 1) for k, v in top},
            "loadavg": os.getloadavg(),
        }


def machine_line(machine: dict, load_before: tuple[float, ...]) -> str:
    """What else used the CPU during a run (CpuWatch.stop()'s figures), flagged when it was shared."""
    shared = machine["others_cores"] > 0.1 or machine["peak_others_cores"] > 0.5
    return (
        f"machine: other processes used {machine['others_cores']:.2f} of {os.cpu_count()} cores on average "
        f"during the run (busiest 2 s window {machine['peak_others_cores']:.2f}; this run "
        f"{machine['ours_cores']:.2f}); load average before {load_before[0]:.2f}, "
        f"after {machine['loadavg'][0]:.2f}"
        + (
            f" -- SHARED: the figures are noisier than on an idle machine ({machine['top_others']})"
            if shared
            else ""
        )
    )
