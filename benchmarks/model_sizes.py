"""Real model sizes, served as a user serves them: random-weight folders of real architectures' shapes
(no download; the default tokenizer, so vocabularies are 49,152), each started with `softmux serve`
and measured from outside: time to ready, resident memory (steady, after requests, and peak) against
the weights' bytes and the key/value pool's committed bytes (from /info), one request's latency, and
16 concurrent requests' tokens/s. `--ab` also runs each with --no-one-copy (the transformers copy kept
beside the panels), alternating, to show what one copy saves. `--quantize none int8` runs each shape
and dtype both ways and says whether the single request's greedy answer is the same (random weights
give nearly flat logits, so disagreement here overstates it: benchmarks/quantization.py measures
agreement on real weights).

    python -m benchmarks.model_sizes [--shapes qwen2.5-0.5b] [--dtypes float32 bfloat16] [--ab]
        [--quantize none int8] [--json out.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from benchmarks.common import cpu_model, write_results
from server.bench import start_server
from server.config import Settings
from server.models import ensure_default_model

SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
    ),
    "llama-3.2-1b": dict(
        model_type="llama",
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        max_position_embeddings=131072,
        rope_theta=500_000.0,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "llama-3.1-8b": dict(
        model_type="llama",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        max_position_embeddings=131072,
        rope_theta=500_000.0,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
}
GIB = 1 << 30
SHARD_BYTES = 2 * GIB


def shape_folder(name: str, root: Path) -> Path:
    """The shape's folder with seeded random weights (made once, in float32)."""
    folder = root / name
    if (folder / "config.json").exists():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model(Settings().cache_dir))
    params = dict(SHAPES[name])
    config = AutoConfig.for_model(
        params.pop("model_type"),
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **params,
    )
    write_random_weights(config, folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_random_weights(config: Any, folder: Path) -> None:
    """Seeded random weights in the config's dtype, written shard by shard (an 8B model never sits
    whole in memory): the tensor names and shapes come from the model built on the meta device."""
    dtype = getattr(torch, str(getattr(config, "torch_dtype", None) or "float32").removeprefix("torch."))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = {n: p.shape for n, p in model.state_dict().items()}
    if config.tie_word_embeddings:
        names.pop("lm_head.weight", None)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    index: dict[str, str] = {}
    count = 0

    def flush() -> None:
        nonlocal shard, count
        if shard:
            count += 1
            save_file(shard, str(folder / f"model-{count:05d}.safetensors"), metadata={"format": "pt"})
            index.update((n, f"model-{count:05d}.safetensors") for n in shard)
            shard = {}

    for name, shape in names.items():
        t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02
        shard[name] = t.to(dtype)
        if sum(x.numel() * x.element_size() for x in shard.values()) >= SHARD_BYTES:
            flush()
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config.save_pretrained(folder)


def task_store(root: Path, hidden: int) -> Path:
    """A store with one prompt-tuning task of the model's width."""
    folder = root / f"store-{hidden}" / "probe"
    if not folder.exists():
        folder.mkdir(parents=True)
        config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 20}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        save_file(
            {"prompt_embeddings": torch.randn(20, hidden) * 0.02}, str(folder / "adapter_model.safetensors")
        )
    return folder.parent


def status_bytes(pid: int, key: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def serve_and_measure(
    folder: Path, store: Path, dtype: str, one_copy: bool, threads: int, quantize: str
) -> dict[str, Any]:
    extra = [
        "--model",
        str(folder),
        "--store",
        str(store),
        "--dtype",
        dtype,
        "--threads",
        str(threads),
        "--reload-interval",
        "0",
    ]
    extra += ["--quantize", quantize]
    if not one_copy:
        extra.append("--no-one-copy")
    began = time.perf_counter()
    proc, url = start_server(extra, ready_timeout=900)
    ready_s = time.perf_counter() - began
    try:
        info = httpx.get(url + "/info", timeout=30).json()["memory"]
        body = {
            "task": "probe",
            "inputs": "The quick brown fox jumps over the lazy dog.",
            "parameters": {"max_new_tokens": 32, "ignore_eos": True},
        }
        t = time.perf_counter()
        answer = (
            httpx.post(url + "/generate", json=body, timeout=600).raise_for_status().json()["generated_text"]
        )
        latency = time.perf_counter() - t
        # the same request for one token: the rest of the 32-token time is 31 decode steps alone
        one = {**body, "parameters": {**body["parameters"], "max_new_tokens": 1}}
        t = time.perf_counter()
        httpx.post(url + "/generate", json=one, timeout=600).raise_for_status()
        decode_step = (latency - (time.perf_counter() - t)) / 31
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            t = time.perf_counter()
            list(
                pool.map(
                    lambda _: httpx.post(url + "/generate", json=body, timeout=600).raise_for_status(),
                    range(16),
                )
            )
            tok_s = 16 * 32 / (time.perf_counter() - t)
        after = httpx.get(url + "/info", timeout=30).json()["memory"]
        return {
            "one_copy": one_copy,
            "quantize": quantize,
            "answer": answer,
            "ready_s": ready_s,
            "weights_gib": info["weights_bytes"] / GIB,
            "pool_committed_gib": after["kv_pool_bytes_committed"] / GIB,
            "rss_ready_gib": info["resident_bytes"] / GIB,
            "rss_after_gib": after["resident_bytes"] / GIB,
            "peak_rss_gib": status_bytes(proc.pid, "VmHWM") / GIB,
            "latency_32_tokens_s": latency,
            "decode_step_alone_s": decode_step,
            "tokens_per_s_16": tok_s,
        }
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def common_prefix(a: str, b: str) -> str:
    """'same' or how many leading characters two answers share."""
    if a == b:
        return "same"
    n = next(i for i, (x, y) in enumerate(zip(a + "\0", b + "\1")) if x != y)
    return f"first {n} of {len(a)} chars"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["qwen2.5-0.5b"], choices=list(SHAPES))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--ab", action="store_true", help="also --no-one-copy, alternating")
    ap.add_argument("--quantize", nargs="+", default=["none"], choices=["none", "int8"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "softmux-shapes")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    print(f"# model sizes on {cpu_model()}, {args.threads} threads, `softmux serve` defaults")
    print(
        "| shape | dtype | quantize | one copy | ready s | weights GiB | pool GiB | RSS ready / after / peak "
        "GiB | RSS / (weights + pool) | 32 tokens alone s | decode step alone s | 16 concurrent tok/s | "
        "answer as unquantized |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for shape in args.shapes:
        folder = shape_folder(shape, args.root)
        store = task_store(args.root, SHAPES[shape]["hidden_size"])
        for dtype in args.dtypes:
            plain: dict[bool, str] = {}  # one_copy -> the unquantized answer
            for quantize in args.quantize:
                for one_copy in (True, False) if args.ab else (True,):
                    r = {
                        "shape": shape,
                        "dtype": dtype,
                        **serve_and_measure(folder, store, dtype, one_copy, args.threads, quantize),
                    }
                    rows.append(r)
                    if quantize == "none":
                        plain[one_copy] = r["answer"]
                    same = (
                        "-"
                        if quantize == "none" or one_copy not in plain
                        else common_prefix(plain[one_copy], r["answer"])
                    )
                    ratio = r["rss_after_gib"] / (r["weights_gib"] + r["pool_committed_gib"])
                    print(
                        f"| {shape} | {dtype} | {quantize} | {'yes' if one_copy else 'no'} | "
                        f"{r['ready_s']:.1f} | {r['weights_gib']:.2f} | {r['pool_committed_gib']:.2f} | "
                        f"{r['rss_ready_gib']:.2f} / {r['rss_after_gib']:.2f} / {r['peak_rss_gib']:.2f} | "
                        f"{ratio:.2f}x | {r['latency_32_tokens_s']:.2f} | {r['decode_step_alone_s']:.3f} | "
                        f"{r['tokens_per_s_16']:.1f} | {same} |",
                        flush=True,
                    )
    write_results(args.json, args, {"cpu": cpu_model(), "threads": args.threads}, rows=rows)


if __name__ == "__main__":
    main()
