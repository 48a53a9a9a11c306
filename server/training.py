"""`softmux train`: prompt tuning (PEFT) on the frozen model the server uses, written into the store.

The data is JSON lines `{"input": ..., "output": ...}`. Each input is wrapped in the input template
(default: one ChatML user turn plus the assistant header, `CHATML_TEMPLATE` in train_config.py) and the
target is the output followed by the tokenizer's end-of-sequence token (`<|im_end|>` for
SmolLM2-Instruct). Clients must send `/generate` the same template around their text; the card written
next to the adapter says which. A task may also get a contract on its answers (`output`, `defaults`):
written as task.json beside the adapter, the server then holds every request to it.

Training runs the base model on `cat(soft_prompt, embed(input + output))` with right padding, so
virtual tokens take positions 0..P-1 and input tokens P.. exactly as the engine serves them; the
loss is cross-entropy on the output tokens only. Evaluation is greedy decoding through the
serving engine itself, batched (train_eval.py), so a held-out score is what the server would answer;
the data and its split are train_data.py's.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from server.model_card import render_card
from server.models import DEFAULT_MODEL, DEFAULT_MODEL_ID, LoadedModel
from server.prompts.install import check_folder, install, temp_folder
from server.prompts.settings import SETTINGS_FILE, parse_settings
from server.prompts.store import read_adapter, validate_task_name
from server.prompts.types import PromptGeometry
from server.structured import MAX_CHOICES
from server.train_config import INITS, TrainConfig
from server.train_data import encode, read_jsonl, split_data
from server.train_eval import default_max_new_tokens, evaluate


@dataclass
class TrainResult:
    folder: Path
    before: float  # held-out exact match of the initial prompt
    after: float  # ... of the trained prompt
    losses: list[float]
    seconds: float  # data, both evaluations and training; not the writing that follows
    n_train: int
    n_eval: int
    samples: list[dict[str, str]] = field(default_factory=list)  # a few held-out predictions after training
    train_seconds: float = 0.0  # the optimiser steps alone


# ---------------------------------------------------------------------------------------------
# Initialisation and loss


def initial_prompt(lm: LoadedModel, cfg: TrainConfig) -> tuple[torch.Tensor, Any]:
    """PEFT's own initialisation; returns (embeddings [P, H] float32, the PEFT config to save with)."""
    from peft import PromptTuningConfig, PromptTuningInit

    init = {
        "text": PromptTuningInit.TEXT,
        "sample_vocab": PromptTuningInit.SAMPLE_VOCAB,
        "random": PromptTuningInit.RANDOM,
    }[cfg.init]
    source = getattr(lm.model.config, "_name_or_path", None) or lm.name
    peft_cfg = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=cfg.num_virtual_tokens,
        prompt_tuning_init=init,
        prompt_tuning_init_text=cfg.resolved_init_text() if init is PromptTuningInit.TEXT else None,
        tokenizer_name_or_path=str(source) if init is PromptTuningInit.TEXT else None,
    )
    # Build PEFT's PromptEmbedding directly: it is what get_peft_model would create, without
    # wrapping (and so touching) the frozen model the engine serves.
    from peft.tuners.prompt_tuning.model import PromptEmbedding

    peft_cfg.token_dim = lm.hidden_size
    peft_cfg.num_transformer_submodules = 1
    peft_cfg.num_attention_heads = int(getattr(lm.model.config, "num_attention_heads", 0)) or None
    peft_cfg.num_layers = lm.num_layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        encoder = PromptEmbedding(peft_cfg, lm.model.get_input_embeddings())
    return encoder.embedding.weight.detach().float().clone(), peft_cfg  # [P, H]


def batch_loss(
    lm: LoadedModel, soft: torch.Tensor, batch: Sequence[tuple[list[int], list[int]]]
) -> torch.Tensor:
    """Mean cross-entropy over the output tokens of `batch`, the soft prompt [P, H] in front of each row."""
    model, dev = lm.model, lm.device
    P = soft.shape[0]
    rows = [inp + out for inp, out in batch]
    T = max(len(r) for r in rows)
    pad = lm.tokenizer.pad_token_id or 0
    ids = torch.full((len(rows), T), pad, dtype=torch.long, device=dev)  # [B, T] right-padded
    mask = torch.zeros((len(rows), P + T), dtype=torch.long, device=dev)  # [B, P+T]
    mask[:, :P] = 1
    pred_pos, targets = [], []
    for b, ((inp, _), row) in enumerate(zip(batch, rows)):
        ids[b, : len(row)] = torch.tensor(row, device=dev)
        mask[b, P : P + len(row)] = 1
        # the token at row index j is predicted by the hidden state at sequence position P + j - 1
        for j in range(len(inp), len(row)):
            pred_pos.append((b, P + j - 1))
            targets.append(row[j])
    embeds = model.get_input_embeddings()(ids)  # [B, T, H]
    x = torch.cat([soft.to(embeds.dtype)[None].expand(len(rows), -1, -1), embeds], dim=1)  # [B, P+T, H]
    hidden = model.base_model(inputs_embeds=x, attention_mask=mask).last_hidden_state  # [B, P+T, H]
    b_idx = torch.tensor([p[0] for p in pred_pos], device=dev)
    t_idx = torch.tensor([p[1] for p in pred_pos], device=dev)
    logits = model.get_output_embeddings()(
        hidden[b_idx, t_idx]
    )  # [N, V]: the lm head on output positions only
    return F.cross_entropy(logits.float(), torch.tensor(targets, device=dev))


# ---------------------------------------------------------------------------------------------
# The task's contract (task.json)


def choices_from_data(rows: Sequence[dict[str, str]]) -> list[str]:
    """The distinct training outputs, sorted: a classification task's labels, as its output contract."""
    choices = sorted({r["output"] for r in rows})
    if "" in choices:
        raise ValueError("output_choices_from_data: an empty output cannot be a choice")
    if len(choices) > MAX_CHOICES:
        raise ValueError(
            f"output_choices_from_data: the data has {len(choices)} distinct outputs; a choice holds at most "
            f"{MAX_CHOICES} (it is meant for classification tasks)"
        )
    return choices


def task_settings(cfg: TrainConfig) -> dict[str, Any] | None:
    """The task.json the trained folder gets (None: the config states no contract).

    Validated as the server reads task.json (SettingsError, a ValueError, names the field), so a bad
    contract is refused before any training; whether it compiles for the model is `check_contract`.
    """
    output = cfg.output
    if cfg.output_choices_from_data:
        if output is not None:
            raise ValueError("give output or output_choices_from_data, not both")
        output = {"choice": choices_from_data(read_jsonl(cfg.data))}
    settings: dict[str, Any] = {}
    if output is not None:
        settings["output"] = output
    if cfg.defaults:
        settings["defaults"] = dict(cfg.defaults)
    if not settings:
        return None
    parse_settings(json.dumps(settings).encode())
    return settings


def check_contract(lm: LoadedModel, settings: dict[str, Any]) -> None:
    """The output contract must compile for this model, as the server requires when it loads the task:
    refused now (GrammarError, a ValueError), not after minutes of training."""
    spec = parse_settings(json.dumps(settings).encode()).output_spec
    if spec is None:
        return
    from server.engine.grammar import GrammarCompiler  # llguidance: only when there is a contract

    compiler = GrammarCompiler.for_model(lm, workers=1)
    try:
        compiler.compile(spec)
    finally:
        compiler.close()


def write_task_settings(folder: Path, settings: dict[str, Any]) -> Path:
    """Write task.json into `folder` (the hidden folder save_adapter installs whole:
    atomic with the adapter)."""
    path = Path(folder) / SETTINGS_FILE
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Training


def check_config(cfg: TrainConfig) -> None:
    """Reject a bad task name, init or size before any data is read or the model is run."""
    validate_task_name(cfg.task)
    if cfg.init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {cfg.init!r}")
    if cfg.num_virtual_tokens < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise ValueError("num_virtual_tokens, batch_size and lr must be positive")


@dataclass
class TrainData:
    """The split data, tokenised once: `train` reads it, the loop indexes `encoded`,
    both evaluations use `held`."""

    train_rows: list[dict[str, str]]
    held: list[dict[str, str]]
    encoded: list[tuple[list[int], list[int]]]  # (input ids, output ids + end token) per training row
    max_new_tokens: int  # evaluation length, the same before and after training


def prepare_data(cfg: TrainConfig, lm: LoadedModel) -> TrainData:
    """Split and tokenise the data once, so every optimiser step and both evaluations see the same
    examples."""
    train_rows, held = split_data(cfg)
    encoded = [encode(lm, cfg.template, r) for r in train_rows]
    max_new = cfg.max_new_tokens or default_max_new_tokens(lm, held)
    return TrainData(train_rows=train_rows, held=held, encoded=encoded, max_new_tokens=max_new)


def num_steps(cfg: TrainConfig, n_train: int) -> int:
    """Optimiser steps: `steps` if given, else `epochs` passes over `n_train` examples, else 200."""
    per_epoch = math.ceil(n_train / cfg.batch_size)
    return cfg.steps if cfg.steps is not None else (math.ceil(cfg.epochs * per_epoch) if cfg.epochs else 200)


def warmup_then_decay(steps: int, warmup: float) -> Callable[[int], float]:
    """The learning-rate factor per step: linear warm-up over `warmup` of the steps (at least one),
    then linear decay to 0."""
    warm = max(1, int(steps * warmup))
    return lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))


def optimise(
    cfg: TrainConfig,
    lm: LoadedModel,
    init: torch.Tensor,
    encoded: list[tuple[list[int], list[int]]],
    steps: int,
) -> tuple[torch.Tensor, list[float], float]:
    """Train the soft prompt alone (the model stays frozen, in eval mode, as served).

    Batches are drawn by a `random.Random(cfg.seed)` reshuffle of all examples each time fewer than
    a batch remain, so a run is reproducible from the config. Returns (trained embeddings [P, H]
    float32 on the CPU, the loss of every step, seconds spent in the optimiser steps alone).
    """
    # [P, H] float32, the only trainable tensor; a copy (on the CPU .to() would alias `init`, and the
    # optimiser would rewrite the caller's initial prompt in place)
    soft = torch.nn.Parameter(init.detach().to(lm.device, copy=True))
    opt = torch.optim.AdamW([soft], lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_then_decay(steps, cfg.warmup))
    rng = random.Random(cfg.seed)
    order: list[int] = []
    losses: list[float] = []
    lm.model.eval()  # no dropout: training and serving see the same network
    from tqdm.auto import tqdm

    loop_started = time.monotonic()

    bar = tqdm(range(steps), desc=f"train {cfg.task}", disable=not cfg.progress, unit="step")
    ema = None
    for _ in bar:
        if len(order) < cfg.batch_size:
            more = list(range(len(encoded)))
            rng.shuffle(more)
            order += more
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        loss = batch_loss(lm, soft, [encoded[i] for i in idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        value = float(loss.detach())
        losses.append(value)
        ema = value if ema is None else 0.9 * ema + 0.1 * value
        bar.set_postfix(loss=f"{ema:.4f}")
    train_seconds = time.monotonic() - loop_started  # the optimiser steps alone
    return soft.detach().float().cpu(), losses, train_seconds


def train(
    cfg: TrainConfig, lm: LoadedModel, model_label: str | None = None, log: Callable[[str], None] = print
) -> TrainResult:
    """Train `cfg.task`'s soft prompt on `lm`, score it on held-out data before and after, and install it
    in the store.

    `model_label` is the base model as the adapter config and card name it (default `lm.name`).
    """
    check_config(cfg)
    settings = task_settings(cfg)
    if settings is not None:
        check_contract(lm, settings)
    started = time.monotonic()
    data = prepare_data(cfg, lm)
    held, max_new = data.held, data.max_new_tokens
    steps = num_steps(cfg, len(data.encoded))

    init, peft_cfg = initial_prompt(lm, cfg)
    before, _ = evaluate(lm, init, held, cfg.template, max_new, cfg.eval_batch_size)
    log(f"held-out exact match before training: {before:.1%} ({len(held)} examples)")

    trained, losses, train_seconds = optimise(cfg, lm, init, data.encoded, steps)

    after, preds = evaluate(lm, trained, held, cfg.template, max_new, cfg.eval_batch_size)
    log(f"held-out exact match after training: {after:.1%} (before {before:.1%})")
    samples = [{"input": e["input"], "expected": e["output"], "got": p} for e, p in zip(held[:5], preds[:5])]
    seconds = time.monotonic() - started
    label = model_label or lm.name
    card = render_card(
        cfg,
        label,
        data.train_rows,
        held,
        steps,
        before,
        after,
        losses,
        train_seconds,
        seconds,
        samples,
        settings,
    )
    folder = save_adapter(lm, cfg, peft_cfg, trained, card, label, settings)
    return TrainResult(
        folder=folder,
        before=before,
        after=after,
        losses=losses,
        seconds=seconds,
        n_train=len(data.train_rows),
        n_eval=len(held),
        samples=samples,
        train_seconds=train_seconds,
    )


def save_adapter(
    lm: LoadedModel,
    cfg: TrainConfig,
    peft_cfg: Any,
    embeddings: torch.Tensor,
    card: str,
    model_label: str,
    settings: dict[str, Any] | None = None,
) -> Path:
    """Write adapter_config.json, adapter_model.safetensors, README.md and (given `settings`) task.json
    into the store atomically."""
    from safetensors.torch import save_file

    tmp = temp_folder(cfg.store, cfg.task)
    try:
        config = peft_cfg.to_dict()
        config["inference_mode"] = True
        config["base_model_name_or_path"] = model_label
        if config.get("tokenizer_name_or_path"):
            config["tokenizer_name_or_path"] = model_label  # no local paths in a shared store
        for k, v in list(config.items()):
            if isinstance(v, (set, frozenset)):
                config[k] = sorted(v)
        (tmp / "adapter_config.json").write_text(
            json.dumps(config, indent=2, sort_keys=True, default=str) + "\n"
        )
        save_file(
            {"prompt_embeddings": embeddings.float().contiguous()}, str(tmp / "adapter_model.safetensors")
        )
        (tmp / "README.md").write_text(card)
        if settings is not None:
            write_task_settings(tmp, settings)
        # The same validation the server applies at startup, before the folder becomes visible.
        geometry = PromptGeometry.of(lm, cfg.num_virtual_tokens, device="cpu")
        check_folder(tmp, cfg.task, lambda folder: read_adapter(folder, geometry))
        install(cfg.store, cfg.task, tmp)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cfg.store / cfg.task


def model_label_for(model: str) -> str:
    return DEFAULT_MODEL_ID if model == DEFAULT_MODEL else model
