"""The engine loop: schedule, run, postprocess. One thread owns the model.

step():  plan = scheduler.schedule()        admit waiting rows the key/value pool can hold
         runner.prefill(admitted, prefixes)  every new row, whatever its task, and the soft-prompt
                                             prefixes not resident yet: one pass
         scheduler.grow(); runner.decode()   every running row, one pass
         postprocess                         sample, emit, finish; rows leave, blocks return

Rows with a structured output get their token masks filled by a worker thread while each pass runs
(server/engine/masks.py); the sampler applies them before anything else.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from server.engine.block_cache import BlockCache
from server.engine.detok import IncrementalText
from server.engine.emit import alternatives_of, append_token, finish_event
from server.engine.masks import MaskWorker, Pending
from server.engine.prefix_cache import PrefixCache, PrefixCacheStats
from server.engine.request import (
    ErrorEvent,
    Event,
    FinishReason,
    Request,
    SamplingParams,
)
from server.engine.runner import Acceleration, Runner
from server.engine.sampler import choose, prepare
from server.engine.scheduler import Plan, Scheduler, SchedulerConfig
from server.engine.stats import EngineObserver, EngineStats, MaskStats
from server.engine.threads import ThreadGovernor
from server.errors import ErrorKind
from server.models import LoadedModel
from server.prompts.settings import TaskSettings
from server.prompts.types import PromptKind, SoftPrompt

log = logging.getLogger("softmux.engine")

DEFAULT_KV_CACHE_BYTES = 1 << 30
WARM_UP_TASK = "_warmup"  # not a valid task name, so never a client's


def _ignore(event: Event) -> None:
    pass


# Torch's CPU build runs its threads on GNU OpenMP, which keeps each thread's OpenMP team alive
# until that thread exits and, once the process holds more OpenMP threads than CPUs, makes idle
# workers sleep at once instead of spinning for the next parallel region. A thread that computed
# with torch and lives on (the main thread of a script, a thread-pool worker) therefore slows the
# engine thread's every op (measured: a large share of a 2-core decode step). So the server loads the
# model and warms up in a thread that then exits (Service.start), and scripts that computed on their
# own thread run the loop there (Engine.run_until_idle).


class Engine:
    def __init__(
        self,
        lm: LoadedModel,
        limits: SchedulerConfig,
        prefix_cache_bytes: int | None = None,
        observer: EngineObserver | None = None,
        kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
        max_context: int | None = None,
        accel: Acceleration | None = None,
    ) -> None:
        self.observer = observer
        self.lm = lm
        self.runner = Runner(
            lm, kv_cache_bytes, max_context=max_context, accel=accel, max_rows=limits.max_batch_size
        )
        # None (--no-prefix-cache): prefixes are still computed once and shared by the rows running at
        # the same time, but not kept once the last of them leaves; input-token blocks are not cached.
        self.prefix_cache = PrefixCache(self.runner.pool, self.runner.block_bytes, prefix_cache_bytes or 0)
        self.block_cache = BlockCache(self.runner.pool) if prefix_cache_bytes is not None else None
        self.scheduler = Scheduler(limits, self.runner.pool, self.prefix_cache, self.block_cache)
        self.tokenizer = lm.tokenizer
        self.eos_ids = lm.eos_token_ids
        self.stats = EngineStats()
        self.masks = MaskWorker(self.runner.vocab_size)
        self.mask_stats = MaskStats()
        self.threads = (
            ThreadGovernor(torch.get_num_threads(), torch.set_num_threads)
            if lm.device.type == "cpu"
            else None
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # set if the loop died

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="softmux-engine", daemon=True)
        self._thread.start()

    def drain(self, grace: float) -> bool:
        """Stop admitting, let accepted requests finish for up to `grace` seconds, then stop.

        Returns True when everything finished in time; otherwise the rest fail with a clear error.
        """
        self.scheduler.close()
        deadline = time.monotonic() + grace
        while self.alive and not self.scheduler.idle and time.monotonic() < deadline:
            time.sleep(0.01)
        finished = self.scheduler.idle
        self.stop()
        return finished

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.scheduler.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_all("the server is shutting down", ErrorKind.UNAVAILABLE)
        self.masks.close()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def submit(self, request: Request) -> None:
        """Thread-safe. Raises QueueFull when the waiting queue is at its limit."""
        if not self.alive:
            raise RuntimeError("the engine is not running")
        self.scheduler.add(request)

    def enqueue(self, request: Request) -> None:
        """Queue a request for `run_until_idle` on this thread (no loop thread needed)."""
        self.scheduler.add(request)

    def check_room(self, task: str, settings: TaskSettings) -> None:
        """Thread-safe. Raises QueueFull when the task could not queue one more request now."""
        self.scheduler.check_room(task, settings)

    def notify(self) -> None:
        """Thread-safe: wake the loop (a request was cancelled)."""
        self.scheduler.notify()

    # ---- what the service reads (any thread) ------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    @property
    def pool_tokens(self) -> int:
        """The most tokens (prefix, input and output) the key/value pool holds."""
        return self.runner.pool.capacity * self.runner.pool.block_size

    def load(self) -> tuple[int, int]:
        """(waiting, running) requests now."""
        return self.scheduler.num_waiting, len(self.scheduler.running)

    def task_stats(self) -> dict[str, dict[str, float | int]]:
        return self.scheduler.task_stats()

    def weight_bytes(self) -> int:
        return self.runner.weight_bytes()

    def warm_up(self) -> None:
        """Two requests through prefix, prefill and decode passes before the loop starts, so the
        first real request does not pay for lazy initialisation; their traces are then wiped."""
        lm = self.lm
        prompt = SoftPrompt(
            name=WARM_UP_TASK,
            kind=PromptKind.PROMPT_TUNING,
            content_hash="warmup",
            source=Path("."),
            embeddings=torch.zeros(1, lm.hidden_size, dtype=lm.dtype, device=lm.device),
        )
        for n in (1, 2):
            request = Request(
                task=WARM_UP_TASK,
                prompt=prompt,
                input_ids=[0] * n,
                params=SamplingParams(max_new_tokens=2),
                seed=0,
                sink=_ignore,
            )
            self.scheduler.add(request, bounded=False)  # also with --max-queue 0
        observer, self.observer = self.observer, None  # warm-up passes are not traffic
        try:
            self.run_until_idle()
        finally:
            self.observer = observer
        self.prefix_cache.invalidate(WARM_UP_TASK)
        self.prefix_cache.stats = PrefixCacheStats()
        if self.block_cache is not None:
            self.block_cache.clear()
            self.block_cache.stats = type(self.block_cache.stats)()
        self.scheduler.forget(WARM_UP_TASK)
        self.stats = EngineStats()
        self.mask_stats = MaskStats()

    def run_until_idle(self) -> None:
        """Drive the loop on the calling thread until nothing waits or runs (benchmarks, batch jobs:
        requests go in with `enqueue` first). Why not `start()` there: the OpenMP note at the top."""
        while not self.scheduler.idle:
            self.step()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.step():
                    self.scheduler.wait_for_work(timeout=0.1)
        except BaseException as exc:  # the loop must never die silently: health checks read this
            log.exception("engine loop died")
            self.error = exc
            self._fail_all(f"engine failure: {exc}", ErrorKind.GENERATION_FAILED)

    def snapshot(self) -> dict[str, Any]:
        """Every counter for /stats. Read from another thread while the engine thread changes its
        lists and maps, so a read that races a change is simply taken again."""
        for _ in range(100):
            try:
                cache = self.prefix_cache
                return {
                    **self.stats.as_dict(),
                    "prefix_cache": {
                        **asdict(cache.stats),
                        "entries": len(cache),
                        "bytes_used": cache.bytes_used,
                        "capacity_bytes": cache.capacity_bytes,
                    },
                    "waiting": self.scheduler.num_waiting,
                    "running": len(self.scheduler.running),
                    "scheduling": self.scheduler.config.policy.value,
                    "tasks": self.scheduler.task_stats(),
                    "kv_pool": self.pool_stats(),
                    "token_block_cache": None if self.block_cache is None else asdict(self.block_cache.stats),
                    "static_decode": self.static_decode_stats(),
                    "structured_outputs": asdict(self.mask_stats),
                    "threads": None
                    if self.threads is None
                    else {
                        "full": self.threads.full,
                        "current": self.threads.current,
                        "drops": self.threads.drops,
                    },
                }
            except (RuntimeError, AttributeError):  # a dict changed size, or a row left, mid-read
                time.sleep(0.001)
        raise RuntimeError("could not read the engine's counters")

    def pool_stats(self) -> dict[str, int]:
        """The key/value pool's counters: what rows hold (their own tokens only) and what prefixes hold."""
        pool = self.runner.pool
        return {
            **asdict(pool.stats),
            "block_size": pool.block_size,
            "blocks": pool.capacity,
            "blocks_used": pool.num_used,
            "blocks_free": pool.num_free,
            "touched": pool.touched,
            "bytes_per_token": self.runner.bytes_per_token,
            # the reserved block is written at start; others from their first use on (the pool's own
            # memory: bounded by --kv-cache-bytes, growing to the most blocks ever needed at once)
            "bytes_committed": (pool.touched + 1) * self.runner.block_bytes,
            "bytes_limit": pool.num_blocks * self.runner.block_bytes,
            "row_tokens_held": self.scheduler.held_tokens,
            "row_tokens_used": sum(r.kv.own_len for r in list(self.scheduler.running) if r.kv is not None),
            "prefix_blocks": sum(len(e.seq.own_blocks) for e in self.prefix_cache.entries()),
            "cached_token_blocks": 0 if self.block_cache is None else len(self.block_cache),
        }

    def static_decode_stats(self) -> dict[str, int] | None:
        """The fixed-shape decode step's counters (None: off): graphs recorded,
        steps replayed or run eagerly."""
        static = self.runner.static
        if static is None:
            return None
        return {
            "graphs_recorded": static.recorded,
            "graph_replays": static.replays,
            "eager_steps": static.eager_steps,
        }

    def live_counters(self) -> dict[str, int]:
        """Pool and cache counters for the metrics scrape (read from another thread: ints only)."""
        pool, blocks = self.runner.pool, self.block_cache
        return {
            "kv_blocks_used": pool.num_used,
            "kv_blocks_total": pool.capacity,
            "kv_blocks_touched": pool.touched,
            "preemptions": pool.stats.preemptions,
            "prefix_hit_tokens": 0 if blocks is None else blocks.stats.hit_tokens,
            "prefix_hit_requests": 0 if blocks is None else blocks.stats.hit_requests,
            "soft_prompt_hits": self.prefix_cache.stats.hits,
            "soft_prompt_misses": self.prefix_cache.stats.misses,
        }

    # ---- one iteration ---------------------------------------------------------------------
    def step(self) -> bool:
        """Schedule, prefill the admitted rows, decode every running row. False: nothing to do."""
        plan = self.scheduler.schedule()
        now = time.monotonic()
        for req in plan.dropped:
            self._finish(req, req.ended_reason(now) or FinishReason.CANCELLED)
        for req in plan.rejected:
            self._fail(
                req,
                "the request needs more key/value memory than the pool holds (--kv-cache-bytes)",
                ErrorKind.INVALID_REQUEST,
            )
        self._drop_ended(now)
        if plan.admitted:
            self._start(plan.admitted)
            family = plan.admitted + [
                c for r in plan.admitted for c in r.forks
            ]  # forks fail with a failed pass
            self._guarded(family, lambda: self._prefill(plan))
        if self.scheduler.running:
            self.scheduler.grow()
            rows = list(self.scheduler.running)
            if rows:
                self._guarded(rows, lambda: self._decode(rows))
        return bool(plan.admitted or plan.dropped or plan.rejected or self.scheduler.running)

    def _start(self, admitted: list[Request]) -> None:
        now = time.monotonic()
        if len(admitted) < len(self.scheduler.running):
            self.stats.joined_running_batch += len(admitted)
        for req in admitted:
            if req.admitted is None:
                req.admitted = now
            if req.text is None and (req.stream or req.params.stop):
                req.text = IncrementalText(self.tokenizer, req.params.stop)

    def _prefill(self, plan: Plan) -> None:
        prefixes = plan.new_prefixes
        try:
            logits, masks = self._forward(
                "prefill", plan.admitted, lambda rows: self.runner.prefill(rows, prefixes)
            )
        except Exception:
            for entry, _ in prefixes:  # half-written prefixes must never be served
                self.prefix_cache.discard(entry.key)
            raise
        self.stats.prefix_passes += bool(prefixes)
        self.scheduler.prefilled(plan.admitted, prefixes)  # before rows that end now give their blocks back
        rows, index = self._fork(plan.admitted)
        bitmask = self._resolve(masks)
        if len(rows) > len(plan.admitted):  # forked samples choose from their parent's logits
            at = torch.tensor(index, device=logits.device)
            logits = logits.index_select(0, at)
            bitmask = None if bitmask is None else bitmask.index_select(0, at.cpu())
        self._postprocess(rows, logits, bitmask)

    def _decode(self, rows: list[Request]) -> None:
        logits, masks = self._forward("decode", rows, self.runner.decode)
        self.scheduler.decoded(rows)
        self._postprocess(rows, logits, self._resolve(masks))

    def _fork(self, admitted: list[Request]) -> tuple[list[Request], list[int]]:
        """The other samples of each newly prefilled prompt (OpenAI's n) join the batch sharing its blocks.
        Returns the rows to sample and, for each, the index of the logits row it chooses from."""
        rows, index, copies = list(admitted), list(range(len(admitted))), []
        for i, parent in enumerate(admitted):
            forks, parent.forks = parent.forks, []
            for child in forks:
                pairs = self.scheduler.fork(parent, child)
                if pairs is None:  # no row or memory now: it waits, and is prefilled on its own
                    self.scheduler.add(child, bounded=False)
                    continue
                copies += pairs
                rows.append(child)
                index.append(i)
        if copies:
            self.runner.copy_blocks(copies)
        self._start(rows[len(admitted) :])
        return rows, index

    def _resolve(self, masks: Pending | None) -> torch.Tensor | None:
        """The pass's token masks [B, W], once filled (None: no constrained row)."""
        if masks is None:
            return None
        bitmask, fill, waited = masks.wait()
        self.mask_stats.record(fill, waited)
        return bitmask

    def _forward(
        self, phase: str, rows: list[Request], forward: Callable[[list[Request]], torch.Tensor]
    ) -> tuple[torch.Tensor, Pending | None]:
        """One pass over `rows`: their logits [B, V], and their masks being filled meanwhile."""
        masks = self.masks.start(rows)
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            logits = forward(rows)
        except Exception:
            if masks is not None:  # the matchers are not touched again before their fill is done
                masks.wait()
            raise
        if logits.device.type == "cuda":  # kernels run asynchronously: time the pass, not its launch (the
            torch.cuda.synchronize(logits.device)  # sampler's host copy waits for it right after anyway)
        seconds = time.perf_counter() - started
        if self.threads is not None:
            self.threads.observe(seconds, time.thread_time() - cpu)
        tasks = self.stats.record_pass(phase, rows)
        if self.observer is not None:
            self.observer.on_pass(phase, len(rows), tasks, seconds)
        return logits, masks

    def _guarded(self, requests: list[Request], work: Callable[[], None]) -> None:
        """A forward pass that raises fails only the requests it was running; the loop goes on."""
        try:
            work()
        except Exception as exc:
            log.exception("forward pass failed for %d rows", len(requests))
            for req in requests:
                if req in self.scheduler.running:
                    self._fail(req, f"generation failed: {exc}")

    # ---- tokens out ----------------------------------------------------------------------
    @torch.inference_mode()
    def _postprocess(
        self, rows: list[Request], logits: torch.Tensor, bitmask: torch.Tensor | None = None
    ) -> None:
        """Choose each row's token, deliver it, and finish the rows that are done."""
        batch = prepare(rows, self.runner.vocab_size, logits.device, bitmask)
        tokens, finite, logprobs, top = choose(logits, batch, self.runner.ops)
        parts = [tokens, finite.to(torch.int64)]
        if logprobs is not None:  # token ids are exact in float64
            parts = [tokens.double(), finite.double(), logprobs.double()]
        if top is not None:
            parts += [*top[0].double().T, *top[1].double().T]  # k rows of values, then k rows of ids
        host = torch.stack(parts).tolist()  # the step's one host sync
        logprob_list = host[2] if logprobs is not None else [0.0] * len(rows)
        k = 0 if top is None else top[0].shape[1]
        served = []
        for i, (req, tok, ok, lp) in enumerate(zip(rows, host[0], host[1], logprob_list)):
            tok = int(tok)
            if not ok:
                self._fail(req, "the model produced non-finite logits for this request")
                continue
            if req.matcher is not None and req.matcher.is_error():  # never fail open: it ends with the reason
                self._fail_grammar(req)
                continue
            served.append(req)
            alternatives = alternatives_of(
                host[3 : 3 + k], host[3 + k : 3 + 2 * k], i, req.params.top_logprobs
            )
            reason = append_token(req, tok, lp, alternatives, self.eos_ids)
            if reason is not None:
                self._finish(req, reason)
            elif req.matcher is not None and req.matcher.is_error():
                self._fail_grammar(req)
        self.scheduler.served(served)

    def _drop_ended(self, now: float) -> None:
        """Rows whose client left or whose deadline passed leave before the next pass."""
        for req in list(self.scheduler.running):
            reason = req.ended_reason(now)
            if reason is not None:
                self._finish(req, reason)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        event = finish_event(req, reason, self.eos_ids, self.tokenizer)
        if req in self.scheduler.running:
            self.scheduler.finish(req)
        for child in req.forks:  # never forked: the parent ended before its prefill
            self._finish(child, reason)
        req.forks = []
        self.stats.requests_finished += 1
        req.sink(event)

    def _fail_grammar(self, req: Request) -> None:
        assert req.matcher is not None
        self.mask_stats.grammar_errors += 1
        self._fail(
            req,
            f"the structured output could not be continued: {req.matcher.get_error() or 'no token allowed'}",
        )

    def _fail(self, req: Request, message: str, kind: ErrorKind = ErrorKind.GENERATION_FAILED) -> None:
        if req in self.scheduler.running:
            self.scheduler.finish(req)
        for child in req.forks:
            self._fail(child, message, kind)
        req.forks = []
        self.stats.requests_failed += 1
        req.sink(ErrorEvent(message=message, kind=kind))

    def _fail_all(self, message: str, kind: ErrorKind) -> None:
        for req in list(self.scheduler.running) + self.scheduler.drain_waiting():
            self._fail(req, message, kind)
