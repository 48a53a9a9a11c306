"""Write demo tasks for the default model into prompts_store/: PEFT prompt tuning initialised from text.

Each soft prompt is the exact embedding of a ChatML prefix (a system instruction and a few worked
examples, all complete turns), so before any training it behaves like that text placed in front of
the input. The input should be one ChatML user turn and the assistant header:

    <|im_start|>user\\nI loved it<|im_end|>\\n<|im_start|>assistant\\n

Re-runnable: `python scripts/make_text_tasks.py [--store DIR] [--demo]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import PromptTuningConfig, PromptTuningInit, get_peft_model
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.make_datasets import CONTRACTS  # noqa: E402
from server.config import default_cache_dir  # noqa: E402
from server.models import DEFAULT_MODEL_ID, LoadedModel, ensure_default_model, load_model  # noqa: E402

# name -> (system instruction, worked examples, demo inputs)
TASKS: dict[str, tuple[str, list[tuple[str, str]], list[str]]] = {
    "sentiment": (
        "Is the review positive or negative? Answer with one word.",
        [("The movie was a waste of time.", "negative"), ("Great coffee and friendly staff!", "positive")],
        ["I absolutely loved this phone, the battery lasts forever!", "Terrible service, the food was cold."],
    ),
    "iso-date": (
        "Rewrite each date in ISO 8601 format, YYYY-MM-DD.",
        [("June 3, 2019", "2019-06-03"), ("12 December 1999", "1999-12-12")],
        ["March 5th, 2021", "October 31, 2023"],
    ),
    "extract-json": (
        "Extract the person's name and city as JSON.",
        [("My name is Anna Berg and I live in Oslo.", '{"name": "Anna Berg", "city": "Oslo"}')],
        ["Hi, I'm Maria Lopez and I live in Madrid.", "John Smith moved to Chicago last year."],
    ),
    "topic": (
        "You say which topic a text is about: sports, politics, tech or business.",
        [
            ("The team won the final.", "This text is about sports."),
            ("The new phone has a faster chip.", "This text is about tech."),
        ],
        ["The striker scored twice in the final minutes.", "The president met the prime minister."],
    ),
}


def user_turn(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def prefix_text(instruction: str, examples: list[tuple[str, str]]) -> str:
    shots = "".join(f"{user_turn(x)}{y}<|im_end|>\n" for x, y in examples)
    return f"<|im_start|>system\n{instruction}<|im_end|>\n{shots}"


def write_task(
    lm: LoadedModel, model_dir: Path, folder: Path, text: str, contract: dict[str, Any] | None = None
) -> int:
    """Save one prompt-tuning adapter initialised from `text` (and `contract` as its task.json); return its
    virtual token count."""
    n = len(lm.tokenizer(text)["input_ids"])  # the tokenizer adds no BOS: exactly the text's tokens
    cfg = PromptTuningConfig(
        task_type="CAUSAL_LM",
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=text,
        num_virtual_tokens=n,
        tokenizer_name_or_path=str(model_dir),
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        peft_model = get_peft_model(lm.model, cfg)
        peft_model.save_pretrained(tmp)
        # No local paths in the repo: name the public model the cache was converted from.
        cfg_path = tmp / "adapter_config.json"
        saved = json.loads(cfg_path.read_text())
        saved["base_model_name_or_path"] = DEFAULT_MODEL_ID
        saved["tokenizer_name_or_path"] = DEFAULT_MODEL_ID
        cfg_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's empty model card names the local path
        if contract is not None:
            (tmp / "task.json").write_text(json.dumps(contract, indent=2) + "\n")
        check(lm, tmp, text, n)
        tmp.chmod(0o755)  # mkdtemp and safetensors make private files; the store is shared
        for f in tmp.iterdir():
            f.chmod(0o644)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return n


def check(lm: LoadedModel, folder: Path, text: str, n: int) -> None:
    tensors = load_file(folder / "adapter_model.safetensors")
    assert list(tensors) == ["prompt_embeddings"], list(tensors)
    emb = tensors["prompt_embeddings"]
    assert tuple(emb.shape) == (n, lm.hidden_size), tuple(emb.shape)
    ids = torch.tensor(lm.tokenizer(text)["input_ids"])
    assert torch.equal(emb, lm.model.get_input_embeddings()(ids).float()), "not the text's embeddings"


@torch.no_grad()
def demo(lm: LoadedModel, folder: Path, inputs: list[str], max_new_tokens: int = 24) -> None:
    """Greedy answers with the soft prompt prepended to the input embeddings (PEFT's own generate is
    broken)."""
    soft = load_file(folder / "adapter_model.safetensors")["prompt_embeddings"].to(lm.dtype)  # [P, H]
    embed = lm.model.get_input_embeddings()
    for x in inputs:
        ids = torch.tensor(lm.tokenizer(user_turn(x))["input_ids"])
        out: list[int] = []
        for _ in range(max_new_tokens):
            h = torch.cat([soft, embed(torch.tensor(ids.tolist() + out))])[None]  # [1, P+L, H]
            nxt = int(lm.model(inputs_embeds=h).logits[0, -1].argmax())
            if nxt in lm.eos_token_ids:
                break
            out.append(nxt)
        print(f"  {x!r} -> {lm.tokenizer.decode(out)!r}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", type=Path, default=Path(__file__).resolve().parents[1] / "prompts_store")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--demo", action="store_true", help="print greedy answers for a few inputs per task")
    args = parser.parse_args()

    model_dir = ensure_default_model(args.cache_dir)
    lm = load_model(str(model_dir), device="cpu", dtype="float32")
    args.store.mkdir(parents=True, exist_ok=True)
    for name, (instruction, examples, inputs) in TASKS.items():
        n = write_task(
            lm, model_dir, args.store / name, prefix_text(instruction, examples), CONTRACTS.get(name)
        )
        print(f"{name}: {n} virtual tokens -> {args.store / name}")
        if args.demo:
            demo(lm, args.store / name, inputs)


if __name__ == "__main__":
    main()
