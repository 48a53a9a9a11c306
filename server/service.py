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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio
import torch

from server.api.errors import GenerationFailed, NotFound, Overloaded, Unavailable, ValidationFailed
from server.config import Settings
from server.engine.engine import Engine
from server.engine.prefix_cache import PrefixCache
from server.engine.request import ErrorEvent, Event, FinishEvent, Request, SamplingParams, TokenEvent
from server.engine.runner import PrefillRow
from server.engine.scheduler import QueueFull, Scheduler
from server.models import LoadedModel, load_model
from server.prompts.registry import Registry
from server.prompts.types import KVShape

log = logging.getLogger("softmux.service")


@dataclass
class Prepared:
    """A validated request, ready for the engine."""

    task: str
    input_ids: list[int]
    params: SamplingParams
    seed: int


class Service:
    def __init__(self, settings: Settings, loader: Callable[[], LoadedModel] | None = None) -> None:
        self.settings = settings
        self._loader = loader or (lambda: load_model(settings.model, settings.device, settings.dtype, settings.cache_dir))
        self.lm: LoadedModel | None = None
        self.registry: Registry | None = None
        self.engine: Engine | None = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None

    # ---- startup / shutdown ------------------------------------------------------------------
    def start(self) -> None:
        """Load the model, the tasks and start the engine (blocking; run it off the event loop)."""
        try:
            if self.settings.threads > 0:
                torch.set_num_threads(self.settings.threads)
            self.lm = self._loader()
            self.registry = Registry(
                self.settings.store,
                hidden_size=self.lm.hidden_size,
                max_virtual_tokens=self.settings.max_virtual_tokens,
                dtype=self.lm.dtype,
                device=self.lm.device,
                kv_shape=KVShape.of(self.lm.model.config),
            )
            self.registry.load_all()
            scheduler = Scheduler(self.settings.max_batch_size, self.settings.max_batch_tokens, self.settings.max_queue)
            prefix_cache = PrefixCache(self.settings.prefix_cache_bytes) if self.settings.prefix_cache else None
            self.engine = Engine(self.lm, scheduler, prefix_cache)
            self._warm_up()
            self.engine.start()
            self.ready.set()
            log.info("ready: model %s on %s (%s), %d task(s)", self.lm.name, self.lm.device, self.lm.dtype, len(self.registry))
        except BaseException as exc:
            log.exception("startup failed")
            self.load_error = exc

    def _warm_up(self) -> None:
        """One prefill and decode step so the first real request does not pay for lazy init."""
        assert self.engine is not None and self.lm is not None
        prompt = torch.zeros(1, self.lm.hidden_size, dtype=self.lm.dtype, device=self.lm.device)
        runner = self.engine.runner
        (prefix,) = runner.compute_prefixes([prompt])
        result = runner.prefill([PrefillRow(input_ids=[0], prompt=prompt), PrefillRow(input_ids=[0], prefix_kv=prefix)], headroom=1)
        mask = torch.cat([result.mask, result.mask.new_ones(2, 1)], dim=1)
        self.engine.runner.decode(result.cache, mask, result.logits.argmax(-1), result.positions)

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    # ---- health --------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self.load_error is None and (not self.ready.is_set() or (self.engine is not None and self.engine.alive))

    def require_ready(self) -> tuple[Engine, Registry, LoadedModel]:
        if self.load_error is not None:
            raise Unavailable(f"the model failed to load: {self.load_error}")
        if not self.ready.is_set() or self.engine is None or self.registry is None or self.lm is None:
            raise Unavailable("the model is still loading; retry shortly")
        if not self.engine.alive:
            raise Unavailable(f"the engine stopped: {self.engine.error}")
        return self.engine, self.registry, self.lm

    # ---- requests --------------------------------------------------------------------------
    async def prepare(self, task: str, text: str, params: SamplingParams) -> Prepared:
        """Check the task and limits and tokenise (in a worker thread). Raises ApiError subclasses."""
        _, registry, lm = self.require_ready()
        prompt = registry.get(task)
        if prompt is None:
            known = ", ".join(registry.names()) or "(none)"
            raise NotFound(f"unknown task {task!r}; known tasks: {known}")
        s = self.settings
        if params.max_new_tokens > s.max_new_tokens:
            raise ValidationFailed(f"parameters.max_new_tokens must be <= {s.max_new_tokens} (got {params.max_new_tokens})")
        ids: list[int] = await anyio.to_thread.run_sync(lambda: lm.tokenizer(text, add_special_tokens=True)["input_ids"])
        if len(ids) > s.max_input_tokens:
            raise ValidationFailed(f"inputs is {len(ids)} tokens; at most {s.max_input_tokens} are allowed")
        if not ids:
            raise ValidationFailed("inputs must not be empty")
        total = prompt.num_virtual_tokens + len(ids) + params.max_new_tokens
        if total > s.max_batch_tokens:
            raise ValidationFailed(
                f"virtual tokens ({prompt.num_virtual_tokens}) + input tokens ({len(ids)}) + max_new_tokens "
                f"({params.max_new_tokens}) = {total} exceeds max_batch_tokens ({s.max_batch_tokens})"
            )
        max_pos = getattr(lm.model.config, "max_position_embeddings", None)
        if max_pos is not None and total > max_pos:
            raise ValidationFailed(f"virtual + input + max_new_tokens = {total} exceeds the model's context ({max_pos})")
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        return Prepared(task=task, input_ids=ids, params=params, seed=seed)

    async def events(self, prepared: Prepared, stream: bool) -> AsyncIterator[Event]:
        """Submit to the engine and yield its events until the request ends.

        If the consumer stops early (client gone, task cancelled) the request is cancelled, and
        the engine drops its row at its next step.
        """
        engine, registry, _ = self.require_ready()
        prompt = registry.get(prepared.task)
        if prompt is None:  # removed between prepare() and now
            raise NotFound(f"unknown task {prepared.task!r}")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        request = Request(
            task=prepared.task, prompt=prompt, input_ids=prepared.input_ids,
            params=prepared.params, seed=prepared.seed, sink=sink, stream=stream,
        )
        try:
            engine.submit(request)
        except QueueFull as exc:
            raise Overloaded(f"{exc}; retry later") from exc
        except RuntimeError as exc:
            raise Unavailable(str(exc)) from exc
        done = False
        try:
            while True:
                event = await queue.get()
                done = not isinstance(event, TokenEvent)
                yield event
                if done:
                    return
        finally:
            if not done:
                request.cancel()
                engine.scheduler.notify()

    async def generate(self, prepared: Prepared) -> FinishEvent:
        """Run a request to its end and return the final event."""
        async for event in self.events(prepared, stream=False):
            if isinstance(event, ErrorEvent):
                raise (Unavailable if event.error_type == "unhealthy" else GenerationFailed)(event.message)
            if isinstance(event, FinishEvent):
                return event
        raise GenerationFailed("the request ended without a result")
