"""Task-affine request routing for the engine replicas that keeps the load balanced.

Ray Serve's default router, with `multiplexed_model_id` set, sends a request to a replica that
already has the model, and a model new to every replica to one holding fewest models; but the
replicas' model lists reach the routers only every 0.1 s, and a replica with the model is left
only once it is full (`max_ongoing_requests`). A burst of new tasks then lands on one replica
(measured: 6 of 7 tasks) and stays there while the other replica idles.

`TaskAffinityRouter` keeps what works and fixes that:
- a task's requests go to its home replica(s) (where its prompt and key/value prefix are warm)
  while that replica's queue is within `imbalanced_threshold` requests of the least loaded one;
- beyond that, or for a task seen for the first time, to the least loaded replica (ties: the one
  homing fewest tasks), which becomes a home of the task too: hot tasks spread, cold ones stay put;
- homes are recorded by the router at once, so a burst of new tasks is spread at once.
Requests naming no task use power of two choices. Each replica still mixes all its tasks in one pass.
A request whose `session_id` is `avoid:<replica id>` (the ingress's retry after that replica refused it
with 429) goes to another replica, the least loaded, whatever the task's homes.
"""

from __future__ import annotations

import random

from ray.serve.request_router import (
    FIFOMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from server.deploy.wire import AVOID_PREFIX


class TaskAffinityRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    # The override is ignored for mypy: Ray passes the router kwargs by name.
    def initialize_state(self, imbalanced_threshold: int = 8) -> None:  # type: ignore[override]
        self._imbalanced_threshold = imbalanced_threshold
        self._homes: dict[str, set[ReplicaID]] = {}  # task -> replicas this router sent it to

    async def _queue_lens(self, replicas: list[RunningReplica]) -> dict[ReplicaID, int]:
        lens: dict[ReplicaID, int] = {}
        unknown: list[RunningReplica] = []
        for r in replicas:
            q = self._replica_queue_len_cache.get(r.replica_id) if self._use_replica_queue_len_cache else None
            if q is None:
                unknown.append(r)
            else:
                lens[r.replica_id] = q
        if unknown:
            for r, q in await self._probe_queue_lens(unknown, 0):
                if q is not None:
                    lens[r.replica_id] = q
        return lens

    def _tasks_homed(self, replica: RunningReplica) -> int:
        homed = sum(1 for homes in self._homes.values() if replica.replica_id in homes)
        return max(homed, len(replica.multiplexed_model_ids))

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        task = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        session = pending_request.metadata.session_id if pending_request is not None else ""
        if session.startswith(AVOID_PREFIX):
            others = [r for r in candidate_replicas if r.replica_id.unique_id != session[len(AVOID_PREFIX) :]]
            if others:
                lens = await self._queue_lens(others)
                return [[min(others, key=lambda r: (lens.get(r.replica_id, 0), random.random()))]]
        if not task:  # power of two choices
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        live = {r.replica_id for r in candidate_replicas}
        for homes in self._homes.values():
            homes &= live  # forget replicas that died or left
        lens = await self._queue_lens(candidate_replicas)
        usable = [
            r
            for r in candidate_replicas
            if r.replica_id in lens and lens[r.replica_id] < r.max_ongoing_requests
        ]
        if not usable:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        lowest = min(lens[r.replica_id] for r in usable)
        homes = self._homes.setdefault(task, set())
        homes |= {rid for rid in self._multiplexed_model_id_to_replica_ids.get(task, set()) if rid in live}
        at_home = [r for r in usable if r.replica_id in homes]
        if at_home:
            best = min(at_home, key=lambda r: lens[r.replica_id])
            if lens[best.replica_id] - lowest <= self._imbalanced_threshold:
                return [[best]]
        target = min(usable, key=lambda r: (lens[r.replica_id], self._tasks_homed(r), random.random()))
        homes.add(target.replica_id)
        return [[target]]
