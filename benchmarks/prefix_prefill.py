"""Prefill time per request with the task's cached key/value prefix vs the soft prompt's embeddings.

Default model, P virtual tokens, inputs of several lengths; both variants are timed interleaved in
one run (the machine is noisy), and the table gives medians. Usage:

    python benchmarks/prefix_prefill.py [--threads 2] [--virtual 20] [--lengths 8 16 64] [--repeats 30] [--batch 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import add_model_arguments, load_for_bench
from server.engine.runner import PrefillRow, Runner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--virtual", type=int, default=20)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8, 16, 64])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1, help="requests prefilled together per pass")
    add_model_arguments(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_for_bench(args)
    runner = Runner(lm)
    g = torch.Generator().manual_seed(0)
    prompt = (torch.randn(args.virtual, lm.hidden_size, generator=g) * 0.02).to(lm.device, lm.dtype)  # [P, H]
    (prefix,) = runner.compute_prefixes([prompt])

    def timed(rows: list[PrefillRow]) -> float:
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        runner.prefill(rows, headroom=1)
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / len(rows)

    print(f"model {lm.name} on {lm.device} ({lm.dtype}), {args.threads} threads, P={args.virtual}, batch {args.batch}, "
          f"{args.repeats} repeats, medians per request")
    print("| input tokens | embeddings (ms) | KV prefix (ms) | speed-up |")
    print("|---:|---:|---:|---:|")
    for length in args.lengths:
        ids = torch.randint(100, 40_000, (args.batch, length), generator=g).tolist()
        embed_rows = [PrefillRow(input_ids=i, prompt=prompt) for i in ids]
        kv_rows = [PrefillRow(input_ids=i, prefix_kv=prefix) for i in ids]
        for _ in range(3):  # warm-up
            timed(embed_rows), timed(kv_rows)
        a, b = [], []
        for _ in range(args.repeats):
            a.append(timed(embed_rows))
            b.append(timed(kv_rows))
        ma, mb = statistics.median(a) * 1e3, statistics.median(b) * 1e3
        print(f"| {length} | {ma:.2f} | {mb:.2f} | {ma / mb:.2f}x |")


if __name__ == "__main__":
    main()
