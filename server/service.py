"""The running server's parts (model, registry, engine) and the asyncio side of a generation.

Routes (native and, later, OpenAI-compatible) call `Service`; it validates a request against the
model's limits, hands it to the engine thread and awaits the engine's events without ever
blocking the event loop on model work.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import anyio
import torch

from server.admission import (
    Prepared,
    context_window,
    contract_for,
    fit_lengths,
    priority_for,
    sample_seed,
    with_defaults,
)
from server.config import Settings
from server.engine.engine import Engine
from server.engine.grammar import COMPILE_TIMEOUT, Compiled, GrammarCompiler
from server.engine.request import ErrorEvent, Event, FinishEvent, Request, SamplingParams
from server.engine.runner import Acceleration
from server.engine.scheduler import Policy, SchedulerConfig
from server.errors import (
    DomainError,
    ErrorKind,
    InvalidRequest,
    Overloaded,
    QueueFull,
    Unavailable,
    UnknownTask,
)
from server.generation import Generation, result
from server.metrics import UNKNOWN_TASK, LiveState, Metrics
from server.models import LoadedModel, load_model
from server.prompts.install import clean_leftovers
from server.prompts.registry import Registry
from server.prompts.settings import TaskSettings
from server.prompts.types import PromptGeometry
from server.prompts.watcher import StoreWatcher
from server.structured import GrammarError, OutputSpec

log = logging.getLogger("softmux.service")


class Service:
    def __init__(self, settings: Settings, loader: Callable[[], LoadedModel] | None = None) -> None:
        self.settings = settings
        self._owns_model = loader is None
        self._loader = loader or (
            lambda: load_model(settings.model, settings.device, settings.dtype, settings.cache_dir)
        )
        self.lm: LoadedModel | None = None
        self.registry: Registry | None = None
        self.watcher: StoreWatcher | None = None
        self.engine: Engine | None = None
        self.grammars: GrammarCompiler | None = None
        self.grammars_error = "the model is still loading"
        self.load_seconds: float | None = None  # from the start of loading to ready
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.draining = False  # set on SIGTERM: new requests get 503, accepted ones finish
        self.metrics = Metrics(self._live_state)

    def _live_state(self) -> LiveState:
        engine, registry = self.engine, self.registry
        waiting, running = (None, None) if engine is None else engine.load()
        return LiveState(
            waiting=waiting,
            running=running,
            prompt_load_failures=None if registry is None else len(registry.failures()),
            tasks=None if registry is None else len(registry),
            per_task=None if engine is None else engine.task_stats(),
            **({} if engine is None else engine.live_counters()),
        )

    # ---- startup / shutdown ------------------------------------------------------------------
    def start(self) -> None:
        """Load the model, the tasks and start the engine (blocking; run it off the event loop).

        The work runs in a thread of its own that exits when done, whoever calls (a loader thread, a
        thread pool, Ray's actor): a thread that ran torch ops and lives on keeps an OpenMP team
        that slows the engine thread (server/engine/engine.py, the OpenMP note)."""
        worker = threading.Thread(target=self._start, name="softmux-start", daemon=True)
        worker.start()
        worker.join()

    def _start(self) -> None:
        began = time.monotonic()
        try:
            if self.settings.threads > 0:
                torch.set_num_threads(self.settings.threads)
            self.lm = self._loader()
            self.settings = self.settings.with_model_limits(
                context_window(self.lm)
            )  # ValueError: refused, with why
            geometry = PromptGeometry.of(self.lm, self.settings.max_virtual_tokens)
            self.grammars = self._grammar_compiler(self.lm)
            self.registry = Registry(
                self.settings.store,
                geometry,
                max_resident=self.settings.max_resident_prompts,
                check_settings=self._check_contract,
            )
            clean_leftovers(
                Path(self.settings.store), older_than_s=60.0
            )  # hidden temp folders of crashed uploads
            self.registry.load_all()
            s = self.settings
            limits = SchedulerConfig(
                s.max_batch_size, s.max_batch_tokens, s.max_queue, s.max_queue_per_task, Policy(s.scheduling)
            )
            prefix_cache_bytes = self.settings.prefix_cache_bytes if self.settings.prefix_cache else None
            kv_bytes = self.settings.kv_cache_bytes  # 0: the runner sizes it from what the weights leave
            max_context = (
                self.settings.max_virtual_tokens
                + self.settings.max_input_tokens
                + self.settings.max_new_tokens
            )
            self.engine = Engine(
                self.lm,
                limits,
                prefix_cache_bytes,
                observer=self.metrics,
                kv_cache_bytes=kv_bytes,
                max_context=max_context,
                accel=Acceleration(
                    prepack_weights=self.settings.prepack_weights,
                    native_kernels=self.settings.native_kernels,
                    native_layers=self.settings.native_layers,
                    kernel_dir=self.settings.cache_dir,
                    cuda_graphs=self.settings.cuda_graphs,
                    one_copy=self.settings.one_copy
                    and self._owns_model,  # a model handed in (tests) keeps its weights
                    quantize=None if self.settings.quantize == "none" else self.settings.quantize,
                ),
            )
            self.engine.warm_up()
            self.engine.start()
            if self.settings.reload_interval > 0:
                self.watcher = StoreWatcher(self.registry, self.settings.reload_interval)
                self.watcher.start()
            self.load_seconds = time.monotonic() - began
            self.ready.set()
            host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "::") else self.settings.host
            log.info(
                "ready in %.1f s: model %s on %s (%s), %d task(s); try: curl http://%s:%d/tasks",
                self.load_seconds,
                self.lm.name,
                self.lm.device,
                self.lm.dtype,
                len(self.registry),
                host,
                self.settings.port,
            )
        except BaseException as exc:
            log.exception("startup failed")
            self.load_error = exc

    def _grammar_compiler(self, lm: LoadedModel) -> GrammarCompiler | None:
        """Structured outputs for this model's tokenizer; None (with the reason kept) where llguidance
        cannot read it: the server still serves, constrained requests are refused with the reason."""
        try:
            return GrammarCompiler.for_model(lm)
        except Exception as exc:
            self.grammars_error = f"structured outputs are unavailable for this model's tokenizer ({exc})"
            log.warning("%s", self.grammars_error)
            return None

    def _check_contract(self, settings: TaskSettings) -> None:
        """A task's output contract must compile for this model (GrammarError, a ValueError, says why not)."""
        spec = settings.output_spec
        if spec is None:
            return
        if self.grammars is None:
            raise GrammarError(self.grammars_error)
        self.grammars.compile(spec)

    def drain(self, grace: float) -> bool:
        """Graceful shutdown: refuse new requests (503) and let accepted ones finish for up to
        `grace` seconds; those still running then fail with "the server is shutting down".
        Returns True when every accepted request finished in time."""
        self.draining = True
        engine = self.engine
        if engine is None:
            return True
        waiting, running = engine.load()
        log.info("draining: %d waiting and %d running request(s), grace %.1fs", waiting, running, grace)
        finished = engine.drain(grace)
        log.info(
            "drained: %s", "every accepted request finished" if finished else "grace ran out; the rest failed"
        )
        return finished

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        if self.engine is not None:
            self.engine.stop()

    # ---- health --------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        if self.draining:  # the engine stops at the end of a drain; the process is exiting, not broken
            return self.load_error is None and (self.engine is None or self.engine.error is None)
        return self.load_error is None and (
            not self.ready.is_set() or (self.engine is not None and self.engine.alive)
        )

    def require_ready(self) -> tuple[Engine, Registry, LoadedModel]:
        if self.load_error is not None:
            raise Unavailable(f"the model failed to load: {self.load_error}")
        if self.draining:
            raise Unavailable("the server is shutting down and accepts no new requests")
        if not self.ready.is_set() or self.engine is None or self.registry is None or self.lm is None:
            raise Unavailable("the model is still loading; retry shortly")
        if not self.engine.alive:
            raise Unavailable(f"the engine stopped: {self.engine.error}")
        return self.engine, self.registry, self.lm

    # ---- requests --------------------------------------------------------------------------
    async def prepare(
        self,
        task: str,
        text: str,
        params: SamplingParams,
        *,
        add_special_tokens: bool = True,
        fit_new_tokens: bool = False,
        names: tuple[str, str] = ("inputs", "parameters.max_new_tokens"),
        timeout: float | None = None,
        priority: int | None = None,
        priority_name: str = "parameters.priority",
        output: tuple[OutputSpec | None, str] = (None, ""),
        explicit: frozenset[str] | None = None,
    ) -> Prepared:
        """Check the task and limits and tokenise (in a worker thread). Raises UnknownTask,
        InvalidRequest (its `field` named as in `names`) or Unavailable.

        `fit_new_tokens`: treat params.max_new_tokens as an upper bound and lower it to what the
        batch budget and the model's context leave (OpenAI chat's "as long as it fits" default).
        `names`: how the input and the token limit are called in the caller's API, for messages.
        `timeout`: seconds the request may take from now (None: the server's --request-timeout,
        which also caps it when set).
        `priority`: lower is served first (None: the task's default); within what the task's
        task.json allows (`priority_name` names the field in messages).
        `output`: the structured output the request asks for and the field that asked (the task's
        contract binds anyway; a different one is refused). `explicit`: the SamplingParams fields the
        request set itself (None: all); the others take the task's defaults.
        """
        arrival = time.monotonic()
        try:
            prepared = await self._prepare(
                task,
                text,
                params,
                add_special_tokens,
                fit_new_tokens,
                names,
                (priority, priority_name),
                output,
                explicit,
            )
        except DomainError as exc:
            known = self.registry is not None and task in self.registry
            self.metrics.rejected(task if known else UNKNOWN_TASK, exc.kind)
            raise
        limit = self.settings.request_timeout
        seconds = min(timeout, limit) if timeout is not None and limit > 0 else (timeout or limit or None)
        return replace(prepared, deadline=None if seconds is None else arrival + seconds)

    async def _prepare(
        self,
        task: str,
        text: str,
        params: SamplingParams,
        add_special_tokens: bool,
        fit_new_tokens: bool,
        names: tuple[str, str],
        asked_priority: tuple[int | None, str],
        output: tuple[OutputSpec | None, str] = (None, ""),
        explicit: frozenset[str] | None = None,
    ) -> Prepared:
        engine, registry, lm = self.require_ready()
        prompt = registry.get(task)
        if prompt is None:
            raise UnknownTask(task, known=registry.names())
        priority = priority_for(prompt, *asked_priority)
        params = with_defaults(params, prompt.settings, explicit)
        spec, field = contract_for(prompt, *output)
        if spec is not None and params.ignore_eos:
            raise InvalidRequest(
                f"ignore_eos cannot be combined with a structured output ({field})", "ignore_eos"
            )
        unknown = [t for t, _ in params.logit_bias if t >= engine.vocab_size]
        if unknown:
            raise InvalidRequest(
                f"logit_bias names token ids outside the vocabulary (0..{engine.vocab_size - 1}): "
                f"{unknown[:5]}",
                "logit_bias",
            )
        try:  # a task at its quota is refused before its text is tokenised: a flood's refusals stay cheap
            engine.check_room(task, prompt.settings)
        except QueueFull as exc:
            raise Overloaded(f"{exc}; retry later") from exc
        s = self.settings
        limit_name = names[1]
        if params.max_new_tokens > s.max_new_tokens and not fit_new_tokens:
            raise InvalidRequest(
                f"{limit_name} must be <= {s.max_new_tokens} (got {params.max_new_tokens})", limit_name
            )
        ids: list[int] = await anyio.to_thread.run_sync(
            lambda: lm.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        )
        params = fit_lengths(
            s, prompt.num_virtual_tokens, len(ids), params, lm, engine.pool_tokens, fit_new_tokens, names
        )
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        grammar = None if spec is None else await self._compile(spec, field)
        return Prepared(
            task=task, input_ids=ids, params=params, seed=seed, priority=priority, grammar=grammar
        )

    async def _compile(self, spec: OutputSpec, field: str) -> Compiled:
        """Compiled off the event loop (cached; a compile that runs long keeps its thread,
        not the request)."""
        if self.grammars is None:
            raise InvalidRequest(f"{field}: {self.grammars_error}", field)
        future = asyncio.wrap_future(self.grammars.submit(spec))
        try:
            return await asyncio.wait_for(asyncio.shield(future), COMPILE_TIMEOUT)
        except TimeoutError:
            raise InvalidRequest(
                f"{field}: took over {COMPILE_TIMEOUT:g} s to compile; simplify it", field
            ) from None
        except GrammarError as e:
            raise InvalidRequest(f"{field}: {e}", field) from None

    def submit(self, prepared: Prepared, stream: bool) -> Generation:
        """Hand a request to the engine now (raising Overloaded/Unavailable/UnknownTask at once, before
        any response has started) and return a handle to iterate its events."""
        (generation,) = self.submit_samples(replace(prepared, n=1), stream)
        return generation

    def submit_samples(self, prepared: Prepared, stream: bool) -> list[Generation]:
        """`submit` for `prepared.n` samples of one prompt: one request goes to the engine, the others
        ride with it and fork from its prefill; one handle per sample, each with its own seed stream."""
        engine, registry, _ = self.require_ready()
        prompt = registry.get(prepared.task)
        if prompt is None:  # removed between prepare() and now
            self.metrics.rejected(UNKNOWN_TASK, ErrorKind.UNKNOWN_TASK)
            raise UnknownTask(prepared.task)
        loop = asyncio.get_running_loop()
        metrics, task, n_input = self.metrics, prepared.task, len(prepared.input_ids)

        def sink_to(queue: asyncio.Queue[Event]) -> Callable[[Event], None]:
            return lambda event: sink(queue, event)

        def sink(queue: asyncio.Queue[Event], event: Event) -> None:  # engine thread: cheap, never raises
            try:
                if isinstance(event, FinishEvent):
                    metrics.finished(task, event)
                elif isinstance(event, ErrorEvent):
                    metrics.failed(task, n_input)
            except Exception:  # pragma: no cover - metrics must never break generation
                log.exception("recording metrics failed")
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        queues: list[asyncio.Queue[Event]] = [asyncio.Queue() for _ in range(prepared.n)]
        requests = [
            Request(
                task=prepared.task,
                prompt=prompt,
                input_ids=prepared.input_ids,
                params=prepared.params,
                seed=sample_seed(prepared.seed, i),
                sink=sink_to(queue),
                stream=stream,
                deadline=prepared.deadline,
                priority=prepared.priority,
                matcher=None if prepared.grammar is None else prepared.grammar.matcher(),
            )
            for i, queue in enumerate(queues)
        ]
        request = requests[0]
        request.forks = requests[1:]
        try:
            engine.submit(request)
        except QueueFull as exc:
            self.metrics.rejected(task, exc.kind)
            raise Overloaded(f"{exc}; retry later") from exc
        except DomainError as exc:
            self.metrics.rejected(task, exc.kind)
            raise
        except RuntimeError as exc:  # the engine is not running
            self.metrics.rejected(task, ErrorKind.UNAVAILABLE)
            raise Unavailable(str(exc)) from exc
        return [Generation(r, q, engine) for r, q in zip(requests, queues)]

    async def events(self, prepared: Prepared, stream: bool) -> AsyncIterator[Event]:
        """Submit to the engine and yield its events until the request ends.

        If the consumer stops early (client gone, task cancelled) the request is cancelled, and
        the engine drops its row at its next step.
        """
        generation = self.submit(prepared, stream)
        try:
            async for event in generation:
                yield event
        finally:
            generation.cancel()

    async def generate(self, prepared: Prepared) -> FinishEvent:
        """Run a request to its end and return the final event."""
        (result,) = await self.generate_samples(replace(prepared, n=1))
        return result

    async def generate_samples(self, prepared: Prepared) -> list[FinishEvent]:
        """Run `prepared.n` samples to their ends; their final events in order. A sample that fails
        fails the call (the others are cancelled)."""
        generations = self.submit_samples(prepared, stream=False)
        try:
            return list(await asyncio.gather(*(result(g) for g in generations)))
        finally:
            for g in generations:
                g.cancel()
