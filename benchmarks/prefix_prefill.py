"""Time to first token of one request in three cache states, measured interleaved in one run:

  cold   the task's soft-prompt prefix is not resident: one prefix pass, then the prefill
  task   the task's prefix is resident (computed once per task): only the input is prefilled
  shared the task's prefix and a shared token prefix of the task (e.g. a 100-token instruction or
         chat header other requests of the task sent before) are resident: only the suffix is prefilled

Default model, P virtual tokens, a shared token prefix then a distinct suffix per request; the table
gives medians. Usage:

    python -m benchmarks.prefix_prefill [--threads 2] [--virtual 20] [--shared 100] [--suffix 12] \\
        [--repeats 15]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import add_model_arguments, cpu_model, load_for_bench
from server.engine.engine import Engine
from server.engine.request import Request, SamplingParams
from server.engine.scheduler import SchedulerConfig
from server.prompts.types import PromptKind, SoftPrompt


def ttft(engine: Engine, prompt: SoftPrompt, ids: list[int]) -> float:
    """Seconds from admission to the first token's logits (the prefix pass, if any, plus the prefill)."""
    req = Request(
        task=prompt.name,
        prompt=prompt,
        input_ids=ids,
        params=SamplingParams(max_new_tokens=1),
        seed=0,
        sink=lambda event: None,
    )
    engine.enqueue(req)
    started = time.perf_counter()
    engine.step()  # admit, fill the prefix if missing, prefill, sample: the request ends with its one token
    elapsed = time.perf_counter() - started
    assert engine.scheduler.idle and len(req.output_ids) == 1
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--virtual", type=int, default=20)
    ap.add_argument("--shared", type=int, default=100, help="tokens every request of the task starts with")
    ap.add_argument("--suffix", type=int, default=12, help="tokens that differ per request")
    ap.add_argument("--repeats", type=int, default=15)
    add_model_arguments(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_for_bench(args)
    g = torch.Generator().manual_seed(0)
    table = lm.model.get_input_embeddings().weight.detach()
    shared = torch.randint(100, 40_000, (args.shared,), generator=g).tolist()
    engine = Engine(lm, SchedulerConfig(8, 1 << 20, 100), 1 << 30)
    times: dict[str, list[float]] = {"cold": [], "task": [], "shared": []}
    for i in range(args.repeats + 1):
        prompt = SoftPrompt(
            name=f"task{i}",
            kind=PromptKind.PROMPT_TUNING,
            content_hash=str(i),
            source=Path("."),
            embeddings=table[torch.randint(100, 40_000, (args.virtual,), generator=g)].clone(),
        )

        def suffix() -> list[int]:
            return torch.randint(100, 40_000, (args.suffix,), generator=g).tolist()

        other = replace_key(prompt)
        ttft(engine, other, [5])  # makes the other task's prefix resident (no full token block)
        samples = {
            "cold": ttft(engine, prompt, shared + suffix()),  # a new task: prefix pass + full prefill
            "task": ttft(engine, other, shared + suffix()),  # its prefix resident, its tokens not
            "shared": ttft(engine, prompt, shared + suffix()),  # prefix and the shared tokens resident
        }
        if i > 0:  # the first round warms up the allocator and kernels
            for k, v in samples.items():
                times[k].append(v)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(
        f"# time to first token, {lm.name} ({lm.dtype}), {cpu_model() or platform.processor()}, "
        f"{args.threads} threads, P={args.virtual}, shared {args.shared} + suffix {args.suffix} tokens, "
        f"median of {args.repeats}"
    )
    print("| state | prefilled tokens | TTFT ms | speed-up vs cold |")
    print("|---|---|---|---|")
    tokens = {
        "cold": f"{args.virtual} (prefix) + {args.shared + args.suffix}",
        "task": str(args.shared + args.suffix),
        "shared": str(args.suffix + args.shared % engine.runner.pool.block_size),
    }
    for k in ("cold", "task", "shared"):
        print(f"| {k} | {tokens[k]} | {med[k]:.1f} | {med['cold'] / med[k]:.2f}x |")
    print(
        "shared-prefix hit vs task prefix only: "
        f"{med['task'] / med['shared']:.2f}x faster time to first token"
    )


def replace_key(prompt: SoftPrompt) -> SoftPrompt:
    """The same soft prompt under another task name: token blocks are keyed by task, so the original
    task's cached blocks are never used for it."""
    from dataclasses import replace

    return replace(prompt, name=prompt.name + "-b", content_hash=prompt.content_hash + "-b")


if __name__ == "__main__":
    main()
