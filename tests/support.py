"""Helpers shared by engine and API tests: soft prompts, a solo reference decoder, an engine driver."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from server.engine.engine import Engine
from server.engine.request import (
    ErrorEvent,
    Event,
    FinishEvent,
    FinishReason,
    Request,
    SamplingParams,
    TokenEvent,
)
from server.engine.scheduler import SchedulerConfig
from server.models import LoadedModel
from server.prompts.types import PromptKind, SoftPrompt


def make_prompt(name: str, num_virtual: int, lm: LoadedModel, seed: int) -> SoftPrompt:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(num_virtual, lm.hidden_size, generator=g) * 0.5  # [P, H]
    return SoftPrompt(
        name=name,
        kind=PromptKind.PROMPT_TUNING,
        embeddings=emb.to(lm.dtype),
        content_hash=name,
        source=Path(name),
    )


@torch.inference_mode()
def reference_greedy(
    lm: LoadedModel, prompt: torch.Tensor, input_ids: list[int], max_new: int, eos: set[int] = frozenset()
) -> list[int]:
    """The solo reference (docs/architecture.md, "Semantics"): the base model on cat(soft_prompt, embed(ids)),
    one request alone, no cache."""
    embed = lm.model.get_input_embeddings()
    x = torch.cat([prompt, embed(torch.tensor(input_ids))])[None]  # [1, P+L, H]
    out: list[int] = []
    for _ in range(max_new):
        token = int(lm.model(inputs_embeds=x).logits[0, -1].argmax())
        out.append(token)
        if token in eos:
            break
        x = torch.cat([x, embed(torch.tensor([[token]]))], dim=1)
    return out


@dataclass
class Tracked:
    """A request plus everything its sink received."""

    request: Request
    events: list[Event] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def sink(self, event: Event) -> None:
        self.events.append(event)
        if not isinstance(event, TokenEvent):
            self.done.set()

    @property
    def result(self) -> FinishEvent:
        assert self.done.wait(60), "request did not finish"
        last = self.events[-1]
        assert isinstance(last, FinishEvent), f"expected a result, got {last}"
        return last

    @property
    def error(self) -> ErrorEvent:
        assert self.done.wait(60), "request did not finish"
        last = self.events[-1]
        assert isinstance(last, ErrorEvent), f"expected an error, got {last}"
        return last


def make_request(
    prompt: SoftPrompt, input_ids: list[int], params: SamplingParams, *, stream: bool = False, seed: int = 0
) -> Tracked:
    holder: list[Tracked] = []
    request = Request(
        task=prompt.name,
        prompt=prompt,
        input_ids=input_ids,
        params=params,
        seed=params.seed if params.seed is not None else seed,
        sink=lambda e: holder[0].sink(e),
        stream=stream,
    )
    holder.append(Tracked(request))
    return holder[0]


def submit_and_check_solo(
    engine: Engine, lm: LoadedModel, specs: list[tuple[SoftPrompt, list[int], int]]
) -> list[Tracked]:
    """Submit one greedy request per (prompt, input ids, max_new_tokens) to a started engine, all at once;
    check each runs to its length and gives exactly its solo reference tokens. Returns them tracked."""
    tracked = [make_request(p, ids, SamplingParams(max_new_tokens=n)) for p, ids, n in specs]
    for t in tracked:
        engine.submit(t.request)
    for t, (p, ids, n) in zip(tracked, specs):
        assert t.result.finish_reason is FinishReason.LENGTH
        assert t.request.output_ids == reference_greedy(lm, p.embeddings, ids, n), f"{p.name} L={len(ids)}"
    return tracked


def make_engine(
    lm: LoadedModel,
    *,
    max_batch_size: int = 16,
    max_batch_tokens: int = 100_000,
    max_queue: int = 1000,
    prefix_cache_bytes: int | None = None,
    **options: Any,
) -> Engine:
    """The one place tests construct an engine: adapt it here when the engine's constructor changes.
    `options`: Engine's keyword arguments (kv_cache_bytes, max_context, observer, accel)."""
    limits = SchedulerConfig(max_batch_size, max_batch_tokens, max_queue)
    return Engine(lm, limits, prefix_cache_bytes, **options)


def start_engine(lm: LoadedModel, **limits: Any) -> Engine:
    """`make_engine(lm, **limits)`, its loop started; stop it with `engine.stop()`."""
    engine = make_engine(lm, **limits)
    engine.start()
    return engine


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds pass (a bound, not a budget: pass generously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
