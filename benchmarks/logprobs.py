"""The cost of log-probabilities: benchmarks/compare.py's workload (64 requests, 8 tasks, 32 rows, 32 new
tokens, greedy) with `top_logprobs=5` on every row against none, in process, alternating round by round.

    python -m benchmarks.logprobs [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import cpu_model
from benchmarks.compare import Job, longest, make_jobs, make_prompts
from server.engine.engine import Engine
from server.engine.request import Request, SamplingParams
from server.engine.scheduler import SchedulerConfig
from server.models import LoadedModel, load_model
from server.prompts.types import SoftPrompt


def tokens_per_s(
    lm: LoadedModel, prompts: list[SoftPrompt], jobs: list[Job], params: SamplingParams
) -> float:
    engine = Engine(
        lm,
        SchedulerConfig(32, 1 << 30, len(jobs) + 1),
        1 << 30,
        max_context=longest(prompts, jobs, 32),
    )
    engine.eos_ids = set()  # every request generates exactly max_new_tokens
    started = time.perf_counter()
    for job in jobs:
        prompt = prompts[job.task]
        engine.enqueue(
            Request(
                task=prompt.name,
                prompt=prompt,
                input_ids=job.input_ids,
                params=params,
                seed=0,
                sink=lambda e: None,
            )
        )
    engine.run_until_idle()  # on this thread, which loaded the model (engine.py, the OpenMP note)
    return len(jobs) * params.max_new_tokens / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model("default", "cpu", "float32")
    prompts, jobs = make_prompts(lm, 8, 20, seed=0), make_jobs(64, 8, 16, 48, seed=1)
    variants = {
        "none": SamplingParams(max_new_tokens=32),
        "top5": SamplingParams(max_new_tokens=32, logprobs=True, top_logprobs=5),
    }
    tokens_per_s(lm, prompts, jobs[:8], SamplingParams(max_new_tokens=4))  # warm-up
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, params in variants.items():
            runs[name].append(tokens_per_s(lm, prompts, jobs, params))
    ratio = statistics.median(b / a for a, b in zip(runs["none"], runs["top5"]))
    print(f"CPU: {cpu_model()}, {args.threads} threads, float32, {args.rounds} rounds alternating")
    for name, values in runs.items():
        print(f"  {name:5} {statistics.median(values):7.1f} tok/s  ({', '.join(f'{v:.1f}' for v in values)})")
    print(f"  top_logprobs=5 on every row / none: {ratio:.3f} (median of the rounds' ratios)")


if __name__ == "__main__":
    main()
