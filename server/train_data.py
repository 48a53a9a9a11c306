"""`softmux train`'s data: JSON lines of {"input", "output"}, the held-out split, and each example as
token ids exactly as the server tokenises the templated input (plus the output and its end token)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from server.models import LoadedModel
from server.train_config import TrainConfig


def read_jsonl(path: Path) -> list[dict[str, str]]:
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("input"), str)
            or not isinstance(row.get("output"), str)
        ):
            raise ValueError(f"{path}:{i}: each line must be an object with string 'input' and 'output'")
        rows.append({"input": row["input"], "output": row["output"]})
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows


def split_data(cfg: TrainConfig) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    rows = read_jsonl(cfg.data)
    if cfg.eval_data is not None:
        held = read_jsonl(cfg.eval_data)
    else:
        rng = random.Random(cfg.seed)
        rows = rows[:]
        rng.shuffle(rows)
        n = int(cfg.holdout) if cfg.holdout >= 1 else int(round(len(rows) * cfg.holdout))
        n = max(1, min(n, len(rows) - 1))
        held, rows = rows[:n], rows[n:]
    if cfg.max_eval is not None:
        held = held[: cfg.max_eval]
    return rows, held


def encode(lm: LoadedModel, template: str, example: dict[str, str]) -> tuple[list[int], list[int]]:
    """(input ids exactly as the server tokenises the templated input, output ids + end token)."""
    tok = lm.tokenizer
    input_ids = tok(template.format(input=example["input"]), add_special_tokens=True)["input_ids"]
    output_ids = tok(example["output"], add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None:
        output_ids = output_ids + [int(tok.eos_token_id)]
    return input_ids, output_ids
