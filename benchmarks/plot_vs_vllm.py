"""The README's comparison plot: softmux and vLLM's CPU build, generated tokens/s at 32 rows, per model
and dtype, from the JSON files benchmarks/vs_vllm.py wrote (each run measured both sides, alternating).

    python -m benchmarks.plot_vs_vllm LABEL=FILE.json[:DTYPE] [...] --out benchmarks/results/vs_vllm_cpu.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def throughputs(path: Path) -> dict[str, tuple[float, float]]:
    """dtype -> (softmux, vLLM) tokens/s at 32 rows, for the dtypes the run measured with its peer."""
    found = {}
    for row in json.loads(path.read_text())["results"]:
        if row["mode"] == "engine, 32 rows" and row.get("vllm"):
            found[row["dtype"]] = (float(row["softmux"]), float(row["vllm"]))
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LABEL=FILE.json[:DTYPE]: a run's dtypes, or only DTYPE")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    bars: dict[str, tuple[float, float]] = {}
    cpu = ""
    for run in args.runs:
        label, _, spec = run.partition("=")
        file, _, only = spec.partition(":")
        cpu = cpu or json.loads(Path(file).read_text())["header"]["cpu"]
        for dtype, pair in throughputs(Path(file)).items():
            if only in ("", dtype):
                bars[f"{label}\n{dtype}"] = pair
    names = list(bars)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 1.5, 3.6))
    x = range(len(names))
    ours = [bars[n][0] for n in names]
    theirs = [bars[n][1] for n in names]
    ax.bar([i - 0.2 for i in x], ours, width=0.4, label="softmux", color="#2b6cb0")
    ax.bar([i + 0.2 for i in x], theirs, width=0.4, label="vLLM 0.32 CPU (prompt_embeds)", color="#a0aec0")
    for i, (a, b) in enumerate(zip(ours, theirs)):
        ax.annotate(f"{a / b:.2f}x", (i - 0.2, a), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), names, fontsize=8)
    ax.set_ylabel("generated tokens/s, 32 rows")
    ax.set_title(f"64 requests over 8 tasks, 32 new tokens each; {cpu}, 2 threads", fontsize=8)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(args.out, dpi=130)
    print(args.out)


if __name__ == "__main__":
    main()
