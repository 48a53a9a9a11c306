"""Task contracts: the shipped tasks' answers free-form and under their task.json `output`, side by side.

For every folder in prompts_store/ whose task.json states an output contract, the held-out data of its
task (data/<task>.test.jsonl; `<task>` and `<task>-trained` share it) runs greedily through an
in-process Engine twice: free-form, with `server.training.evaluate`'s length (longest expected answer
+ 4 tokens), and under the contract (a matcher from GrammarCompiler) with the task's default
max_new_tokens, as the server runs a request that leaves it unset. Inputs are wrapped in the ChatML
user turn, as `evaluate` and the folders' cards do. Reported per task: exact match (after strip, as
`evaluate`), the share of answers valid under the contract (jsonschema, re.fullmatch, membership),
mean generated tokens, wall time, and how many constrained answers ran out of tokens before the
grammar was complete.

The same is done on UNSEEN below: 8 inputs per task written for this benchmark (no such set existed
in the project), in shapes the data generator never produces, reported separately.

    python -m benchmarks.contracts [--limit N] [--threads 1] [--batch 32] \\
        [--out benchmarks/results/contracts_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import torch

from benchmarks.common import ROOT, cpu_model, write_results
from server.engine.engine import Engine
from server.engine.grammar import Compiled, GrammarCompiler
from server.engine.request import ErrorEvent, Event, FinishEvent, FinishReason, Request, SamplingParams
from server.engine.scheduler import SchedulerConfig
from server.models import LoadedModel, load_model
from server.prompts.store import read_task_folder
from server.prompts.types import PromptGeometry, SoftPrompt
from server.structured import OutputKind, OutputSpec
from server.train_config import CHATML_TEMPLATE
from server.train_data import encode, read_jsonl
from server.train_eval import default_max_new_tokens

Example = dict[str, str]


def _person(name: str, city: str) -> str:
    return json.dumps({"name": name, "city": city})


# Written for this benchmark (the project had no unseen set): names, cities, subjects, adjectives and
# sentence shapes that scripts/make_datasets.py never produces, for each task's training or held-out data.
UNSEEN: dict[str, list[Example]] = {
    "sentiment": [
        {"input": "Honestly, the headphones were a joy to use.", "output": "positive"},
        {"input": "The soup arrived lukewarm and tasted of nothing.", "output": "negative"},
        {"input": "I would happily stay at this guesthouse again.", "output": "positive"},
        {"input": "The printer jammed on every second page.", "output": "negative"},
        {"input": "Not a single complaint about the tour guide.", "output": "positive"},
        {"input": "The bike was sturdy, but the brakes were dangerous.", "output": "negative"},
        {"input": "Although the lobby was shabby, the bed was comfortable.", "output": "positive"},
        {"input": "The museum was crowded and the exhibits were underwhelming.", "output": "negative"},
    ],
    "iso-date": [
        {"input": "14.03.2019", "output": "2019-03-14"},
        {"input": "Sunday, 5 January 2025", "output": "2025-01-05"},
        {"input": "the fourth of July 2021", "output": "2021-07-04"},
        {"input": "2031-9-7", "output": "2031-09-07"},
        {"input": "December 25th 1987", "output": "1987-12-25"},
        {"input": "1 Sept 2010", "output": "2010-09-01"},
        {"input": "29th February 2024", "output": "2024-02-29"},
        {"input": "Meet me on March 3rd 2024 at the station.", "output": "2024-03-03"},
    ],
    "extract-json": [
        {
            "input": "Greetings from Zurich, where Felix Hartmann now lives.",
            "output": _person("Felix Hartmann", "Zurich"),
        },
        {"input": "Signed, Chiara Bianchi (Milan)", "output": _person("Chiara Bianchi", "Milan")},
        {"input": "Li Wei has just relocated to Singapore.", "output": _person("Li Wei", "Singapore")},
        {
            "input": "The package for Olga Ivanova should go to Riga.",
            "output": _person("Olga Ivanova", "Riga"),
        },
        {"input": "Meet Tomas Herrera, a baker from Seville.", "output": _person("Tomas Herrera", "Seville")},
        {
            "input": "Amelia Clarke, who teaches in Edinburgh, wrote to us.",
            "output": _person("Amelia Clarke", "Edinburgh"),
        },
        {
            "input": "After years abroad, Rahul Mehta settled in Bangalore.",
            "output": _person("Rahul Mehta", "Bangalore"),
        },
        {"input": "New York is home to Daniel Cohen.", "output": _person("Daniel Cohen", "New York")},
    ],
}


@dataclass
class Answer:
    text: str
    tokens: int
    reason: FinishReason | None  # None: the row failed (an ErrorEvent)
    error: str = ""


@dataclass
class Run:
    answers: list[Answer]
    seconds: float
    max_new_tokens: int


def validator(spec: OutputSpec) -> Callable[[str], bool]:
    """The independent check of an answer against a contract (not llguidance's): jsonschema, re.fullmatch,
    membership."""
    if spec.kind is OutputKind.CHOICE:
        choices = set(json.loads(spec.text))
        return lambda text: text in choices
    if spec.kind is OutputKind.REGEX:
        pattern = re.compile(spec.text)
        return lambda text: pattern.fullmatch(text) is not None
    if spec.kind in (OutputKind.JSON_SCHEMA, OutputKind.JSON_OBJECT):
        schema = json.loads(spec.text) if spec.kind is OutputKind.JSON_SCHEMA else {"type": "object"}

        def valid_json(text: str) -> bool:
            try:
                jsonschema.validate(json.loads(text), schema)
            except (ValueError, jsonschema.ValidationError):
                return False
            return True

        return valid_json
    raise ValueError(f"no independent check for a {spec.kind.value} contract")


def run(
    lm: LoadedModel,
    prompt: SoftPrompt,
    inputs: list[list[int]],
    max_new_tokens: int,
    compiled: Compiled | None,
    batch: int,
) -> Run:
    """Greedy answers through a fresh engine on this thread (training.generate_batch's way,
    with matchers and failures kept)."""
    total = sum(len(i) for i in inputs) + len(inputs) * (prompt.num_virtual_tokens + max_new_tokens)
    engine = Engine(lm, SchedulerConfig(batch, max(total, 1), len(inputs) + 1))
    try:
        return answer_all(engine, prompt, inputs, max_new_tokens, compiled)
    finally:
        engine.masks.close()


def answer_all(
    engine: Engine,
    prompt: SoftPrompt,
    inputs: list[list[int]],
    max_new_tokens: int,
    compiled: Compiled | None,
) -> Run:
    """Greedy answers to every input through `engine` (idle, not started), run on this thread."""
    answers: dict[int, Answer] = {}

    def sink_for(i: int) -> Callable[[Event], None]:
        def sink(event: Event) -> None:
            if isinstance(event, FinishEvent):
                answers[i] = Answer(event.generated_text, event.generated_tokens, event.finish_reason)
            elif isinstance(event, ErrorEvent):
                answers[i] = Answer("", 0, None, event.message)

        return sink

    params = SamplingParams(max_new_tokens=max_new_tokens)
    started = time.perf_counter()
    for i, ids in enumerate(inputs):
        request = Request(
            task=prompt.name, prompt=prompt, input_ids=list(ids), params=params, seed=0, sink=sink_for(i)
        )
        request.matcher = None if compiled is None else compiled.matcher()
        engine.enqueue(request)
    with torch.inference_mode():
        engine.run_until_idle()
    seconds = time.perf_counter() - started
    missing = [i for i in range(len(inputs)) if i not in answers]
    if missing:
        raise RuntimeError(f"{prompt.name}: no answer for {len(missing)} input(s)")
    return Run([answers[i] for i in range(len(inputs))], seconds, max_new_tokens)


def summarise(
    examples: list[Example], result: Run, valid: Callable[[str], bool], constrained: bool
) -> dict[str, Any]:
    answers = result.answers
    n = max(1, len(answers))
    exact = sum(a.text.strip() == e["output"].strip() for a, e in zip(answers, examples))
    return {
        "exact": exact / n,
        "valid": sum(valid(a.text.strip()) for a in answers) / n,
        "mean_tokens": statistics.fmean(a.tokens for a in answers) if answers else 0.0,
        "seconds": result.seconds,
        "max_new_tokens": result.max_new_tokens,
        # out of tokens before the answer ended (under a contract: before the grammar was complete)
        "cut_short": sum(a.reason is FinishReason.LENGTH for a in answers),
        "failed": sum(a.reason is None for a in answers),
        "errors": sorted({a.error for a in answers if a.error})[:3],
        "constrained": constrained,
    }


def compare(
    lm: LoadedModel,
    prompt: SoftPrompt,
    spec: OutputSpec,
    compiled: Compiled,
    examples: list[Example],
    batch: int,
) -> dict[str, Any]:
    """One example set through the task free-form, then under its contract."""
    inputs = [encode(lm, CHATML_TEMPLATE, e)[0] for e in examples]
    free_len = default_max_new_tokens(lm, examples)
    bound_len = prompt.settings.defaults.max_new_tokens or free_len
    free = run(lm, prompt, inputs, free_len, None, batch)
    bound = run(lm, prompt, inputs, bound_len, compiled, batch)
    valid = validator(spec)
    differ = [
        {"input": e["input"], "expected": e["output"], "free": f.text, "constrained": c.text}
        for e, f, c in zip(examples, free.answers, bound.answers)
        if f.text.strip() != c.text.strip()
    ]
    return {
        "n": len(examples),
        "free": summarise(examples, free, valid, False),
        "constrained": summarise(examples, bound, valid, True),
        "differ": len(differ),
        "differ_samples": differ[:6],
    }


def shipped_contracts(lm: LoadedModel, store: Path) -> list[tuple[SoftPrompt, OutputSpec]]:
    """Every task in the store whose task.json states an output contract, read as the server reads it."""
    geometry = PromptGeometry.of(lm, 512)
    found = []
    for folder in sorted(p for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for prompt in read_task_folder(folder, geometry):
            spec = prompt.settings.output_spec
            if spec is not None:
                found.append((prompt, spec))
    return found


def row(label: str, split: str, r: dict[str, Any]) -> str:
    f, c = r["free"], r["constrained"]
    return (
        f"{label:22} {split:8} {r['n']:4} | {f['exact']:6.1%} {c['exact']:6.1%} | {f['valid']:6.1%} "
        f"{c['valid']:6.1%} | {f['mean_tokens']:5.1f} {c['mean_tokens']:5.1f} | {f['seconds']:6.1f} "
        f"{c['seconds']:6.1f} | {f['cut_short']:3}/{c['cut_short']:<3} {c['failed']:3}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=ROOT / "prompts_store")
    ap.add_argument("--data", type=Path, default=ROOT / "data")
    ap.add_argument(
        "--limit", type=int, default=None, help="held-out examples per task at most (default: all)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32, help="rows in the running batch")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model("default", dtype="float32")
    compiler = GrammarCompiler.for_model(lm)
    tasks = shipped_contracts(lm, args.store)
    header = {
        "cpu": cpu_model(),
        "threads": args.threads,
        "dtype": "float32",
        "model": lm.name,
        "batch": args.batch,
        "limit": args.limit,
    }
    print(f"CPU: {header['cpu']}, torch threads {args.threads}, float32, greedy, batch {args.batch}")
    # warm-up: the engine's lazy initialisation stays out of the first task's wall time
    prompt0 = tasks[0][0]
    run(lm, prompt0, [encode(lm, CHATML_TEMPLATE, {"input": "hi", "output": ""})[0]] * 2, 4, None, args.batch)

    results: dict[str, dict[str, Any]] = {}
    lines = []
    for prompt, spec in tasks:
        base = prompt.name.removesuffix("-trained")
        compiled = compiler.compile(spec)  # once, outside the timed runs (the server caches it too)
        entry: dict[str, Any] = {"contract": spec.as_fields(), "defaults": prompt.settings.defaults.given()}
        data = args.data / f"{base}.test.jsonl"
        if data.exists():
            held = read_jsonl(data)[: args.limit]
            entry["held_out"] = compare(lm, prompt, spec, compiled, held, args.batch)
            lines.append(row(prompt.name, "held-out", entry["held_out"]))
            print(lines[-1], flush=True)
        if base in UNSEEN:
            entry["unseen"] = compare(lm, prompt, spec, compiled, UNSEEN[base], args.batch)
            lines.append(row(prompt.name, "unseen", entry["unseen"]))
            print(lines[-1], flush=True)
        results[prompt.name] = entry

    print()
    print(f"CPU: {header['cpu']}, torch threads {args.threads}, float32, greedy, batch {args.batch}")
    print(
        f"{'task':22} {'set':8} {'n':>4} | {'exact match':>13} | {'valid':>13} | {'tokens':>11} | "
        f"{'wall s':>13} | cut  failed"
    )
    print(
        f"{'':22} {'':8} {'':4} | {'free':>6} {'contr':>6} | {'free':>6} {'contr':>6} | {'free':>5} "
        f"{'contr':>5} | {'free':>6} {'contr':>6} | f/c"
    )
    for line in lines:
        print(line)
    write_results(args.out, args, header, tasks=results, unseen_inputs=UNSEEN)


if __name__ == "__main__":
    main()
