"""Re-train the shipped tasks and score them against hand-written instructions (`make train-tasks`).

    python scripts/train_tasks.py [--tasks iso-date,extract-json,sentiment] [--phase all|train|baseline]

1. makes the data (`scripts/make_datasets.py`, seeded) into `data/`,
2. trains each task with `softmux train`'s code path into `prompts_store/<task>-trained`,
3. scores on the held-out set, greedy through the serving engine: (a) the base model with
   hand-written instructions (a ChatML system turn, zero-shot and 3-shot; the best is reported),
   (b) the text-initialised soft prompt before training, (c) the trained soft prompt,
   and writes `data/scores.json` and the markdown table printed at the end.

A hand-written instruction is evaluated as a soft prompt equal to the embeddings of its text:
the tokenizer adds no BOS, so that is exactly the text placed in front of the input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.make_datasets import CONTRACTS, SIZES, generate  # noqa: E402
from server.models import DEFAULT_MODEL_ID, LoadedModel, load_model  # noqa: E402
from server.train_config import CHATML_TEMPLATE, TrainConfig  # noqa: E402
from server.train_data import read_jsonl  # noqa: E402
from server.train_eval import default_max_new_tokens, evaluate  # noqa: E402
from server.training import train  # noqa: E402

# name -> (hand-written instruction, training settings)
TASKS: dict[str, tuple[str, dict]] = {
    "iso-date": (
        "Convert the date to ISO 8601 format (YYYY-MM-DD). Reply with the date only.",
        {"steps": 60, "batch_size": 8, "lr": 0.05},
    ),
    "extract-json": (
        "Extract the person's full name and the city from the text. Reply with JSON only, "
        'in the form {"name": "...", "city": "..."}.',
        {"steps": 60, "batch_size": 8, "lr": 0.05},
    ),
    "sentiment": (
        "Is the overall sentiment of the review positive or negative? Reply with one word: "
        "positive or negative.",
        {"steps": 60, "batch_size": 8, "lr": 0.05},
    ),
}


def system_turn(instruction: str, shots: list[dict[str, str]] = ()) -> str:
    text = f"<|im_start|>system\n{instruction}<|im_end|>\n"
    for s in shots:
        text += CHATML_TEMPLATE.format(input=s["input"]) + s["output"] + "<|im_end|>\n"
    return text


def text_embeddings(lm: LoadedModel, text: str) -> torch.Tensor:
    ids = torch.tensor(lm.tokenizer(text, add_special_tokens=True)["input_ids"])
    with torch.no_grad():
        return lm.model.get_input_embeddings()(ids).float()  # [P, H]


def make_data(data: Path) -> None:
    data.mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        for split, n in SIZES.items():
            rows = generate(task, split, n)
            (data / f"{task}.{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--phase", choices=["all", "train", "baseline"], default="all")
    parser.add_argument("--store", type=Path, default=ROOT / "prompts_store")
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-eval", type=int, default=100, help="held-out examples scored (of 150)")
    parser.add_argument("--suffix", default="-trained", help="store folder = <task><suffix>")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    make_data(args.data)
    lm = load_model("default", device="cpu", dtype="float32")
    scores_path = args.data / "scores.json"
    scores = json.loads(scores_path.read_text()) if scores_path.exists() else {}
    for task in args.tasks.split(","):
        instruction, settings = TASKS[task]
        train_file, test_file = args.data / f"{task}.train.jsonl", args.data / f"{task}.test.jsonl"
        entry = scores.setdefault(task, {})
        if args.phase in ("all", "train"):
            cfg = TrainConfig(
                task=task + args.suffix,
                data=train_file,
                eval_data=test_file,
                store=args.store,
                init="text",
                init_text=instruction,
                seed=0,
                max_eval=args.max_eval,
                output=CONTRACTS[task]["output"],  # task.json beside the adapter
                defaults=CONTRACTS[task]["defaults"],
                **settings,
            )
            result = train(cfg, lm, model_label=DEFAULT_MODEL_ID)
            entry.update(
                text_init=result.before,
                trained=result.after,
                train_seconds=round(result.train_seconds),
                total_seconds=round(result.seconds),
                loss_first=result.losses[0],
                loss_last=result.losses[-1],
                steps=len(result.losses),
                folder=result.folder.name,
                threads=args.threads,
            )
            scores_path.write_text(json.dumps(scores, indent=2) + "\n")
        if args.phase in ("all", "baseline"):
            held = read_jsonl(test_file)[: args.max_eval]
            shots = read_jsonl(train_file)[:3]
            max_new = default_max_new_tokens(lm, held)
            for key, text in (
                ("instruction_0shot", system_turn(instruction)),
                ("instruction_3shot", system_turn(instruction, shots)),
            ):
                t = time.monotonic()
                em, preds = evaluate(lm, text_embeddings(lm, text), held, CHATML_TEMPLATE, max_new)
                entry[key] = em
                print(f"{task} {key}: {em:.1%} ({time.monotonic() - t:.0f} s); e.g. {preds[:2]}")
            scores_path.write_text(json.dumps(scores, indent=2) + "\n")
    print(table(scores))


def table(scores: dict) -> str:
    lines = [
        "| task | (a) instruction, 0-shot | (a) instruction, 3-shot | (b) text-init soft prompt | (c) "
        "trained soft prompt | training |",
        "|---|---|---|---|---|---|",
    ]
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    for task, e in scores.items():
        lines.append(
            f"| {task} | {pct(e.get('instruction_0shot'))} | {pct(e.get('instruction_3shot'))} | "
            f"{pct(e.get('text_init'))} | {pct(e.get('trained'))} | "
            f"{e.get('steps', '-')} steps, {e.get('train_seconds', '-')} s, {e.get('threads', '-')} threads |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
