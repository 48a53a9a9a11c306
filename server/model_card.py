"""The model card (README.md) written next to a trained adapter by `softmux train`.

It tells whoever loads the adapter what it needs and what it scored: the base model, the input
template clients must wrap their text in, which data it saw (file names and hashes, no local
paths), the settings, and the held-out exact match before and after training with a few samples.
Rendering only: `server.training` decides what goes in and writes the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from server.train_config import TrainConfig


def file_sha(path: Path | None) -> str:
    """The first 16 hex digits of a data file's sha256 (`-` without a file):
    the card names data without local paths."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path else "-"


def loss_ends(losses: list[float]) -> tuple[float, float]:
    """Mean loss over the first and over the last 5% of steps (at least one step each):
    smoother than two single steps."""
    n = max(1, len(losses) // 20)
    first, last = losses[:n], losses[-n:]
    return sum(first) / max(1, len(first)), sum(last) / max(1, len(last))


def render_card(
    cfg: TrainConfig,
    model_label: str,
    train_rows: list[dict[str, str]],
    held: list[dict[str, str]],
    steps: int,
    before: float,
    after: float,
    losses: list[float],
    train_seconds: float,
    seconds: float,
    samples: list[dict[str, str]],
    task_settings: dict[str, Any] | None = None,
) -> str:
    """The adapter's README.md in markdown; `model_label` is the base model as the card names it and
    `task_settings` the task.json written beside it (its output contract and defaults), if any."""
    settings = {
        k: (v.name if isinstance(v, Path) else v)
        for k, v in asdict(cfg).items()  # no local paths
        if k not in {"progress", "store", "template"}
    }
    first, last = loss_ends(losses)
    lines = [
        f"# {cfg.task}",
        "",
        f"Prompt-tuning soft prompt ({cfg.num_virtual_tokens} virtual tokens) for `{model_label}`, "
        "trained with `softmux train`.",
        "",
        "## Input template",
        "",
        "Send `/generate` the input wrapped exactly like this "
        "(one ChatML user turn plus the assistant header);",
        "the answer ends at `<|im_end|>`:",
        "",
        "```",
        cfg.template.replace("{input}", "<input text>"),
        "```",
        "",
        f"(as a Python string: `{cfg.template!r}`)",
        "",
        *_contract_lines(task_settings),
        "## Data",
        "",
        f"- training: `{Path(cfg.data).name}` (sha256 {file_sha(cfg.data)}…), {len(train_rows)} examples",
        f"- held-out: `{Path(cfg.eval_data).name}` (sha256 {file_sha(cfg.eval_data)}…), {len(held)} examples"
        if cfg.eval_data
        else f"- held-out: {len(held)} examples split from the training file (seed {cfg.seed})",
        "",
        "## Settings",
        "",
        "```json",
        json.dumps({**settings, "steps": steps}, indent=2, sort_keys=True),
        "```",
        "",
        "## Held-out exact match (greedy, through the serving engine)",
        "",
        f"- initial prompt ({cfg.init} init): {before:.1%}",
        f"- trained prompt: {after:.1%}",
        f"- loss: {first:.4f} (first 5% of steps) -> {last:.4f} (last 5%)",
        f"- training time: {train_seconds:.0f} s for {steps} steps, {seconds:.0f} s in all with data loading "
        f"and both evaluations (torch threads: {torch.get_num_threads()})",
        "",
        "Sample held-out predictions:",
        "",
    ]
    lines += [f"- `{s['input']}` -> `{s['got']}` (expected `{s['expected']}`)" for s in samples]
    return "\n".join(lines) + "\n"


def _contract_lines(task_settings: dict[str, Any] | None) -> list[str]:
    """The card's section on task.json: clients must know the server holds every answer to it."""
    if task_settings is None:
        return []
    return [
        "## Contract (task.json)",
        "",
        "The server holds every request of this task to this output contract and uses these defaults for",
        "parameters a request leaves unset (the held-out scores below were measured free-form):",
        "",
        "```json",
        json.dumps(task_settings, indent=2),
        "```",
        "",
    ]
