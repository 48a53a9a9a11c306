"""Limits taken from the model: request limits derived from its context window, flags it cannot hold
refused at start with the reason, and `softmux serve` exiting non-zero on a model it cannot serve."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from server.config import DEFAULT_INPUT_TOKENS, DEFAULT_NEW_TOKENS, Settings


@pytest.mark.parametrize("window", [None, 4096, 1024, 512, 300])
def test_derived_limits_fit_the_window_beside_the_largest_soft_prompt(window):
    s = Settings().with_model_limits(window)
    assert 1 <= s.max_new_tokens <= DEFAULT_NEW_TOKENS and 1 <= s.max_input_tokens <= DEFAULT_INPUT_TOKENS
    if window is None or window >= DEFAULT_INPUT_TOKENS + DEFAULT_NEW_TOKENS + s.max_virtual_tokens:
        assert (s.max_input_tokens, s.max_new_tokens) == (DEFAULT_INPUT_TOKENS, DEFAULT_NEW_TOKENS)
    else:
        assert s.max_virtual_tokens + s.max_input_tokens + s.max_new_tokens == window
        assert s.max_input_tokens >= s.max_new_tokens  # the room is split 2:1


def test_given_limits_are_kept_or_refused_with_the_reason():
    assert Settings(max_new_tokens=800).with_model_limits(1024).max_input_tokens == 1024 - 128 - 800
    assert Settings(max_input_tokens=100).with_model_limits(1024).max_new_tokens == DEFAULT_NEW_TOKENS
    assert Settings(max_model_len=600).with_model_limits(1024).max_new_tokens == (600 - 128) // 3
    with pytest.raises(ValueError, match=r"= 1128 exceeds the model's context window \(1024 tokens\)"):
        Settings(max_input_tokens=600, max_new_tokens=400).with_model_limits(1024)
    with pytest.raises(ValueError, match="--max-model-len 2048 exceeds the model's context window"):
        Settings(max_model_len=2048).with_model_limits(1024)
    with pytest.raises(ValueError, match="leaves no room"):
        Settings().with_model_limits(100)


def tiny_folder(folder: Path, tokenizer_dir: Path, model_type: str, **params) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **params)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def serve(folder: Path, store: Path, *flags: str) -> subprocess.Popen[str]:
    cmd = [
        sys.executable,
        "-m",
        "server.cli",
        "serve",
        "--model",
        str(folder),
        "--store",
        str(store),
        "--port",
        "0",
        *flags,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_serve_exits_non_zero_with_the_reason_when_the_model_cannot_be_served(tmp_path, default_model_dir):
    store = tmp_path / "store"
    store.mkdir()
    opt = tiny_folder(
        tmp_path / "opt", default_model_dir, "opt", hidden_size=64, num_hidden_layers=1, ffn_dim=128,
        num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=2048,
    )  # fmt: skip
    gpt2 = tiny_folder(
        tmp_path / "gpt2", default_model_dir, "gpt2", n_embd=64, n_layer=1, n_head=4, n_positions=1024
    )
    for folder, flags, reason in [
        (opt, (), "'opt' is not supported"),
        (gpt2, ("--max-input-tokens", "1000"), "exceeds the model's context window (1024 tokens)"),
    ]:
        began = time.monotonic()
        proc = serve(folder, store, *flags)
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode != 0, out[-2000:]
        assert reason in out and "cannot be served" in out, out[-2000:]
        assert time.monotonic() - began < 240


def test_a_gpt2_folder_serves_with_the_default_flags_its_limits_from_its_positions(
    tmp_path, default_model_dir
):
    """gpt2's learned positions end at 1024: with no limit flags the server derives limits that fit and
    becomes ready (it used to stay up unready, asking for lower flags)."""
    import os
    import signal

    import httpx

    from server.bench import start_server

    store = tmp_path / "store"
    store.mkdir()
    gpt2 = tiny_folder(
        tmp_path / "gpt2", default_model_dir, "gpt2", n_embd=64, n_layer=1, n_head=4, n_positions=1024
    )
    proc, url = start_server(["--model", str(gpt2), "--store", str(store)], ready_timeout=240)
    try:
        limits = httpx.get(url + "/info", timeout=10).json()["limits"]
        assert limits["max_virtual_tokens"] + limits["max_input_tokens"] + limits["max_new_tokens"] == 1024
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
