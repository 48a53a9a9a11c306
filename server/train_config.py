"""`softmux train`'s configuration: what a training run is asked to do (no torch, no engine). Its own
module so that the model card (server/model_card.py), which training imports, can take it too."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHATML_TEMPLATE = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
INITS = ("text", "sample_vocab", "random")


@dataclass(frozen=True)
class TrainConfig:
    task: str
    data: Path
    store: Path = Path("prompts_store")
    eval_data: Path | None = None  # held-out file; without it `holdout` of `data` is held out
    holdout: float = 0.2  # fraction (or count when >= 1) of `data` held out when no eval_data
    num_virtual_tokens: int = 20
    init: str = "text"  # text | sample_vocab | random
    init_text: str | None = None  # default: a generic instruction naming the task
    steps: int | None = None  # optimiser steps (default 200 unless epochs is given)
    epochs: float | None = None
    lr: float = 0.03
    batch_size: int = 8
    seed: int = 0
    template: str = CHATML_TEMPLATE
    max_eval: int | None = None  # evaluate on at most this many held-out examples
    eval_batch_size: int = 32
    max_new_tokens: int | None = None  # evaluation; default: longest held-out output + 4 tokens
    warmup: float = 0.05  # fraction of steps with a linear learning-rate warm-up; then linear decay to 0
    progress: bool = True
    # The task's contract, written as task.json beside the adapter (none of them: no task.json).
    output: dict[str, Any] | None = (
        None  # structured_outputs shape: json, json_object, regex, choice or grammar
    )
    output_choices_from_data: bool = False  # output: a choice among the distinct outputs of `data`
    defaults: dict[str, Any] = field(default_factory=dict)  # sampling defaults (TaskDefaults' fields)

    def resolved_init_text(self) -> str:
        return (
            self.init_text
            or f"You are a precise assistant for the task '{self.task}'. Answer with the result only."
        )
