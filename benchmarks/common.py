"""Model loading shared by the benchmark scripts."""

from __future__ import annotations

import argparse

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
    """The CPU's model name (lscpu's 'Model name'), to print beside every figure."""
    return cpuinfo("model name")
