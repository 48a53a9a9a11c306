"""The control actor of one softmux Ray app: store changes to every replica, the replica roster,
and fan-out questions (stats, metrics) answered by every replica.

Ray Serve routes a handle call to one replica; there is no public way to reach all of them. So
each engine replica long-polls this small async actor (`poll`): an upload or delete through the
ingress is `publish`ed once and every replica applies it within a poll round trip (milliseconds),
then `ack`s it; the ingress waits (bounded) until every live replica has applied it before it
answers. The store watcher in each replica stays as the backstop (a replica that misses events,
e.g. after this actor restarted, rescans the store). A replica is live while it polls: each poll
returns after at most `poll_timeout` seconds, so one silent for `ttl` seconds is gone (killed).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray

POLL_TIMEOUT_S = 2.0
LIVE_TTL_S = 6.0


@dataclass
class _Replica:
    id: str
    info: dict[str, Any]
    seen: float = field(default_factory=time.monotonic)
    applied: int = 0


class Control:
    def __init__(self, keep: int = 1024, ttl: float = LIVE_TTL_S) -> None:
        self.version = 0
        self.ttl = ttl
        self._events: deque[tuple[int, dict[str, Any]]] = deque(maxlen=keep)
        self._changed = asyncio.Condition()
        self._replicas: dict[str, _Replica] = {}
        self._reports: dict[int, dict[str, Any]] = {}
        self._report_arrived = asyncio.Condition()
        self._ids = itertools.count(1)

    # ---- replicas ------------------------------------------------------------------------------
    def _touch(self, replica_id: str, info: dict[str, Any] | None = None) -> _Replica:
        rep = self._replicas.get(replica_id)
        if rep is None:
            rep = self._replicas[replica_id] = _Replica(replica_id, info or {})
        elif info:
            rep.info = info
        rep.seen = time.monotonic()
        return rep

    def register(self, replica_id: str, info: dict[str, Any]) -> int:
        """A replica announces itself (before it loads the store); returns the current version."""
        self._touch(replica_id, info).applied = self.version
        return self.version

    def leave(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)

    def live(self) -> list[str]:
        now = time.monotonic()
        for rid in [r.id for r in self._replicas.values() if now - r.seen > self.ttl]:
            del self._replicas[rid]
        return sorted(self._replicas)

    def roster(self) -> dict[str, dict[str, Any]]:
        return {rid: self._replicas[rid].info for rid in self.live()}

    async def poll(
        self, replica_id: str, after: int, timeout: float = POLL_TIMEOUT_S
    ) -> tuple[int, list[dict[str, Any]], bool]:
        """Events newer than `after`: (version, events, gap). `gap`: some were dropped (or this
        actor restarted): rescan the store."""
        self._touch(replica_id)
        if self.version == after:  # nothing new yet: wait for the next change (or the timeout)
            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait_for(lambda: self.version > after), timeout)
                except TimeoutError:
                    pass
        self._touch(replica_id)
        if after > self.version:  # this actor restarted and lost its history
            return self.version, [], True
        events = [e for v, e in self._events if v > after]
        oldest = self._events[0][0] if self._events else self.version + 1
        gap = self.version > after and oldest > after + 1
        return self.version, events, gap

    def ack(self, replica_id: str, version: int) -> None:
        rep = self._touch(replica_id)
        rep.applied = max(rep.applied, version)

    # ---- store changes -------------------------------------------------------------------------
    async def publish(self, event: dict[str, Any], wait: float = 2.0) -> dict[str, Any]:
        """Send a store change to every replica; wait (up to `wait` s) until each live one applied
        it. Returns {"version", "applied": [...], "pending": [...]}."""
        async with self._changed:
            self.version += 1
            version = self.version
            self._events.append((version, {**event, "version": version}))
            self._changed.notify_all()
        deadline = time.monotonic() + wait
        while True:
            pending = [rid for rid in self.live() if self._replicas[rid].applied < version]
            if not pending or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.01)
        return {
            "version": version,
            "applied": [r for r in self.live() if r not in pending],
            "pending": pending,
        }

    # ---- fan-out questions ---------------------------------------------------------------------
    async def collect(self, what: str, timeout: float = 2.0) -> dict[str, Any]:
        """Ask every live replica `what` ("stats" | "metrics"); returns {"answers": {replica: data},
        "missing": [...]} once all answered or `timeout` passed."""
        cid = next(self._ids)
        self._reports[cid] = {}
        expected = set(self.live())
        async with self._changed:
            self.version += 1
            self._events.append(
                (self.version, {"kind": "collect", "what": what, "cid": cid, "version": self.version})
            )
            self._changed.notify_all()
        try:
            async with self._report_arrived:
                try:
                    await asyncio.wait_for(
                        self._report_arrived.wait_for(lambda: expected <= set(self._reports[cid])), timeout
                    )
                except TimeoutError:
                    pass
            answers = self._reports[cid]
            return {"answers": dict(sorted(answers.items())), "missing": sorted(expected - set(answers))}
        finally:
            self._reports.pop(cid, None)

    async def report(self, cid: int, replica_id: str, data: Any) -> None:
        self._touch(replica_id)
        if cid in self._reports:
            self._reports[cid][replica_id] = data
            async with self._report_arrived:
                self._report_arrived.notify_all()


def control_name(app_name: str) -> str:
    return f"softmux-control-{app_name}"


def get_control(app_name: str) -> Any:  # an actor handle: its methods are typed loosely by Ray
    """The app's control actor, created by whichever process asks first (detached, so a replica or
    ingress restart does not take it down; restarted by Ray if its process dies)."""
    return (
        ray.remote(Control)
        .options(
            name=control_name(app_name),
            namespace="serve",
            get_if_exists=True,
            lifetime="detached",
            num_cpus=0,
            max_restarts=-1,
            max_concurrency=1000,
        )
        .remote()
    )
