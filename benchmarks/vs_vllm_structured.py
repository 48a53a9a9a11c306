"""softmux against vLLM's CPU build under structured outputs, on the same machine, in one run.

The workload of benchmarks/vs_vllm.py (64 requests over 8 tasks, soft prompts of 20 virtual tokens fed
to vLLM as `prompt_embeds`, inputs 8-24 tokens, 32 rows, float32, greedy), every row under a JSON schema:

- throughput, equal work: a list of person records (strings, bounded integers, emails) that no row can
  finish in 32 tokens, exactly 32 new tokens each (softmux: eos ignored; vLLM: `structured_outputs`
  json with `ignore_eos`, `min_tokens`, compact JSON); the same runs unconstrained give each side's cost
  of the constraint; medians of `--repeats`, the four variants alternating;
- validity: one person record (a name of at most 16 characters, an age, a boolean, an enum) that ends, up to
  96 tokens; the answers each side's grammar ended are validated with `jsonschema` (formats checked), those
  cut by the limit counted apart.

    .venv/bin/python -m benchmarks.vs_vllm_structured [--repeats 3] \\
        [--json benchmarks/results/vs_vllm_structured_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import jsonschema
import torch

from benchmarks.common import ROOT
from benchmarks.machine import CpuWatch
from benchmarks.structured import PEOPLE
from benchmarks.vs_vllm import Results, Setup, VllmSide, build_softmux_engine, prepare
from server.engine.engine import Engine
from server.engine.grammar import GrammarCompiler, OutputKind, OutputSpec
from server.engine.request import FinishEvent, FinishReason, Request, SamplingParams
from server.engine.scheduler import SchedulerConfig

PERSON = {  # every field bounded, so that answers end well within 96 tokens on both sides
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "tier": {"enum": ["free", "pro", "team"]},
    },
    "required": ["name", "age", "member", "tier"],
    "additionalProperties": False,
}


def softmux_run(
    setup: Setup, compiler: GrammarCompiler, schema: dict | None, new_tokens: int
) -> dict[str, float]:
    """Every job at once, exactly `new_tokens` each, every row under `schema` (None: unconstrained)."""
    engine = build_softmux_engine(setup.lm32, 32)
    compiled = None if schema is None else compiler.compile(OutputSpec.of(OutputKind.JSON_SCHEMA, schema))
    for job in setup.jobs:
        prompt = setup.prompts32[job.task]
        req = Request(
            task=prompt.name,
            prompt=prompt,
            input_ids=job.input_ids,
            params=SamplingParams(max_new_tokens=new_tokens),
            seed=0,
            sink=lambda e: None,
        )
        req.matcher = None if compiled is None else compiled.matcher()
        engine.enqueue(req)
    began = time.perf_counter()
    engine.run_until_idle()
    seconds = time.perf_counter() - began
    return {
        "tokens_per_s": len(setup.jobs) * new_tokens / seconds,
        "grammar_errors": engine.mask_stats.grammar_errors,
    }


def softmux_answers(
    setup: Setup, compiler: GrammarCompiler, schema: dict, max_tokens: int
) -> tuple[list[str], list[str]]:
    """Answers that end where the grammar (or eos) does: (texts, finish reasons as vLLM names them)."""
    engine = Engine(setup.lm32, SchedulerConfig(32, 1 << 30, 1 << 16), 1 << 30)
    compiled = compiler.compile(OutputSpec.of(OutputKind.JSON_SCHEMA, schema))
    ends: list[list[FinishEvent]] = []
    for job in setup.jobs:
        prompt = setup.prompts32[job.task]
        events: list[FinishEvent] = []
        req = Request(
            task=prompt.name,
            prompt=prompt,
            input_ids=job.input_ids,
            params=SamplingParams(max_new_tokens=max_tokens),
            seed=0,
            sink=events.append,  # type: ignore[arg-type]
        )
        req.matcher = compiled.matcher()
        engine.enqueue(req)
        ends.append(events)
    engine.run_until_idle()
    finals = [e[-1] for e in ends]
    return [f.generated_text for f in finals], [
        "length" if f.finish_reason is FinishReason.LENGTH else "stop" for f in finals
    ]


def validity(texts: list[str], reasons: list[str], schema: dict) -> dict[str, Any]:
    ended = [t for t, r in zip(texts, reasons) if r == "stop"]
    bad = []
    for t in ended:
        try:
            jsonschema.validate(json.loads(t), schema, format_checker=jsonschema.FormatChecker())
        except (json.JSONDecodeError, jsonschema.ValidationError) as e:
            bad.append(f"{t[:60]!r}: {str(e).splitlines()[0][:80]}")
    return {
        "answers": len(texts),
        "ended": len(ended),
        "valid": len(ended) - len(bad),
        "truncated": len(texts) - len(ended),
        "invalid": bad,
    }


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--virtual", type=int, default=20)
    ap.add_argument("--input-min", type=int, default=8)
    ap.add_argument("--input-max", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peer-python", type=Path, default=ROOT / ".peer-venv" / "bin" / "python")
    ap.add_argument("--peer-startup-timeout", type=float, default=600)
    ap.add_argument("--peer-log", type=Path, default=Path(tempfile.gettempdir()) / "softmux-peer-vllm.log")
    ap.add_argument("--json", type=Path)
    return ap.parse_args()


@torch.inference_mode()
def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    setup = prepare(args, CpuWatch())
    lm = setup.lm32
    compiler = GrammarCompiler.for_model(lm)
    res = Results()
    vllm = VllmSide(setup, "float32", 32, res)
    people = {"json": PEOPLE}
    variants = {
        "softmux free": lambda: softmux_run(setup, compiler, None, args.new_tokens),
        "softmux json": lambda: softmux_run(setup, compiler, PEOPLE, args.new_tokens),
        "vLLM free": lambda: vllm.ask({"cmd": "run"}),
        "vLLM json": lambda: vllm.ask({"cmd": "run", "structured": people}),
    }
    runs: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.repeats):
        for name, fn in variants.items():
            out = fn()
            if out is not None:
                runs[name].append(out["tokens_per_s"])
                print(f"run {r + 1}: {name} {out['tokens_per_s']:.1f} tok/s", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items() if v}
    report: dict[str, Any] = {**setup.header, "throughput": med, "peer_note": res.peer_note}
    checks = {"softmux": validity(*softmux_answers(setup, compiler, PERSON, 96), PERSON)}
    peer = vllm.ask({"cmd": "run", "structured": {"json": PERSON}, "max_tokens": 96, "exact": False})
    if peer is not None:
        checks["vLLM"] = validity(peer["texts"], peer["reasons"], PERSON)
        report["vllm"] = vllm.peer.ready["vllm"] if vllm.peer is not None else None
    vllm.close()
    report["validity"] = checks
    print(
        f"\n# structured outputs, softmux vs vLLM CPU ({setup.header['cpu']}, {args.threads} threads, "
        "float32, 32 rows)"
    )
    print("| side | unconstrained tok/s | every row under a JSON schema tok/s | constrained / free |")
    print("|---|---:|---:|---:|")
    for side in ("softmux", "vLLM"):
        free, js = med.get(f"{side} free"), med.get(f"{side} json")
        if free and js:
            print(f"| {side} | {free:.1f} | {js:.1f} | {js / free:.3f}x |")
    if med.get("vLLM json"):
        print(f"softmux / vLLM under the schema: {med['softmux json'] / med['vLLM json']:.2f}x")
    for side, v in checks.items():
        print(
            f"validity {side}: {v['valid']}/{v['ended']} valid of the answers the grammar ended, "
            f"{v['truncated']} cut by 96 tokens; {v['invalid'][:3]}"
        )
    if res.peer_note:
        print(f"vLLM: {res.peer_note}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
