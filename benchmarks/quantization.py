"""--quantize int8 against the model's own dtype on the real default model: greedy agreement and accuracy.

Random-weight shapes say nothing about what quantization does to answers (their logits are nearly flat),
so agreement is measured here on the default model's real weights with the shipped tasks: every task
folder in prompts_store/ with held-out data (data/<task>.test.jsonl) answers it greedily, free-form
(training.evaluate's length), through an in-process engine holding the weights once in the model's
dtype, then through one holding the decoder's linears as int8 (a fresh load: quantizing releases the
model's own weights). Reported per task and dtype: exact match of each, the share of answers that are
identical, and the engine's wall time for the whole set (batch of 32 rows). Speed and memory at large
shapes (where the weights' bytes dominate) are in benchmarks/model_sizes.py --quantize.

    python -m benchmarks.quantization [--limit 60] [--dtypes float32 bfloat16] \\
        [--out benchmarks/results/quantization_cpu.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import ROOT, cpu_model, write_results
from benchmarks.contracts import Run, answer_all
from server.engine.engine import Engine
from server.engine.runner import Acceleration
from server.engine.scheduler import SchedulerConfig
from server.models import load_model
from server.prompts.store import read_task_folder
from server.prompts.types import PromptGeometry, SoftPrompt
from server.train_config import CHATML_TEMPLATE
from server.train_data import encode, read_jsonl
from server.train_eval import default_max_new_tokens

Example = dict[str, str]


def tasks_with_data(store: Path, data: Path) -> list[tuple[str, list[Example]]]:
    """(task folder name, its held-out examples) for every task whose data is in `data`."""
    found = []
    for folder in sorted(p for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")):
        held = data / f"{folder.name.removesuffix('-trained')}.test.jsonl"
        if held.exists():
            found.append((folder.name, read_jsonl(held)))
    return found


def answer_tasks(
    dtype: str, quantize: str | None, tasks: list[tuple[str, list[Example]]], store: Path, batch: int
) -> dict[str, Run]:
    """Every task's held-out answers through one engine over a fresh load of the default model."""
    lm = load_model("default", dtype=dtype)
    engine = Engine(
        lm, SchedulerConfig(batch, 1 << 20, 1 << 12), accel=Acceleration(one_copy=True, quantize=quantize)
    )
    geometry = PromptGeometry.of(lm, 512)
    out = {}
    try:
        for name, examples in tasks:
            prompt: SoftPrompt = read_task_folder(store / name, geometry)[0]
            inputs = [encode(lm, CHATML_TEMPLATE, e)[0] for e in examples]
            out[name] = answer_all(engine, prompt, inputs, default_max_new_tokens(lm, examples), None)
    finally:
        engine.masks.close()
    return out


def exact(run: Run, examples: list[Example]) -> float:
    return sum(a.text.strip() == e["output"].strip() for a, e in zip(run.answers, examples)) / max(
        1, len(examples)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=ROOT / "prompts_store")
    ap.add_argument("--data", type=Path, default=ROOT / "data")
    ap.add_argument("--limit", type=int, default=60, help="held-out examples per task at most")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tasks = [(name, held[: args.limit]) for name, held in tasks_with_data(args.store, args.data)]
    print(
        f"# --quantize int8 vs the model's dtype, default model, greedy; CPU: {cpu_model()}, "
        f"{args.threads} threads"
    )
    print("| task | dtype | n | exact (dtype) | exact (int8) | identical answers | wall s (dtype / int8) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    rows: list[dict[str, Any]] = []
    for dtype in args.dtypes:
        base = answer_tasks(dtype, None, tasks, args.store, args.batch)
        quant = answer_tasks(dtype, "int8", tasks, args.store, args.batch)
        for name, examples in tasks:
            b, q = base[name], quant[name]
            same = sum(x.text == y.text for x, y in zip(b.answers, q.answers)) / len(examples)
            row = {
                "task": name,
                "dtype": dtype,
                "n": len(examples),
                "exact": exact(b, examples),
                "exact_int8": exact(q, examples),
                "identical": same,
                "seconds": b.seconds,
                "seconds_int8": q.seconds,
            }
            rows.append(row)
            print(
                f"| {name} | {dtype} | {row['n']} | {row['exact']:.1%} | {row['exact_int8']:.1%} | "
                f"{same:.1%} | {b.seconds:.1f} / {q.seconds:.1f} |",
                flush=True,
            )
    write_results(args.out, args, {"cpu": cpu_model(), "threads": args.threads}, rows=rows)


if __name__ == "__main__":
    main()
