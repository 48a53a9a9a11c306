"""server/engine/decoder.py over the model families users bring: tiny random llama, qwen2, mistral,
gemma and gpt2 configs, each served in mixed staggered batches against the solo reference (the
transformers model itself on cat(soft_prompt, embed(ids))); unsupported models refused at start."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from server.engine.decoder import UnsupportedModel
from server.engine.engine import Engine
from server.engine.prefix_cache import PrefixCache
from server.engine.request import SamplingParams
from server.engine.scheduler import Scheduler
from server.models import LoadedModel, load_model
from tests.support import make_prompt, make_request, reference_greedy

LLAMA_LIKE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_position_embeddings=512)
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(LLAMA_LIKE, num_key_value_heads=2, attention_bias=True),
    "qwen2": dict(LLAMA_LIKE, num_key_value_heads=2, use_sliding_window=False),
    "mistral": dict(LLAMA_LIKE, num_key_value_heads=1, sliding_window=None, head_dim=16),
    "gemma": dict(LLAMA_LIKE, num_key_value_heads=1, head_dim=32, hidden_activation="gelu_pytorch_tanh"),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=512),
}


def build(folder: Path, tokenizer_dir: Path, model_type: str, **params: Any) -> LoadedModel:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        initializer_range=0.3,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **params,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_model(str(folder), dtype="float64")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_mixed_staggered_batch_matches_solo_reference(family, tmp_path, default_model_dir):
    lm = build(tmp_path / family, default_model_dir, family, **FAMILIES[family])
    prompts = [make_prompt(f"{family}{i}", p, lm, seed=i) for i, p in enumerate([3, 7, 20])]
    rng = random.Random(1)
    specs = [(prompts[k % 3], [rng.randrange(40_000) for _ in range(1 + (k * 7) % 19)], 5 + k % 6) for k in range(9)]
    engine = Engine(lm, Scheduler(16, 100_000, 100), PrefixCache(1 << 30))
    engine.start()
    try:
        tracked = [make_request(p, ids, SamplingParams(max_new_tokens=n)) for p, ids, n in specs]
        for t in tracked[:5]:
            engine.submit(t.request)
        assert tracked[0].done.wait(60)  # the rest join a running batch
        for t in tracked[5:]:
            engine.submit(t.request)
        for t, (p, ids, n) in zip(tracked, specs):
            assert t.result.generated_tokens > 0
            assert t.request.output_ids == reference_greedy(lm, p.embeddings, ids, n), f"{family}: {p.name} L={len(ids)}"
        assert engine.stats.mixed_task_passes > 0
    finally:
        engine.stop()


def test_unsupported_family_is_refused_with_the_reason(tmp_path, default_model_dir):
    lm = build(
        tmp_path / "opt",
        default_model_dir,
        "opt",
        hidden_size=64,
        num_hidden_layers=1,
        ffn_dim=128,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=128,
    )
    with pytest.raises(UnsupportedModel, match="'opt' is not supported.*llama"):
        Engine(lm, Scheduler(4, 1000, 10))


def test_sliding_window_shorter_than_the_context_is_refused(tmp_path, default_model_dir):
    lm = build(tmp_path / "mistral", default_model_dir, "mistral", **dict(FAMILIES["mistral"], sliding_window=64))
    with pytest.raises(UnsupportedModel, match="sliding-window attention \\(64 tokens\\)"):
        Engine(lm, Scheduler(4, 1000, 10), max_context=1000)
    Engine(lm, Scheduler(4, 1000, 10), max_context=64)  # every admitted sequence fits the window: served
