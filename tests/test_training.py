"""`softmux train` on the tiny model: the loss falls, the adapter is valid PEFT, and the server serves it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from server.api.app import create_app
from server.cli import main as cli_main
from server.config import Settings
from server.models import LoadedModel, load_model
from server.prompts.store import read_adapter
from server.prompts.types import PromptGeometry
from server.train_config import CHATML_TEMPLATE, TrainConfig
from server.train_data import encode, split_data
from server.train_eval import as_soft_prompt, generate_batch
from server.training import initial_prompt, optimise, train
from tests.support import reference_greedy

COLOURS = ["red", "green", "blue", "black", "white", "pink", "grey", "brown"]


@pytest.fixture(scope="module")
def lm(tiny_model_dir: Path) -> LoadedModel:
    return load_model(str(tiny_model_dir), dtype="float32")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A trivially learnable mapping: every answer is 'yes' (the prompt must learn a fixed output)."""
    path = tmp_path_factory.mktemp("data") / "toy.jsonl"
    rows = [{"input": f"{a} and {b}", "output": "yes"} for a in COLOURS for b in COLOURS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_training_lowers_loss_raises_the_score_and_writes_a_valid_adapter(lm, data, tmp_path):
    store = tmp_path / "store"
    cfg = TrainConfig(
        task="toy",
        data=data,
        store=store,
        num_virtual_tokens=4,
        init="random",
        steps=40,
        lr=0.3,
        batch_size=8,
        holdout=16,
        # scored on the answer's token: the random model cannot learn to emit <|im_end|> after it
        max_new_tokens=1,
        progress=False,
    )
    result = train(cfg, lm, log=lambda _: None)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)  # the tiny random model's logits are peaked: ~15 -> ~7
    # Held-out (unseen colour pairs) answers: none right from the random prompt, all right once trained.
    assert (result.before, result.after, result.n_eval) == (0.0, 1.0, 16), result.samples
    # ... and each score is the one its prompt earns when served: recomputed from the held-out rows, the
    # initial prompt and the adapter as written, counting the answers by hand.
    _, held = split_data(cfg)
    inputs = [encode(lm, cfg.template, e)[0] for e in held]
    written = read_adapter(store / "toy", PromptGeometry.of(lm, 8, device="cpu"))
    for embeddings, score in [
        (initial_prompt(lm, cfg)[0], result.before),
        (written.embeddings, result.after),
    ]:
        answers = generate_batch(lm, as_soft_prompt(lm, embeddings), inputs, max_new_tokens=1)
        assert sum(a.strip() == "yes" for a in answers) / len(held) == score, answers
    assert sorted(os.listdir(store)) == ["toy"]  # no temp folder left
    assert sorted(os.listdir(store / "toy")) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((store / "toy" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 4
    assert config["task_type"] == "CAUSAL_LM"
    card = (store / "toy" / "README.md").read_text()
    assert "toy.jsonl" in card and "trained prompt:" in card and "<|im_start|>user" in card
    assert written.num_virtual_tokens == 4


def test_optimising_leaves_the_initial_prompt_as_it_was(lm, data, tmp_path):
    """The trained prompt is a new tensor: the caller's initial embeddings are not trained in place."""
    cfg = TrainConfig(task="toy", data=data, store=tmp_path, num_virtual_tokens=4, init="random", lr=0.3)
    init, _ = initial_prompt(lm, cfg)
    kept = init.clone()
    encoded = [encode(lm, cfg.template, {"input": "red and blue", "output": "yes"})]
    trained, losses, _ = optimise(cfg, lm, init, encoded, steps=3)
    assert torch.equal(init, kept) and not torch.equal(trained, kept) and len(losses) == 3


def test_peft_reads_the_adapter_as_softmux_serves_it(lm, data, tiny_model_dir, tmp_path):
    """PEFT, on its own copy of the model, gets the prompt softmux serves and greedily answers what softmux
    answers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = TrainConfig(
        task="toy",
        data=data,
        store=tmp_path,
        num_virtual_tokens=3,
        init="random",
        steps=2,
        holdout=4,
        progress=False,
    )
    train(cfg, lm, log=lambda _: None)
    served = read_adapter(tmp_path / "toy", PromptGeometry.of(lm, 8, device="cpu"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "toy")).eval()
    assert torch.equal(
        peft_model.get_prompt_embedding_to_save("default").to(served.embeddings.dtype), served.embeddings
    )
    inputs = [encode(lm, CHATML_TEMPLATE, {"input": c, "output": ""})[0] for c in COLOURS[:4]]
    ours = generate_batch(lm, served, inputs, max_new_tokens=6)
    for ids, text in zip(inputs, ours):
        with torch.inference_mode():
            out = peft_model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=6,
                do_sample=False,
                # PEFT 0.21's cached prompt-tuning generation drifts from its own uncached one
                use_cache=False,
                eos_token_id=sorted(lm.eos_token_ids),
                pad_token_id=lm.tokenizer.pad_token_id,
            )
        theirs = out[0, len(ids) :].tolist()
        assert theirs, "PEFT generated nothing"
        assert text == lm.tokenizer.decode(theirs, skip_special_tokens=True), (text, theirs)


def test_evaluation_matches_the_solo_reference(lm):
    emb = torch.randn(3, lm.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.5
    examples = [{"input": c, "output": ""} for c in COLOURS[:5]]
    inputs = [encode(lm, CHATML_TEMPLATE, e)[0] for e in examples]
    got = generate_batch(lm, as_soft_prompt(lm, emb), inputs, max_new_tokens=5, batch_size=3)
    for ids, text in zip(inputs, got):
        out = reference_greedy(lm, emb, ids, 5, eos=lm.eos_token_ids)
        out = out[:-1] if out and out[-1] in lm.eos_token_ids else out
        assert text == lm.tokenizer.decode(out, skip_special_tokens=True)


async def test_cli_trains_with_text_init_and_the_server_serves_it(lm, data, tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    rc = cli_main(
        [
            "train",
            "--task",
            "toy-cli",
            "--data",
            str(data),
            "--store",
            str(store),
            "--model",
            str(tiny_model_dir),
            "--num-virtual-tokens",
            "4",
            "--init",
            "text",
            "--init-text",
            "Answer yes.",
            "--steps",
            "30",
            "--lr",
            "0.3",
            "--holdout",
            "8",
            "--threads",
            "1",
        ]
    )
    assert rc == 0 and (store / "toy-cli" / "adapter_model.safetensors").is_file()
    app = create_app(
        Settings(store=store, max_new_tokens=16, reload_interval=0), loader=lambda: lm, wait=True
    )
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as client:
            r = await client.post(
                "/generate",
                json={
                    "task": "toy-cli",
                    "inputs": CHATML_TEMPLATE.format(input="red and pink"),
                    "parameters": {"max_new_tokens": 8},
                },
            )
            assert r.status_code == 200, r.text
            # served exactly as `softmux train` evaluated it
            emb = load_file(store / "toy-cli" / "adapter_model.safetensors")["prompt_embeddings"]
            ids = lm.tokenizer(CHATML_TEMPLATE.format(input="red and pink"))["input_ids"]
            (expected,) = generate_batch(lm, as_soft_prompt(lm, emb), [ids], max_new_tokens=8)
            assert r.json()["generated_text"] == expected and r.json()["details"]["virtual_tokens"] == 4
