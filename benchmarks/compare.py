"""Mixed-task batching against the alternatives a user would pick, measured side by side in one run.

(a) one request at a time through the engine; (b) per-task batching: requests grouped by task and
run with transformers `generate()` on `inputs_embeds = cat(soft_prompt, embed(ids))`, one task
batch after another (what a PEFT user does: PEFT cannot mix prompts in a batch); (c) softmux mixed
batching through the engine; (d) the bare model's forward at the same batch shapes (the floor for
a decode step). Plus the mixing cost: the same load on 1 task vs spread over K tasks, and the
arithmetic bound: the workload's unavoidable matrix multiplies at the best GEMM rate measured in the
run, the most tokens/s any implementation could reach on the machine.

    python -m benchmarks.compare [--device cpu|cuda] [--threads 2] [--requests 64] [--tasks 8]
        [--concurrency 32] [--new-tokens 32] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from benchmarks.common import add_model_arguments, cpu_model, linear_weights, load_for_bench
from server.engine.engine import Engine
from server.engine.request import FinishEvent, Request, SamplingParams
from server.engine.scheduler import Policy, SchedulerConfig
from server.models import LoadedModel
from server.prompts.types import PromptKind, SoftPrompt


@dataclass(frozen=True)
class Job:
    task: int
    input_ids: list[int]


def make_prompts(lm: LoadedModel, k: int, p: int, seed: int) -> list[SoftPrompt]:
    """Soft prompts initialised from sampled vocabulary rows (PEFT's SAMPLE_VOCAB): realistic scale."""
    g = torch.Generator().manual_seed(seed)
    table = lm.model.get_input_embeddings().weight.detach()
    return [
        SoftPrompt(
            name=f"task{i}",
            kind=PromptKind.PROMPT_TUNING,
            content_hash=f"bench{i}",
            source=Path("."),
            embeddings=table[torch.randint(100, 40_000, (p,), generator=g).to(table.device)].clone(),
        )
        for i in range(k)
    ]


def make_jobs(n: int, k: int, lo: int, hi: int, seed: int) -> list[Job]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [
        Job(task=i % k, input_ids=torch.randint(100, 40_000, (n_,), generator=g).tolist())
        for i, n_ in enumerate(lengths)
    ]


def sync(lm: LoadedModel) -> None:
    if lm.device.type == "cuda":
        torch.cuda.synchronize()


class PassTimer:
    """Engine observer: decode step times by batch size."""

    def __init__(self) -> None:
        self.decode: dict[int, list[float]] = {}

    def on_pass(self, phase: str, rows: int, tasks: int, seconds: float) -> None:
        if phase == "decode":
            self.decode.setdefault(rows, []).append(seconds)


def bench_request(
    prompt: SoftPrompt, input_ids: list[int], new_tokens: int, sink: Callable[[Any], None]
) -> Request:
    """A greedy request of exactly `new_tokens` (the benchmark engines ignore eos: equal work everywhere)."""
    return Request(
        task=prompt.name,
        prompt=prompt,
        input_ids=input_ids,
        params=SamplingParams(max_new_tokens=new_tokens),
        seed=0,
        sink=sink,
    )


def longest(prompts: list[SoftPrompt], jobs: list[Job], new_tokens: int) -> int:
    """The longest sequence of the workload (prefix + input + output): the engine's max_context, which
    bounds the decode step's width buckets (CUDA graphs recorded at start)."""
    return max(p.num_virtual_tokens for p in prompts) + max(len(j.input_ids) for j in jobs) + new_tokens


def run_engine(
    lm: LoadedModel,
    prompts: list[SoftPrompt],
    jobs: list[Job],
    new_tokens: int,
    concurrency: int,
    timer: PassTimer | None = None,
    policy: Policy = Policy.FAIR,
) -> dict[str, float]:
    """Keep `concurrency` requests in flight; returns tokens/s and the engine's batching figures."""
    engine = Engine(
        lm,
        SchedulerConfig(concurrency, 1 << 30, len(jobs) + 1, policy=policy),
        1 << 30,
        observer=timer,
        max_context=longest(prompts, jobs, new_tokens),
    )
    engine.eos_ids = set()  # every request generates exactly new_tokens: equal work in every variant
    finished = [0]

    def sink(event) -> None:
        if isinstance(event, FinishEvent) or not hasattr(event, "token_id"):
            finished[0] += 1

    # All requests queue at once; the scheduler keeps `concurrency` rows running and admits the next
    # as rows leave. The loop runs on this thread, which loaded the model (server/engine/engine.py,
    # the OpenMP note).
    start = time.perf_counter()
    for job in jobs:
        engine.enqueue(bench_request(prompts[job.task], job.input_ids, new_tokens, sink))
    engine.run_until_idle()
    assert finished[0] == len(jobs)
    sync(lm)
    elapsed = time.perf_counter() - start
    s = engine.stats
    passes = s.prefill_passes + s.decode_passes
    return {
        "seconds": elapsed,
        "tokens_per_s": len(jobs) * new_tokens / elapsed,
        "rows_per_pass": (s.rows_prefilled + s.rows_decoded) / passes,
        "tasks_per_pass": s.tasks_summed / passes,
    }


@torch.inference_mode()
def run_per_task_generate(
    lm: LoadedModel, prompts: list[SoftPrompt], jobs: list[Job], new_tokens: int, batch: int
) -> dict[str, float]:
    """PEFT-style serving: one task per batch, transformers generate() on prompt+input embeddings."""
    embed = lm.model.get_input_embeddings()
    by_task: dict[int, list[Job]] = {}
    for job in jobs:
        by_task.setdefault(job.task, []).append(job)
    start = time.perf_counter()
    for task, group in by_task.items():
        for i in range(0, len(group), batch):
            chunk = group[i : i + batch]
            prompt = prompts[task].embeddings
            seqs = [torch.cat([prompt, embed(torch.tensor(j.input_ids, device=lm.device))]) for j in chunk]
            t = max(len(s) for s in seqs)
            x = torch.zeros(
                len(seqs), t, prompt.shape[1], dtype=lm.dtype, device=lm.device
            )  # [B, T, H], left-padded
            mask = torch.zeros(len(seqs), t, dtype=torch.int64, device=lm.device)
            for r, s in enumerate(seqs):
                x[r, t - len(s) :] = s
                mask[r, t - len(s) :] = 1
            out = lm.model.generate(
                inputs_embeds=x,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            assert out.shape[1] == new_tokens
    sync(lm)
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "tokens_per_s": len(jobs) * new_tokens / elapsed}


@torch.inference_mode()
def bare_decode_step(lm: LoadedModel, rows: int, context: int, steps: int = 8) -> float:
    """Median seconds of one bare forward of `rows` single tokens over a `context`-long cache."""
    ids = torch.randint(100, 40_000, (rows, context), device=lm.device)
    cache = DynamicCache()
    lm.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    times = []
    token = ids[:, -1:]
    for _ in range(steps):
        sync(lm)
        t = time.perf_counter()
        logits = lm.model(input_ids=token, cache=cache, use_cache=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        sync(lm)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def workload_gflop(lm: LoadedModel, prompts: list[SoftPrompt], jobs: list[Job], new_tokens: int) -> float:
    """The matrix multiplies the workload cannot avoid, in GFLOP: every prefill token (inputs, and each
    task's soft prompt once) and every decode token through the layers' linears, and the output head
    for each generated token. Attention and everything else are left out (the bound is generous)."""
    head = lm.model.get_output_embeddings().weight.numel()
    body = sum(w.numel() for w in linear_weights(lm)) - head
    prefill = sum(len(j.input_ids) for j in jobs) + sum(
        prompts[t].num_virtual_tokens for t in {j.task for j in jobs}
    )
    decode = len(jobs) * (new_tokens - 1)
    return 2 * (body * (prefill + decode) + head * len(jobs) * new_tokens) / 1e9


@torch.inference_mode()
def best_gemm_rate(lm: LoadedModel, rows: int = 512, repeats: int = 3) -> float:
    """GFLOP/s of F.linear over the model's own weights at a prefill-sized `rows`, the best of `repeats`
    (generous to the bound); on a CPU also in float32 (the native kernels widen 16-bit weights to
    float32 arithmetic, faster than torch's 16-bit GEMM on AVX2), the faster of the two dtypes."""
    dtypes = {lm.dtype} if lm.device.type == "cuda" else {lm.dtype, torch.float32}
    best = 0.0
    for dtype in dtypes:
        weights = [w.to(dtype) for w in linear_weights(lm)]
        xs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=dtype, device=lm.device) for w in weights}
        flops = sum(2 * rows * w.numel() for w in weights)
        for i in range(repeats + 1):  # the first round warms up
            sync(lm)
            t = time.perf_counter()
            for w in weights:
                F.linear(xs[w.shape[1]], w)
            sync(lm)
            if i:
                best = max(best, flops / (time.perf_counter() - t) / 1e9)
    return best


def alternating_medians(
    variants: dict[str, Callable[[], dict[str, float]]], repeats: int
) -> dict[str, dict[str, float]]:
    """Each variant once per round, `repeats` rounds, then per-figure medians: a slow spell of the machine
    falls on every variant alike (run back to back, 5 mixed runs then 5 one-task runs once gave a mixing
    cost of 0.893; alternating, in the run that followed, 0.984)."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            runs[name].append(fn())
    return {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}


def add_workload_arguments(ap: argparse.ArgumentParser, input_min: int, input_max: int) -> None:
    """The mixed-task workload's arguments (threads, requests over tasks, concurrency, lengths)."""
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--virtual", type=int, default=20)
    ap.add_argument("--input-min", type=int, default=input_min)
    ap.add_argument("--input-max", type=int, default=input_max)


def load_workload(args: argparse.Namespace) -> tuple[LoadedModel, list[SoftPrompt], list[Job]]:
    """The model, the tasks' soft prompts and the jobs that the workload arguments describe."""
    torch.set_num_threads(args.threads)
    lm = load_for_bench(args)
    prompts = make_prompts(lm, args.tasks, args.virtual, seed=0)
    return lm, prompts, make_jobs(args.requests, args.tasks, args.input_min, args.input_max, seed=1)


def where(lm: LoadedModel) -> str:
    """The GPU's or the CPU's name, for the header of every result."""
    return torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else cpu_model()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    add_workload_arguments(ap, input_min=16, input_max=48)
    ap.add_argument(
        "--single-requests", type=int, default=16, help="requests timed one at a time (a subset: it is slow)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    lm, prompts, jobs = load_workload(args)
    one_task = [Job(task=0, input_ids=j.input_ids) for j in jobs]
    n, c = args.new_tokens, args.concurrency
    print(f"model {lm.name} on {lm.device} ({lm.dtype}), {torch.get_num_threads()} threads, {where(lm)}")
    print(
        f"{args.requests} requests over {args.tasks} tasks, concurrency {c}, P={args.virtual}, inputs "
        f"{args.input_min}-{args.input_max} tokens, {n} new tokens, medians of {args.repeats} runs, "
        "variants alternating",
        flush=True,
    )

    run_engine(lm, prompts, jobs[: c // 2], 4, c)  # warm-up (allocator, kernels)
    timer = PassTimer()
    variants: dict[str, Callable[[], dict[str, float]]] = {
        "mixed": lambda: run_engine(lm, prompts, jobs, n, c, timer),
        "one_task": lambda: run_engine(lm, prompts, one_task, n, c),
        "per_task_generate": lambda: run_per_task_generate(lm, prompts, jobs, n, c),
        "one_at_a_time": lambda: run_engine(lm, prompts, jobs[: args.single_requests], n, 1),
    }
    results = alternating_medians(variants, args.repeats)
    full = max(timer.decode, key=lambda rows: len(timer.decode[rows]))  # the most common batch size
    engine_step = statistics.median(timer.decode[full])
    context = args.virtual + (args.input_min + args.input_max) // 2 + n // 2
    bare_step = bare_decode_step(lm, full, context)
    mixed = results["mixed"]["tokens_per_s"]
    print()
    print("| variant | generated tokens/s | mixed is |")
    print("|---|---:|---:|")
    for name, label in [
        ("mixed", "softmux mixed batching"),
        ("one_task", "softmux, all requests on 1 task"),
        ("per_task_generate", "per-task batches, transformers generate()"),
        ("one_at_a_time", "one request at a time (engine)"),
    ]:
        tps = results[name]["tokens_per_s"]
        print(f"| {label} | {tps:.1f} | {mixed / tps:.2f}x |")
    print()
    print(
        f"mixing cost: {args.tasks} tasks / 1 task throughput = "
        f"{mixed / results['one_task']['tokens_per_s']:.3f}"
    )
    print(
        f"mixed run: {results['mixed']['rows_per_pass']:.1f} rows and "
        f"{results['mixed']['tasks_per_pass']:.2f} tasks per forward pass"
    )
    print(
        f"decode step at batch {full}: engine {engine_step * 1e3:.1f} ms, bare model forward "
        f"{bare_step * 1e3:.1f} ms (engine / bare = {engine_step / bare_step:.3f}; context ~{context})"
    )
    # What the machine allows any implementation: the workload's multiplies at the best GEMM rate.
    gflop, rate = workload_gflop(lm, prompts, jobs, n), best_gemm_rate(lm)
    bound = len(jobs) * n / (gflop / rate)
    one = results["one_at_a_time"]["tokens_per_s"]
    print(
        f"arithmetic bound: the workload's matrix multiplies alone are {gflop:.0f} GFLOP, {gflop / rate:.2f} "
        f"s at the best F.linear rate measured here ({rate:.0f} GFLOP/s, 512 rows): no implementation "
        f"exceeds {bound:.0f} tokens/s on this machine, {bound / one:.2f}x one at a time; mixed batching "
        f"reaches {mixed / bound:.0%} of it"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "results": results,
                    "decode_step": {"rows": full, "engine_s": engine_step, "bare_s": bare_step},
                    "bound": {
                        "gflop": gflop,
                        "gemm_gflop_per_s": rate,
                        "tokens_per_s": bound,
                        "over_one_at_a_time": bound / one,
                    },
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
