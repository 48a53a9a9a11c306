"""The decoder's layer loop in C++ (`--native-layers`, csrc/layers.cpp) against the Python loop over the
same native kernels: whole decode steps of one engine, the two loops alternating step by step
(A B B A ...), at each row count and dtype asked for. Prints the median step of each and their ratio.

The two loops give the same results bit for bit (tests/test_decoder.py), so the rows' state stays the
same whichever loop ran a step; alternating in one engine keeps this machine's drifting speed out of
the ratio.

    python -m benchmarks.layer_loop [--rows 1 32] [--dtypes float32 bfloat16] [--steps 60] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import cpu_model
from benchmarks.compare import bench_request, make_jobs, make_prompts
from server.config import Settings
from server.engine.engine import Engine
from server.engine.scheduler import SchedulerConfig
from server.models import load_model


def step_times(dtype: str, rows: int, steps: int, input_len: int) -> dict[str, float]:
    """Median seconds of a decode step at `rows` rows with the C++ loop ("native") and the Python one."""
    lm = load_model("default", device="cpu", dtype=dtype, cache_dir=Settings().cache_dir)
    prompts = make_prompts(lm, 8, 20, seed=0)
    jobs = make_jobs(rows, 8, input_len // 2, input_len + input_len // 2, seed=1)
    engine = Engine(lm, SchedulerConfig(rows, 1 << 30, rows + 1), 1 << 30)
    engine.eos_ids = set()  # every row keeps decoding
    decoder = engine.runner.decoder
    native = decoder.stack
    if native is None:
        raise SystemExit(
            "the native layer loop does not apply here (no C++ compiler, or the model's ops have no kernel)"
        )
    for job in jobs:
        engine.enqueue(bench_request(prompts[job.task], job.input_ids, steps + 8, lambda event: None))
    for _ in range(4):  # the prefill pass, then warm-up steps
        engine.step()
    times: dict[str, list[float]] = {"native": [], "python": []}
    for i in range(steps):
        name = ("native", "python")[(i + i // 2) % 2]  # native, python, python, native, ...
        decoder.stack = native if name == "native" else None
        start = time.perf_counter()
        engine.step()
        times[name].append(time.perf_counter() - start)
    decoder.stack = native
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=60, help="timed decode steps per case, half with each loop")
    ap.add_argument("--input-len", type=int, default=16, help="mean input tokens per row")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"{cpu_model()}, {torch.get_num_threads()} threads; decode steps alternating in one engine, medians"
    )
    print("| dtype | rows | C++ layer loop (ms) | Python layer loop (ms) | C++ / Python |")
    print("|---|---:|---:|---:|---:|")
    for dtype in args.dtypes:
        for rows in args.rows:
            t = step_times(dtype, rows, args.steps, args.input_len)
            print(
                f"| {dtype} | {rows} | {t['native'] * 1e3:.2f} | {t['python'] * 1e3:.2f} | "
                f"{t['native'] / t['python']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
