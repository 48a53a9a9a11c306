"""Scoring a soft prompt as it will be served: greedy answers through the serving engine itself (batched,
driven on the caller's thread), and held-out exact match."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from server.engine.engine import Engine
from server.engine.request import Event, FinishEvent, Request, SamplingParams
from server.engine.runner import Acceleration
from server.engine.scheduler import SchedulerConfig
from server.models import LoadedModel
from server.prompts.types import PromptKind, SoftPrompt
from server.train_data import encode


def as_soft_prompt(lm: LoadedModel, embeddings: torch.Tensor, name: str = "eval") -> SoftPrompt:
    emb = embeddings.detach().to(device=lm.device, dtype=lm.dtype).contiguous()  # [P, H]
    digest = hashlib.sha256(emb.float().cpu().numpy().tobytes()).hexdigest()
    return SoftPrompt(
        name=name, kind=PromptKind.PROMPT_TUNING, embeddings=emb, content_hash=digest, source=Path(name)
    )


def generate_batch(
    lm: LoadedModel,
    prompt: SoftPrompt,
    inputs: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int = 32,
) -> list[str]:
    """Greedy answers for many inputs, through the engine exactly as served (driven on this thread)."""
    total = sum(len(i) for i in inputs) + len(inputs) * (prompt.num_virtual_tokens + max_new_tokens)
    # Eager steps: each evaluation builds its own engine, and its few hundred steps would not repay
    # recording every bucket's CUDA graph again (graphs are recorded once per serving engine).
    accel = Acceleration(cuda_graphs=False)
    engine = Engine(lm, SchedulerConfig(batch_size, max(total, 1), len(inputs) + 1), accel=accel)
    results: dict[int, FinishEvent] = {}

    def sink_for(i: int) -> Callable[[Event], None]:
        def sink(event: Event) -> None:
            if isinstance(event, FinishEvent):
                results[i] = event
            elif not hasattr(event, "token_id"):  # an ErrorEvent
                raise RuntimeError(f"evaluation request failed: {event}")

        return sink

    params = SamplingParams(max_new_tokens=max_new_tokens)
    for i, ids in enumerate(inputs):
        engine.enqueue(
            Request(
                task=prompt.name, prompt=prompt, input_ids=list(ids), params=params, seed=0, sink=sink_for(i)
            )
        )
    with torch.inference_mode():
        engine.run_until_idle()
    if len(results) < len(inputs):
        raise RuntimeError(f"the engine stopped with {len(inputs) - len(results)} requests unfinished")
    return [results[i].generated_text for i in range(len(inputs))]


def exact_match(predictions: Sequence[str], examples: Sequence[dict[str, str]]) -> float:
    hits = sum(p.strip() == e["output"].strip() for p, e in zip(predictions, examples))
    return hits / max(1, len(examples))


def evaluate(
    lm: LoadedModel,
    embeddings: torch.Tensor,
    examples: Sequence[dict[str, str]],
    template: str,
    max_new_tokens: int,
    batch_size: int = 32,
) -> tuple[float, list[str]]:
    inputs = [encode(lm, template, e)[0] for e in examples]
    preds = generate_batch(lm, as_soft_prompt(lm, embeddings), inputs, max_new_tokens, batch_size)
    return exact_match(preds, examples), preds


def default_max_new_tokens(lm: LoadedModel, examples: Sequence[dict[str, str]]) -> int:
    return max(len(lm.tokenizer(e["output"], add_special_tokens=False)["input_ids"]) for e in examples) + 4
