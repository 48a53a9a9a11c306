from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from server import models
from server.models import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_ID,
    LoadedModel,
    load_model,
    resolve_device,
    resolve_dtype,
    resolve_model,
)
from tests.tiny_model import tiny_test_model

CPU = torch.device("cpu")


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError):
        resolve_device("not-a-device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda:0")


@pytest.mark.parametrize(
    ("name", "device", "expected"),
    [
        ("auto", CPU, torch.float32),
        ("auto", torch.device("cuda"), torch.bfloat16),
        ("float32", CPU, torch.float32),
        ("float16", CPU, torch.float16),
        ("bfloat16", CPU, torch.bfloat16),
        ("float64", CPU, torch.float64),
    ],
)
def test_resolve_dtype(name: str, device: torch.device, expected: torch.dtype) -> None:
    assert resolve_dtype(name, device) == expected


def test_resolve_dtype_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", CPU)


def test_resolve_model_passes_other_names_through(tmp_path: Path) -> None:
    assert resolve_model("some-org/some-model", tmp_path) == "some-org/some-model"
    assert resolve_model(str(tmp_path), tmp_path) == str(tmp_path)
    assert not any(tmp_path.iterdir())  # nothing converted for a non-default name


def test_tiny_model_round_trip(tiny_model_dir: Path) -> None:
    lm = load_model(str(tiny_model_dir), dtype="float64")
    assert isinstance(lm, LoadedModel)
    assert (lm.hidden_size, lm.num_layers) == (64, 2)
    assert lm.dtype == torch.float64 and lm.device == CPU
    assert lm.name == str(tiny_model_dir)
    assert lm.eos_token_ids == {2}
    assert not lm.model.training
    assert all(not p.requires_grad and p.dtype == torch.float64 for p in lm.model.parameters())
    assert lm.model.config.vocab_size == len(lm.tokenizer)
    assert lm.model.get_input_embeddings().weight is lm.model.get_output_embeddings().weight
    ids = torch.tensor([lm.tokenizer("hello world")["input_ids"]])
    logits = lm.model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(lm.tokenizer)) and torch.isfinite(logits).all()


def test_tiny_model_is_deterministic(tmp_path: Path, tiny_model_dir: Path) -> None:
    torch.manual_seed(123)  # the init is seeded on its own, whatever the global RNG holds
    one = tiny_test_model(tmp_path / "one", tokenizer_from=tiny_model_dir)
    two = tiny_test_model(tmp_path / "two", tokenizer_from=tiny_model_dir)
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = tiny_test_model(tmp_path / "other", tokenizer_from=tiny_model_dir, seed=1, num_hidden_layers=3)
    assert load_model(str(other)).num_layers == 3


def test_default_model_cache(default_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_conversion() -> Path:
        raise AssertionError("the GGUF file was read again: the safetensors cache should have been used")

    monkeypatch.setattr(models, "_gguf_folder", no_conversion)
    assert resolve_model(DEFAULT_MODEL, default_model_dir.parent) == str(default_model_dir)
    lm = load_model(DEFAULT_MODEL, cache_dir=default_model_dir.parent)
    assert lm.name == DEFAULT_MODEL_ID
    assert (lm.hidden_size, lm.num_layers, len(lm.tokenizer)) == (576, 30, 49152)
    assert lm.eos_token_ids == {2}  # <|im_end|>
    assert lm.tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"
    # The tokenizer adds no BOS: a soft prompt sits directly before the first text token.
    assert lm.tokenizer("Hello")["input_ids"] == lm.tokenizer.encode("Hello", add_special_tokens=False)

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    text = lm.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([lm.tokenizer(text)["input_ids"]])
    out = lm.model.generate(ids, max_new_tokens=16, do_sample=False)
    answer = lm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.timeout(60)  # a network probe means minutes of retries before the cache is used
def test_hub_id_loads_from_local_cache_without_network(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    import socket

    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--acme--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    attempts: list[object] = []

    def no_network(host: object, *args: object, **kwargs: object) -> None:
        attempts.append(host)  # recorded: hub clients catch the error, retry, then use the cache
        raise socket.gaierror("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)  # every hub request resolves a name first
    lm = load_model("acme/tiny")
    assert lm.name == "acme/tiny" and lm.hidden_size == 64
    assert attempts == []
