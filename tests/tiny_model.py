"""A tiny, seeded llama for fast tests (and `scripts/fuzz.py`): random weights, a real tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM


def tiny_test_model(folder: Path, tokenizer_from: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny, seeded, randomly initialised llama plus a copy of a tokenizer, for fast tests."""
    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    params: dict[str, Any] = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=len(tokenizer),  # len() counts added special tokens, vocab_size may not
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    params.update(overrides)
    config = LlamaConfig(**params)
    # fork_rng: seed the init without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
