"""Model loading shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from server.config import Settings
from server.engine.kernels import cpuinfo
from server.models import LoadedModel, load_model, resolve_device, resolve_dtype


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
    return LoadedModel(model=model, tokenizer=tokenizer, device=device, dtype=dtype, name=f"{args.model} (random weights)")


def cpu_model() -> str:
    """lscpu's 'Model name' (a VM may hide the full name: family and model are added then)."""
    try:
        info = dict(
            line.split(":", 1)
            for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
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


def write_results(path: Path | None, args: argparse.Namespace, header: str, **sections: object) -> None:
    """A benchmark's results as JSON at `path` (when given): its header, its arguments, then `sections`."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"header": header, "args": {k: str(v) for k, v in vars(args).items()}, **sections}
    path.write_text(json.dumps(payload, indent=2))
