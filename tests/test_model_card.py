"""The adapter's model card: it names the base model, the task, the template,
the data and the scores it is given."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from server.model_card import loss_ends, render_card
from server.train_config import CHATML_TEMPLATE, TrainConfig


def card_for(tmp_path: Path, **overrides) -> tuple[str, TrainConfig]:
    data = tmp_path / "toy.jsonl"
    data.write_text(json.dumps({"input": "a", "output": "b"}) + "\n")
    cfg = TrainConfig(task="toy-task", data=data, store=tmp_path / "store", seed=5, **overrides)
    card = render_card(
        cfg,
        "org/base-model",
        train_rows=[{"input": "a", "output": "b"}] * 7,
        held=[{"input": "c", "output": "d"}] * 3,
        steps=40,
        before=0.125,
        after=0.875,
        losses=[4.0, 2.0] + [1.0] * 36 + [0.5, 0.25],  # 40 steps: the first and last 5% are two steps each
        train_seconds=12.0,
        seconds=30.0,
        samples=[{"input": "in-1", "expected": "want-1", "got": "got-1"}],
    )
    return card, cfg


def test_card_names_model_task_template_data_and_scores(tmp_path: Path) -> None:
    card, cfg = card_for(tmp_path)
    lines = card.splitlines()
    assert lines[0] == "# toy-task"
    assert "`org/base-model`" in lines[2] and "(20 virtual tokens)" in lines[2]
    assert "<|im_start|>user\n<input text><|im_end|>\n<|im_start|>assistant\n" in card
    assert f"`{CHATML_TEMPLATE!r}`" in card
    digest = hashlib.sha256(cfg.data.read_bytes()).hexdigest()[:16]
    assert f"- training: `toy.jsonl` (sha256 {digest}…), 7 examples" in lines
    assert "- held-out: 3 examples split from the training file (seed 5)" in lines
    assert "- initial prompt (text init): 12.5%" in lines
    assert "- trained prompt: 87.5%" in lines
    assert "- loss: 3.0000 (first 5% of steps) -> 0.3750 (last 5%)" in lines
    assert any(line.startswith("- training time: 12 s for 40 steps, 30 s in all") for line in lines)
    assert "- `in-1` -> `got-1` (expected `want-1`)" in lines
    settings = json.loads(card.split("```json\n", 1)[1].split("\n```", 1)[0])
    assert settings["steps"] == 40 and settings["task"] == "toy-task" and settings["data"] == "toy.jsonl"
    assert not {"store", "progress", "template"} & settings.keys()
    assert str(tmp_path) not in card  # file names only: no local paths in a shared store


def test_card_names_a_separate_held_out_file(tmp_path: Path) -> None:
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"input": "c", "output": "d"}) + "\n")
    card, _ = card_for(tmp_path, eval_data=held)
    digest = hashlib.sha256(held.read_bytes()).hexdigest()[:16]
    assert f"- held-out: `held.jsonl` (sha256 {digest}…), 3 examples" in card.splitlines()
    assert "split from the training file" not in card


def test_loss_ends_average_at_least_one_step() -> None:
    assert loss_ends([3.0]) == (3.0, 3.0)
    assert loss_ends([]) == (0.0, 0.0)  # zero steps: no division by zero
    assert loss_ends([float(i) for i in range(40)]) == (0.5, 38.5)
