"""The panel kernel over int8 panels (--quantize int8) against the same weight's bfloat16 panels, alone.

One weight of Llama-3.1-8B's MLP shape (14336 x 4096, random), bfloat16 x, for batches of 1 to 128 rows:
milliseconds per product (median of 5 runs of 30 products, the two layouts alternating) and the weight
bytes streamed per second. One or two rows are what a single request's decode step multiplies: there
the product is bound by memory (int8 reads half the bytes); from ~16 rows on by arithmetic, where int8's
widening and its 3-row tiles cost time.

    python -m benchmarks.panel_int8 [--rows 1 2 4 8 16 32 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from benchmarks.common import cpu_model
from server.config import default_cache_dir
from server.engine import kernels


def per_call_ms(f: Callable[[], object], calls: int = 30) -> float:
    f()
    start = time.perf_counter()
    for _ in range(calls):
        f()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 128])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ops = kernels.load(default_cache_dir())
    if ops is None:
        raise SystemExit("the native kernels are not available here")
    n, k = 14336, 4096
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    plain = ops.pack_panels(w)
    q, scales = ops.pack_panels_int8(w)
    print(f"# panel kernel, {n} x {k} weight, bfloat16 x; CPU: {cpu_model()}, {args.threads} threads")
    print("| rows | bfloat16 ms | int8 ms | int8 speed-up | bfloat16 GB/s | int8 GB/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for rows in args.rows:
        x = torch.randn(rows, k).to(torch.bfloat16)
        times: dict[str, list[float]] = {"bf16": [], "int8": []}
        for _ in range(5):
            times["bf16"].append(per_call_ms(lambda x=x: ops.panel_linear(x, plain, n, None)))
            times["int8"].append(per_call_ms(lambda x=x: ops.panel_linear(x, q, n, None, scales)))
        b, i = (sorted(t)[2] for t in (times["bf16"], times["int8"]))
        print(
            f"| {rows} | {b:.2f} | {i:.2f} | {b / i:.2f}x | {n * k * 2 / b / 1e6:.1f} | "
            f"{n * k / i / 1e6:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
