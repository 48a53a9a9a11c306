"""The GPU path's first-run check (benchmarks/gpu_run.sh runs it first): answers against the solo
reference, what the graphs did, and the device memory besides the key/value pool.

Builds the engine as `softmux serve` does on a GPU (CUDA graphs recorded at start, one per bucket),
runs `--requests` greedy requests of `--tasks` tasks through it, at most `--concurrency` rows at a
time (rows join and leave, so the buckets change under them), and compares every answer with the
solo reference of docs/architecture.md ("Semantics"): the bare transformers model on
cat(soft prompt, embed(ids)), one request alone, no cache. Float32 by default: the reference is then
exact enough that any difference is a defect, not rounding. Memory (CUDA only): the weights, the
pool, and the rest at the run's peak (the graphs' memory pool, activations, library workspaces):
what `--kv-cache-bytes` must leave free. Runs on a CPU too (without the graphs and the memory lines).

    python -m benchmarks.gpu_check --model .devmodel --random-weights --device cuda [--requests 48]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.common import add_model_arguments, write_results
from benchmarks.compare import add_workload_arguments, bench_request, load_workload, longest, sync, where
from server.engine.engine import Engine
from server.engine.scheduler import SchedulerConfig
from server.models import LoadedModel
from server.prompts.types import SoftPrompt


@torch.inference_mode()
def solo_reference(lm: LoadedModel, prompt: SoftPrompt, input_ids: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens of the bare model alone on cat(prompt, embed(ids)), recomputed from scratch each step."""
    embed = lm.model.get_input_embeddings()
    ids = torch.tensor(input_ids, device=lm.device)
    x = torch.cat([prompt.embeddings.to(lm.device, lm.dtype), embed(ids)])[None]  # [1, P + L, H]
    out: list[int] = []
    for _ in range(new_tokens):
        token = int(lm.model(inputs_embeds=x).logits[0, -1].argmax())
        out.append(token)
        x = torch.cat([x, embed(torch.tensor([[token]], device=lm.device))], dim=1)
    return out


def memory_mib(lm: LoadedModel) -> tuple[float, float]:
    """(allocated now, peak since the last reset) in MiB; zeros off CUDA."""
    if lm.device.type != "cuda":
        return 0.0, 0.0
    return torch.cuda.memory_allocated(lm.device) / 2**20, torch.cuda.max_memory_allocated(lm.device) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    add_workload_arguments(ap, input_min=8, input_max=24)
    ap.set_defaults(dtype="float32", requests=48, concurrency=16, new_tokens=24)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    lm, prompts, jobs = load_workload(args)
    header = f"model {lm.name} on {lm.device} ({lm.dtype}), {where(lm)}"
    print(header, flush=True)
    sync(lm)
    weights, _ = memory_mib(lm)
    start = time.perf_counter()
    limits = SchedulerConfig(args.concurrency, 1 << 30, len(jobs) + 1)
    engine = Engine(lm, limits, 1 << 30, max_context=longest(prompts, jobs, args.new_tokens))
    engine.eos_ids = set()  # every answer has exactly new_tokens tokens, as the reference
    sync(lm)
    build_s = time.perf_counter() - start
    pool_mib = (engine.runner.k.numel() + engine.runner.v.numel()) * engine.runner.k.element_size() / 2**20
    if lm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(lm.device)
    requests = [bench_request(prompts[j.task], j.input_ids, args.new_tokens, lambda _: None) for j in jobs]
    for r in requests:
        engine.enqueue(r)
    with torch.inference_mode():
        engine.run_until_idle()
    sync(lm)
    now, peak = memory_mib(lm)
    same = sum(
        r.output_ids == solo_reference(lm, prompts[j.task], j.input_ids, args.new_tokens)
        for r, j in zip(requests, jobs)
    )
    stats = engine.static_decode_stats()
    print(f"engine built in {build_s:.1f} s; static decode: {stats}")
    print(f"answers identical to the solo reference: {same}/{len(jobs)} (must be all)")
    memory = {"weights_mib": weights, "pool_mib": pool_mib, "peak_mib": peak, "after_mib": now}
    if lm.device.type == "cuda":
        rest = peak - weights - pool_mib
        print(
            f"device memory: weights {weights:.0f} MiB, pool {pool_mib:.0f} MiB, "
            f"peak {peak:.0f} MiB: {rest:.0f} MiB besides the weights and the pool (graphs, activations)"
        )
        memory["besides_weights_and_pool_mib"] = rest
    write_results(
        args.json,
        args,
        header,
        identical=same,
        requests=len(jobs),
        static=stats,
        build_s=build_s,
        memory=memory,
    )
    if same != len(jobs):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
