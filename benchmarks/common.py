"""Shared by the benchmark scripts: model loading, the CPU's name, results files,
the softmux-vs-peer table."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from server.config import Settings
from server.engine.kernels import cpuinfo
from server.models import LoadedModel, load_model, resolve_device, resolve_dtype

ROOT = Path(__file__).resolve().parent.parent  # the repository


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="default", help="'default', a model folder or hub id")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument(
        "--random-weights",
        action="store_true",
        help="build the model from the folder's config with random weights (timings do not depend on "
        "weight values when every request generates a fixed number of tokens)",
    )


def load_for_bench(args: argparse.Namespace) -> LoadedModel:
    if not args.random_weights:
        return load_model(args.model, device=args.device, dtype=args.dtype, cache_dir=Settings().cache_dir)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    config = AutoConfig.from_pretrained(args.model)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    return LoadedModel(
        model=model, tokenizer=tokenizer, device=device, dtype=dtype, name=f"{args.model} (random weights)"
    )


def linear_weights(lm: LoadedModel) -> list[torch.Tensor]:
    """Every weight matrix of the model's Linear modules (the output head included), in module order."""
    return [m.weight for m in lm.model.modules() if isinstance(m, torch.nn.Linear)]


def cpu_model() -> str:
    """lscpu's 'Model name' (a VM may hide the full name: family and model are added then)."""
    try:
        info = dict(
            line.split(":", 1)
            for line in subprocess.run(
                ["lscpu"], capture_output=True, text=True, check=True
            ).stdout.splitlines()
            if ":" in line
        )
        info = {k.strip(): v.strip() for k, v in info.items()}
        name = info["Model name"]
        if len(name.split()) <= 2:
            name += (
                f" (CPU family {info.get('CPU family', '?')}, model {info.get('Model', '?')}"
                + (f", {info['Hypervisor vendor']} guest" if "Hypervisor vendor" in info else "")
                + ")"
            )
        return name
    except Exception:
        return cpuinfo("model name") or platform.processor() or platform.machine()


def write_results(path: Path | None, args: argparse.Namespace, header: object, **sections: object) -> None:
    """A benchmark's results as JSON at `path` (when given): its header, its arguments, then `sections`."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"header": header, "args": {k: str(v) for k, v in vars(args).items()}, **sections}
    path.write_text(json.dumps(payload, indent=2))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_ratio_table(rows: list[dict], targets: dict[tuple[str, str], float] | None = None) -> None:
    """The softmux-vs-vLLM table (Markdown). A row: dtype, mode, unit ("tok/s": higher is better, "s": lower),
    softmux and vllm (None when vLLM was not measured). Sets each row's `ratio` (softmux's speed / vLLM's)."""
    print(
        "| dtype | mode | softmux | vLLM | softmux speed / vLLM |"
        + (" issue 10 target |" if targets is not None else "")
    )
    print("|---|---|---:|---:|---:|" + ("---:|" if targets is not None else ""))
    for row in rows:
        s, v = row["softmux"], row["vllm"]
        ratio = None if v is None else (s / v if row["unit"] == "tok/s" else v / s)
        row["ratio"] = ratio
        fmt = (lambda x: f"{x:.1f} tok/s") if row["unit"] == "tok/s" else (lambda x: f"{x:.2f} s")
        line = (
            f"| {row['dtype']} | {row['mode']} | {fmt(s)} | {fmt(v) if v is not None else 'n/a'} | "
            f"{f'{ratio:.2f}x' if ratio is not None else 'n/a'} |"
        )
        if targets is not None:
            tgt = targets.get((row["dtype"], row["mode"]))
            line += f" {f'>= {tgt}x' if tgt else ''} |"
        print(line)
