"""The fixed-shape decode step and its CUDA graphs against the eager step, side by side in one run.

Variants, each one engine built once and run `--repeats` times, alternating:
  eager   --no-cuda-graphs: a decode step of the batch's own shapes, launched op by op
  static  fixed shapes (rows and key columns padded to buckets), run eagerly
  graphs  fixed shapes, recorded once per bucket at start and replayed (CUDA only; on a CPU the
          variant is left out: the native kernels take any shape there)
  compiled  fixed shapes, the step compiled by torch.compile (inductor) once per bucket, through the
          native kernels' ops; compiled in the warm-up run (one run of the whole workload: every bucket)
Prints tokens/s, the median decode step at the most common batch size, what recording cost at
start (seconds, graphs, GPU memory), and whether the variants' greedy answers agree: graphs and
static must be identical (a replay runs the recorded kernels on the same shapes).

    python -m benchmarks.decode_graphs [--model .devmodel --random-weights] [--device cuda] [--dtype bfloat16]
        [--requests 64] [--tasks 8] [--concurrency 32] [--new-tokens 32] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import add_model_arguments, write_results
from benchmarks.compare import (
    Job,
    PassTimer,
    add_workload_arguments,
    bench_request,
    load_workload,
    longest,
    sync,
    where,
)
from server.engine.engine import Engine
from server.engine.runner import Acceleration
from server.engine.scheduler import SchedulerConfig
from server.models import LoadedModel
from server.prompts.types import SoftPrompt

VARIANTS = {
    "eager": Acceleration(cuda_graphs=False),
    "static": Acceleration(cuda_graphs=False, static_decode=True),
    "graphs": Acceleration(cuda_graphs=True),
    "compiled": Acceleration(cuda_graphs=False, static_decode=True),
}


def build(
    lm: LoadedModel, accel: Acceleration, concurrency: int, requests: int, max_context: int, compiled: bool
) -> tuple[Engine, PassTimer, dict[str, float]]:
    """An engine and what building it cost (graph recording happens here)."""
    timer = PassTimer()
    sync(lm)
    before = torch.cuda.memory_allocated(lm.device) if lm.device.type == "cuda" else 0
    start = time.perf_counter()
    engine = Engine(
        lm,
        SchedulerConfig(concurrency, 1 << 30, requests + 1),
        1 << 30,
        observer=timer,
        max_context=max_context,
        accel=accel,
    )
    sync(lm)
    seconds = time.perf_counter() - start
    after = torch.cuda.memory_allocated(lm.device) if lm.device.type == "cuda" else 0
    engine.eos_ids = set()  # every request generates exactly new_tokens: equal work in every variant
    static = engine.runner.static
    if compiled:
        assert static is not None
        static.step = torch.compile(engine.runner._static_step, fullgraph=True, dynamic=False)
    cost = {
        "build_s": seconds,
        "graphs": float(0 if static is None else static.recorded),
        "device_mib": (after - before) / 2**20,
    }
    return engine, timer, cost


def run(
    engine: Engine, prompts: list[SoftPrompt], jobs: list[Job], new_tokens: int
) -> tuple[float, list[list[int]]]:
    """All jobs queued at once; returns (tokens/s, each request's generated ids)."""
    requests = [bench_request(prompts[j.task], j.input_ids, new_tokens, lambda event: None) for j in jobs]
    start = time.perf_counter()
    for r in requests:
        engine.enqueue(r)
    engine.run_until_idle()
    sync(engine.lm)
    elapsed = time.perf_counter() - start
    assert all(len(r.output_ids) == new_tokens for r in requests)
    return len(jobs) * new_tokens / elapsed, [r.output_ids for r in requests]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    add_workload_arguments(ap, input_min=8, input_max=24)  # issue 10's workload, as benchmarks/vs_vllm.py
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="a subset (eager always runs)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    lm, prompts, jobs = load_workload(args)
    header = f"model {lm.name} on {lm.device} ({lm.dtype}), {torch.get_num_threads()} threads, {where(lm)}"
    print(header)
    print(
        f"{args.requests} requests over {args.tasks} tasks, concurrency {args.concurrency}, "
        f"P={args.virtual}, inputs {args.input_min}-{args.input_max} tokens, {args.new_tokens} new tokens, "
        f"medians of {args.repeats} alternating runs",
        flush=True,
    )
    names = [n for n in VARIANTS if n != "graphs" or lm.device.type == "cuda"]
    if args.variants:
        names = [n for n in names if n == "eager" or n in args.variants]
    context = longest(prompts, jobs, args.new_tokens)
    built = {
        n: build(lm, VARIANTS[n], args.concurrency, args.requests, context, n == "compiled") for n in names
    }
    for engine, _, cost in built.values():  # warm-up: allocator, kernels, the prefix cache's entries
        start = time.perf_counter()
        run(engine, prompts, jobs, args.new_tokens)  # every bucket the runs will meet (compiled: compiles)
        cost["warm_s"] = time.perf_counter() - start
    speeds: dict[str, list[float]] = {n: [] for n in names}
    answers: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for n in names:
            tps, answers[n] = run(built[n][0], prompts, jobs, args.new_tokens)
            speeds[n].append(tps)
    print()
    print("| variant | tokens/s | vs eager | decode step (rows) | build s | warm-up s | graphs | graph MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    results: dict[str, dict[str, float]] = {}
    base = statistics.median(speeds["eager"])
    for n in names:
        engine, timer, cost = built[n]
        rows = max(timer.decode, key=lambda r: len(timer.decode[r]))
        step = statistics.median(timer.decode[rows])
        tps = statistics.median(speeds[n])
        results[n] = {"tokens_per_s": tps, "step_s": step, "step_rows": float(rows), **cost}
        print(
            f"| {n} | {tps:.1f} | {tps / base:.2f}x | {step * 1e3:.2f} ms ({rows}) | {cost['build_s']:.1f} | "
            f"{cost['warm_s']:.1f} | "
            f"{cost['graphs']:.0f} | {cost['device_mib']:.0f} |"
        )
        stats = engine.static_decode_stats()
        if stats is not None:
            print(f"  {n}: {stats}")
    print()
    agree = {}
    for n in names[1:]:
        same = sum(a == b for a, b in zip(answers[n], answers["eager"]))
        agree[n] = same
        print(f"{n} vs eager: {same}/{len(jobs)} answers identical")
    if "graphs" in answers:
        same = sum(a == b for a, b in zip(answers["graphs"], answers["static"]))
        agree["graphs_vs_static"] = same
        print(f"graphs vs static: {same}/{len(jobs)} answers identical (must be all)")
    write_results(args.json, args, header, results=results, identical_answers=agree)


if __name__ == "__main__":
    main()
