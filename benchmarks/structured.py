"""Structured outputs and n, measured in process on the default model (CPU model printed):

- compile: cold and cached compile time of every constraint in benchmarks/schemas.py (p50, p99, max);
- validity: each constraint answered greedily and sampled (3 seeds) by the instruct model with a one-token
  soft prompt; answers the grammar ended are parsed and validated (jsonschema with formats, re.fullmatch,
  membership); answers cut by max_new_tokens are counted apart;
- cost: benchmarks/compare.py's workload (64 requests, 8 tasks, 32 rows, 32 new tokens) with 0%, 50% and
  100% of rows under a JSON schema (a list of person records: strings, bounded integers, emails, that no
  row can finish in 32 tokens, so every variant generates the same tokens); tokens/s medians of rounds
  alternating the variants; mask fill time per pass p50/p99 and the part the engine waited for after the
  forward pass (the rest was hidden behind it);
- n: 16 prompts x n=4 samples (one prefill each, the samples forked) against 64 separate requests.

    python -m benchmarks.structured [--rounds 3] [--threads 2] [--out benchmarks/results/structured_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import jsonschema
import torch

from benchmarks.common import cpu_model
from benchmarks.compare import Job, alternating_medians, longest, make_jobs, make_prompts
from benchmarks.schemas import CHOICES, REGEXES, SCHEMAS
from server.admission import sample_seed
from server.engine.engine import Engine
from server.engine.grammar import GrammarCompiler, GrammarError, OutputKind, OutputSpec
from server.engine.request import FinishEvent, FinishReason, Request, SamplingParams
from server.engine.scheduler import SchedulerConfig
from server.models import LoadedModel, load_model
from server.prompts.types import PromptKind, SoftPrompt

PEOPLE = {
    "type": "array",
    "minItems": 16,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "email": {"type": "string", "format": "email"},
        },
        "required": ["name", "age", "email"],
        "additionalProperties": False,
    },
}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def constraints() -> list[tuple[str, OutputSpec]]:
    out = [(name, OutputSpec.of(OutputKind.JSON_SCHEMA, schema)) for name, schema in SCHEMAS]
    out += [(name, OutputSpec.of(OutputKind.REGEX, rx)) for name, rx in REGEXES]
    return out + [(name, OutputSpec.of(OutputKind.CHOICE, choices)) for name, choices in CHOICES]


def compile_times(lm: LoadedModel) -> dict[str, Any]:
    compiler = GrammarCompiler.for_model(lm)
    cold, cached, refused = [], [], {}
    for name, spec in constraints():
        for bucket in (cold, cached):
            began = time.perf_counter()
            try:
                compiler.compile(spec)
            except GrammarError as e:
                refused[name] = str(e)
            bucket.append(time.perf_counter() - began)
    ms = 1000.0
    return {
        "constraints": len(cold),
        "cold_ms": {"p50": pct(cold, 0.5) * ms, "p99": pct(cold, 0.99) * ms, "max": max(cold) * ms},
        "cached_ms": {"p50": pct(cached, 0.5) * ms, "p99": pct(cached, 0.99) * ms},
        "refused": refused,
    }


def chat_text(lm: LoadedModel, instruction: str) -> list[int]:
    text = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
    )
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


def valid(spec: OutputSpec, text: str) -> bool:
    try:
        if spec.kind is OutputKind.JSON_SCHEMA:
            jsonschema.validate(
                json.loads(text), json.loads(spec.text), format_checker=jsonschema.FormatChecker()
            )
            return True
        if spec.kind is OutputKind.REGEX:
            return re.fullmatch(spec.text, text) is not None
        return text in json.loads(spec.text)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False


def validity(lm: LoadedModel, max_new: int = 128) -> dict[str, Any]:
    compiler = GrammarCompiler.for_model(lm)
    newline = lm.tokenizer("\n", add_special_tokens=False)["input_ids"][:1]
    prompt = SoftPrompt(
        name="plain",
        kind=PromptKind.PROMPT_TUNING,
        content_hash="plain",
        source=Path("."),
        embeddings=lm.model.get_input_embeddings()(torch.tensor(newline)).detach(),
    )
    engine = Engine(lm, SchedulerConfig(32, 1 << 30, 10_000), 1 << 30)
    results: list[tuple[str, OutputSpec, FinishEvent]] = []
    for name, spec in constraints():
        try:
            compiled = compiler.compile(spec)
        except GrammarError:
            continue
        ids = chat_text(lm, f"Give one example of a {name.replace('_', ' ')}. Reply with the answer only.")
        for k, params in enumerate(
            [SamplingParams(max_new_tokens=max_new)]
            + [
                SamplingParams(max_new_tokens=max_new, do_sample=True, temperature=1.0, seed=s)
                for s in range(3)
            ]
        ):
            events: list[FinishEvent] = []
            req = Request(
                task="plain", prompt=prompt, input_ids=ids, params=params, seed=k, sink=events.append
            )
            req.matcher = compiled.matcher()
            engine.enqueue(req)
            results.append((name, spec, events))  # type: ignore[arg-type]
    began = time.perf_counter()
    engine.run_until_idle()
    seconds = time.perf_counter() - began
    ended = [(n, s, ev[-1]) for n, s, ev in results if ev and isinstance(ev[-1], FinishEvent)]
    complete = [(n, s, e) for n, s, e in ended if e.finish_reason is FinishReason.EOS]
    bad = [n for n, s, e in complete if not valid(s, e.generated_text)]
    truncated = sum(e.finish_reason is FinishReason.LENGTH for _, _, e in ended)
    tokens = sum(e.generated_tokens for _, _, e in ended)
    return {
        "answers": len(results),
        "ended_by_grammar": len(complete),
        "valid_of_ended": len(complete) - len(bad),
        "invalid": bad,
        "truncated": truncated,
        "failed": len(results) - len(ended),
        "tokens_per_s": tokens / seconds,
        "sample": {n: e.generated_text for n, _, e in complete[::8]},
    }


def workload_run(
    lm: LoadedModel,
    prompts: list[SoftPrompt],
    jobs: list[Job],
    compiler: GrammarCompiler,
    share: float,
    new_tokens: int = 32,
) -> dict[str, float]:
    engine = Engine(
        lm,
        SchedulerConfig(32, 1 << 30, len(jobs) + 1),
        1 << 30,
        max_context=longest(prompts, jobs, new_tokens),
    )
    engine.eos_ids = set()  # every request generates exactly new_tokens (the schema cannot end in 32 tokens)
    compiled = compiler.compile(OutputSpec.of(OutputKind.JSON_SCHEMA, PEOPLE))
    every = round(1 / share) if share > 0 else 0  # every 1st (100%) or 2nd (50%) row is constrained
    for i, job in enumerate(jobs):
        prompt = prompts[job.task]
        req = Request(
            task=prompt.name,
            prompt=prompt,
            input_ids=job.input_ids,
            params=SamplingParams(max_new_tokens=new_tokens),
            seed=0,
            sink=lambda e: None,
        )
        if every and i % every == 0:
            req.matcher = compiled.matcher()
        engine.enqueue(req)
    began = time.perf_counter()
    engine.run_until_idle()
    elapsed = time.perf_counter() - began
    fills = [f for f, _ in engine.mask_stats.recent]
    waits = [w for _, w in engine.mask_stats.recent]
    return {
        "tokens_per_s": len(jobs) * new_tokens / elapsed,
        "fill_ms_p50": pct(fills, 0.5) * 1000,
        "fill_ms_p99": pct(fills, 0.99) * 1000,
        "waited_ms_p50": pct(waits, 0.5) * 1000,
        "waited_ms_p99": pct(waits, 0.99) * 1000,
        "hidden_share": 1.0 - (sum(waits) / sum(fills)) if fills and sum(fills) > 0 else 1.0,
        "grammar_errors": engine.mask_stats.grammar_errors,
    }


def samples_run(
    lm: LoadedModel, prompts: list[SoftPrompt], jobs: list[Job], forked: bool, new_tokens: int = 32
) -> dict[str, float]:
    engine = Engine(
        lm,
        SchedulerConfig(32, 1 << 30, 10_000),
        1 << 30,
        max_context=longest(prompts, jobs, new_tokens),
    )
    engine.eos_ids = set()
    params = SamplingParams(max_new_tokens=new_tokens, do_sample=True, temperature=1.0)
    for j, job in enumerate(jobs):
        prompt = prompts[job.task]
        reqs = [
            Request(
                task=prompt.name,
                prompt=prompt,
                input_ids=job.input_ids,
                params=params,
                seed=sample_seed(j, i),
                sink=lambda e: None,
            )
            for i in range(4)
        ]
        if forked:
            reqs[0].forks = reqs[1:]
            engine.enqueue(reqs[0])
        else:
            for r in reqs:
                engine.enqueue(r)
    began = time.perf_counter()
    engine.run_until_idle()
    elapsed = time.perf_counter() - began
    return {
        "tokens_per_s": 4 * len(jobs) * new_tokens / elapsed,
        "rows_prefilled": engine.stats.rows_prefilled,
        "forked": engine.scheduler.forked,
        "blocks_allocated": engine.runner.pool.stats.allocated,
    }


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--skip", nargs="*", default=[], choices=["compile", "validity", "cost", "n"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model("default", dtype="float32")
    report: dict[str, Any] = {"cpu": cpu_model(), "threads": args.threads, "rounds": args.rounds}
    print(f"# structured outputs and n on {report['cpu']}, {args.threads} threads, float32, default model")
    if "compile" not in args.skip:
        report["compile"] = c = compile_times(lm)
        print(
            f"compile, {c['constraints']} constraints: cold p50 {c['cold_ms']['p50']:.2f} ms, p99 "
            f"{c['cold_ms']['p99']:.2f} ms, max {c['cold_ms']['max']:.2f} ms; cached p50 "
            f"{c['cached_ms']['p50'] * 1000:.1f} us; refused {sorted(c['refused'])}"
        )
    if "validity" not in args.skip:
        report["validity"] = v = validity(lm)
        print(
            f"validity: {v['answers']} answers, {v['ended_by_grammar']} ended by the grammar, "
            f"{v['valid_of_ended']} of them valid "
            f"({100 * v['valid_of_ended'] / max(1, v['ended_by_grammar']):.1f}%), {v['truncated']} cut by "
            f"max_new_tokens, {v['failed']} failed; invalid: {v['invalid']}"
        )
    prompts, jobs = make_prompts(lm, 8, 20, seed=0), make_jobs(64, 8, 16, 64, seed=1)
    if "cost" not in args.skip:
        compiler = GrammarCompiler.for_model(lm)
        shares = {"0%": 0.0, "50%": 0.5, "100%": 1.0}
        variants = {k: (lambda s=s: workload_run(lm, prompts, jobs, compiler, s)) for k, s in shares.items()}
        report["cost"] = cost = alternating_medians(variants, args.rounds)
        base = cost["0%"]["tokens_per_s"]
        print(
            "| rows under a JSON schema | tokens/s | vs none | mask fill p50 / p99 ms | waited after the "
            "pass p50 / p99 ms | hidden |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for k, r in cost.items():
            print(
                f"| {k} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.3f}x | {r['fill_ms_p50']:.2f} "
                f"/ {r['fill_ms_p99']:.2f} | {r['waited_ms_p50']:.3f} / {r['waited_ms_p99']:.3f} | "
                f"{100 * r['hidden_share']:.0f}% |"
            )
    if "n" not in args.skip:
        quarter = jobs[:16]
        variants = {
            "n=4": lambda: samples_run(lm, prompts, quarter, True),
            "4 requests": lambda: samples_run(lm, prompts, quarter, False),
        }
        report["n"] = n = alternating_medians(variants, args.rounds)
        ratio = n["n=4"]["tokens_per_s"] / n["4 requests"]["tokens_per_s"]
        print(
            f"n=4 over 16 prompts: {n['n=4']['tokens_per_s']:.1f} tok/s, {n['n=4']['rows_prefilled']:.0f} "
            f"rows prefilled, {n['n=4']['forked']:.0f} forked, {n['n=4']['blocks_allocated']:.0f} blocks "
            f"allocated; 64 separate requests: {n['4 requests']['tokens_per_s']:.1f} tok/s, "
            f"{n['4 requests']['rows_prefilled']:.0f} rows prefilled, "
            f"{n['4 requests']['blocks_allocated']:.0f} blocks; n=4 {ratio:.2f}x"
        )
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
