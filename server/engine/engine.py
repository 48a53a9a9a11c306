"""The engine loop: schedule, prefill new rows, decode all rows, emit tokens. One thread owns the model."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from server.engine.batch import Batch
from server.engine.detok import IncrementalText
from server.engine.prefix_cache import PrefixCache
from server.engine.request import ErrorEvent, FinishEvent, FinishReason, Request, TokenEvent
from server.engine.runner import PrefillRow, Runner
from server.engine.sampler import BatchFlags, SamplingTensors, sample
from server.engine.scheduler import Scheduler
from server.errors import ErrorKind
from server.models import LoadedModel

log = logging.getLogger("softmux.engine")


@dataclass
class EngineStats:
    """Counters that show what batching did (read by /stats and by tests)."""

    prefill_passes: int = 0
    prefix_passes: int = 0  # forward passes that computed soft prompts' key/value prefixes
    decode_passes: int = 0
    rows_prefilled: int = 0
    rows_decoded: int = 0
    mixed_task_passes: int = 0  # forward passes whose rows belong to more than one task
    tasks_summed: int = 0  # distinct tasks per pass, summed over passes (mean = tasks_summed / passes)
    max_tasks_in_pass: int = 0
    max_rows_in_pass: int = 0
    joined_running_batch: int = 0  # rows admitted while other rows were mid-generation
    requests_finished: int = 0
    requests_failed: int = 0

    def record_pass(self, phase: str, requests: list[Request]) -> int:
        """Count one forward pass; returns how many distinct tasks it held."""
        tasks = len({r.task for r in requests})
        if phase == "prefill":
            self.prefill_passes += 1
            self.rows_prefilled += len(requests)
        else:
            self.decode_passes += 1
            self.rows_decoded += len(requests)
        self.mixed_task_passes += tasks > 1
        self.tasks_summed += tasks
        self.max_tasks_in_pass = max(self.max_tasks_in_pass, tasks)
        self.max_rows_in_pass = max(self.max_rows_in_pass, len(requests))
        return tasks

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class EngineObserver(Protocol):
    """Hooks for metrics; called on the engine thread, so they must be cheap and never raise."""

    def on_pass(self, phase: str, rows: int, tasks: int, seconds: float) -> None: ...


class Engine:
    def __init__(
        self,
        lm: LoadedModel,
        scheduler: Scheduler,
        prefix_cache: PrefixCache | None = None,
        observer: EngineObserver | None = None,
    ) -> None:
        self.observer = observer
        self.lm = lm
        self.runner = Runner(lm)
        self.scheduler = scheduler
        self.prefix_cache = prefix_cache  # None: soft prompts go through the model with every request
        self.tokenizer = lm.tokenizer
        self.eos_ids = lm.eos_token_ids
        self.stats = EngineStats()
        self.batch: Batch | None = None
        self._texts: dict[int, IncrementalText] = {}  # request id -> its detokeniser
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

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def submit(self, request: Request) -> None:
        """Thread-safe. Raises QueueFull when the waiting queue is at its limit."""
        if not self.alive:
            raise RuntimeError("the engine is not running")
        self.scheduler.add(request)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.step():
                    self.scheduler.wait_for_work(timeout=0.1)
        except BaseException as exc:  # the loop must never die silently: health checks read this
            log.exception("engine loop died")
            self.error = exc
            self._fail_all(f"engine failure: {exc}", ErrorKind.GENERATION_FAILED)

    # ---- one iteration ---------------------------------------------------------------------
    def step(self) -> bool:
        """Admit, prefill, decode once. Returns False when there was nothing to do."""
        admitted, dropped = self.scheduler.schedule()
        now = time.monotonic()
        for req in dropped:
            self._finish(req, req.ended_reason(now) or FinishReason.CANCELLED)
        self._drop_ended(now)
        if admitted:
            if self.batch is not None:
                self.stats.joined_running_batch += len(admitted)
            self._guarded(admitted, lambda: self._prefill(admitted))
        if self.batch is not None:
            rows = list(self.batch.requests)
            self._guarded(rows, self._decode)
        return bool(admitted or dropped or self.batch is not None)

    def _guarded(self, requests: list[Request], work) -> None:
        """A forward pass that raises fails only the requests it was running; the loop goes on."""
        try:
            work()
        except Exception as exc:
            log.exception("forward pass failed for %d rows", len(requests))
            failed = {r.id for r in requests}
            if self.batch is not None and any(r.id in failed for r in self.batch.requests):
                keep = [i for i, r in enumerate(self.batch.requests) if r.id not in failed]
                self.batch = self.batch.filter(keep) if keep else None
            for req in requests:
                if req in self.scheduler.running:
                    self._fail(req, f"generation failed: {exc}")

    def _prefill(self, admitted: list[Request]) -> None:
        now = time.monotonic()
        for req in admitted:
            req.admitted = now
            if req.stream or req.params.stop:
                self._texts[req.id] = IncrementalText(self.tokenizer, req.params.stop)
        started = time.perf_counter()
        rows = self._prefill_rows(admitted)
        headroom = max(r.params.max_new_tokens for r in admitted)
        result = self.runner.prefill(rows, headroom)
        self._record("prefill", admitted, started)
        new = Batch(
            requests=list(admitted),
            cache=result.cache,
            mask=result.mask,
            positions=result.positions,
            next_tokens=torch.zeros(len(admitted), dtype=torch.int64, device=result.mask.device),
            steps=torch.zeros(len(admitted), dtype=torch.int64, device=result.mask.device),
            sampling=self._sampling_tensors(admitted),
            seen=self._seen(admitted),
        )
        new = self._sample_and_emit(new, result.logits)
        if new is not None:
            self.batch = new if self.batch is None else Batch.concat(self.batch, new)

    def _record(self, phase: str, requests: list[Request], started: float) -> None:
        tasks = self.stats.record_pass(phase, requests)
        if self.observer is not None:
            self.observer.on_pass(phase, len(requests), tasks, time.perf_counter() - started)

    def _prefill_rows(self, reqs: list[Request]) -> list[PrefillRow]:
        """Each row starts from its task's key/value prefix when there is one (computing missing
        ones together in one pass), else from its virtual-token embeddings."""
        prefixes: dict[tuple[str, str], torch.Tensor] = {}
        missing: dict[tuple[str, str], torch.Tensor] = {}
        for r in reqs:
            key = r.prompt.cache_key
            if r.prompt.prefix_kv is not None:
                prefixes[key] = r.prompt.prefix_kv
            elif self.prefix_cache is not None and (key in prefixes or key in missing):
                self.prefix_cache.stats.hits += 1  # shares a prefix another row of this pass brings
            elif self.prefix_cache is not None:
                kv = self.prefix_cache.get(key)
                if kv is None:
                    assert r.prompt.embeddings is not None
                    missing[key] = r.prompt.embeddings
                else:
                    prefixes[key] = kv
        if missing:
            computed = self.runner.compute_prefixes(list(missing.values()))
            self.stats.prefix_passes += 1
            for key, kv in zip(missing, computed):
                prefixes[key] = kv
                assert self.prefix_cache is not None
                self.prefix_cache.put(key, kv)
        return [
            PrefillRow(input_ids=r.input_ids, prefix_kv=prefixes[r.prompt.cache_key])
            if r.prompt.cache_key in prefixes
            else PrefillRow(input_ids=r.input_ids, prompt=r.prompt.embeddings)
            for r in reqs
        ]

    def _decode(self) -> None:
        batch = self.batch
        assert batch is not None
        batch.extend_mask()
        started = time.perf_counter()
        logits = self.runner.decode(batch.cache, batch.mask, batch.next_tokens, batch.positions)
        batch.positions = batch.positions + 1
        self._record("decode", batch.requests, started)
        self.batch = self._sample_and_emit(batch, logits)

    # ---- tokens out ----------------------------------------------------------------------
    def _sample_and_emit(self, batch: Batch, logits: torch.Tensor) -> Batch | None:
        """Choose each row's token, deliver it, and return the batch without finished rows."""
        finite = torch.isfinite(logits).all(dim=-1)  # [B]: a poisoned row must fail alone
        finite_rows = finite.tolist()
        if not all(finite_rows):
            logits = logits.masked_fill(~finite[:, None], 0.0)
        tokens, logprobs = sample(logits, batch.sampling, batch.steps, batch.seen, self._flags(batch.requests))
        batch.append_step(tokens)
        keep: list[int] = []
        token_list = tokens.tolist()
        logprob_list = [0.0] * len(token_list) if logprobs is None else logprobs.tolist()
        for i, (req, tok, lp, ok) in enumerate(zip(batch.requests, token_list, logprob_list, finite_rows)):
            if not ok:
                self._fail(req, "the model produced non-finite logits for this request")
                continue
            reason = self._append_token(req, tok, lp)
            if reason is None:
                keep.append(i)
            else:
                self._finish(req, reason)
        if len(keep) == len(batch):
            return batch
        return batch.filter(keep) if keep else None

    @staticmethod
    def _flags(requests: list[Request]) -> BatchFlags:
        sampling = [r.params.sampling for r in requests]
        return BatchFlags(
            sampling=any(sampling),
            penalty=any(r.params.repetition_penalty != 1.0 for r in requests),
            filtering=any(s and (r.params.top_k > 0 or r.params.top_p < 1.0) for s, r in zip(sampling, requests)),
            logprobs=any(r.stream for r in requests),
        )

    def _append_token(self, req: Request, tok: int, logprob: float) -> FinishReason | None:
        if not req.output_ids:
            req.first_token_at = time.monotonic()
        req.output_ids.append(tok)
        text = self._texts.get(req.id)
        is_eos = tok in self.eos_ids
        delta = text.add(tok) if text is not None and not is_eos else ""
        if is_eos:
            reason: FinishReason | None = FinishReason.EOS
        elif text is not None and text.stopped:
            reason = FinishReason.STOP
        elif len(req.output_ids) >= req.params.max_new_tokens:
            reason = FinishReason.LENGTH
        else:
            reason = None
        if req.stream:
            if reason is not None and text is not None:
                delta += text.flush()  # text held back for a stop string that never came
            req.sink(TokenEvent(token_id=tok, text=delta, logprob=logprob, special=is_eos, final=reason is not None))
        return reason

    def _drop_ended(self, now: float) -> None:
        """Rows whose client left or whose deadline passed leave the batch before the next pass."""
        if self.batch is None:
            return
        reasons = [r.ended_reason(now) for r in self.batch.requests]
        if not any(reasons):
            return
        for r, reason in zip(self.batch.requests, reasons):
            if reason is not None:
                self._finish(r, reason)
        keep = [i for i, reason in enumerate(reasons) if reason is None]
        self.batch = self.batch.filter(keep) if keep else None

    def _finish(self, req: Request, reason: FinishReason) -> None:
        text = self._texts.pop(req.id, None)
        if text is not None:
            generated = text.text
        else:
            ids = req.output_ids[:-1] if reason is FinishReason.EOS else req.output_ids
            generated = self.tokenizer.decode(ids, skip_special_tokens=True)
        if req in self.scheduler.running:
            self.scheduler.finish(req)
        now = time.monotonic()
        self.stats.requests_finished += 1
        req.sink(
            FinishEvent(
                generated_text=generated,
                finish_reason=reason,
                generated_tokens=len(req.output_ids),
                input_tokens=len(req.input_ids),
                virtual_tokens=req.virtual_tokens,
                seed=req.seed if req.params.sampling else None,
                queue_time=(req.admitted or now) - req.arrival,
                total_time=now - req.arrival,
                first_token_time=None if req.first_token_at is None else req.first_token_at - req.arrival,
            )
        )

    def _fail(self, req: Request, message: str, kind: ErrorKind = ErrorKind.GENERATION_FAILED) -> None:
        self._texts.pop(req.id, None)
        if req in self.scheduler.running:
            self.scheduler.finish(req)
        self.stats.requests_failed += 1
        req.sink(ErrorEvent(message=message, kind=kind))

    def _fail_all(self, message: str, kind: ErrorKind) -> None:
        for req in list(self.scheduler.running) + self.scheduler.drain_waiting():
            self._fail(req, message, kind)
        self.batch = None

    # ---- per-row tensors -------------------------------------------------------------------
    def _sampling_tensors(self, reqs: list[Request]) -> SamplingTensors:
        dev = self.runner.device
        return SamplingTensors(
            sampling=torch.tensor([r.params.sampling for r in reqs], dtype=torch.bool, device=dev),
            temperature=torch.tensor([r.params.temperature or 1.0 for r in reqs], dtype=torch.float32, device=dev),
            top_k=torch.tensor([r.params.top_k for r in reqs], dtype=torch.int64, device=dev),
            top_p=torch.tensor([r.params.top_p for r in reqs], dtype=torch.float32, device=dev),
            repetition_penalty=torch.tensor([r.params.repetition_penalty for r in reqs], dtype=torch.float32, device=dev),
            seeds=torch.tensor([r.seed for r in reqs], dtype=torch.int64, device=dev),
        )

    def _seen(self, reqs: list[Request]) -> torch.Tensor | None:
        """[B, V] bool of input tokens, only when some new row uses a repetition penalty."""
        if all(r.params.repetition_penalty == 1.0 for r in reqs):
            return None
        seen = torch.zeros(len(reqs), self.runner.vocab_size, dtype=torch.bool, device=self.runner.device)
        for i, r in enumerate(reqs):
            if r.input_ids:
                seen[i, torch.tensor(r.input_ids, device=seen.device)] = True
        return seen
