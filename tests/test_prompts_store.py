"""read_adapter / validate_task_name: real PEFT adapters load exactly; every bad folder says why."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from server.prompts.store import read_adapter, validate_task_name
from server.prompts.types import PromptError, PromptGeometry, PromptKind, SoftPrompt

HIDDEN = 32
MAX_P = 8
NUM_VIRTUAL = 5
_DROP = object()  # good_config(field=_DROP) leaves the field out


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
    )
    return LlamaForCausalLM(config).eval()


def save_peft_adapter(folder: Path, kind: PromptKind, *, seed: int = 1) -> PeftModel:
    """Train nothing: a random PEFT prompt adapter on the tiny llama, saved with save_pretrained."""
    if kind is PromptKind.PROMPT_TUNING:
        peft_config: Any = PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL, prompt_tuning_init="RANDOM"
        )
    elif kind is PromptKind.P_TUNING:
        peft_config = PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL, encoder_hidden_size=16
        )
    else:
        raise AssertionError(kind)
    model = tiny_llama()
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, peft_config)
    peft_model.eval()
    peft_model.save_pretrained(str(folder))
    return peft_model


def write_adapter(
    folder: Path, config: dict[str, Any] | bytes | None, tensors: dict[str, torch.Tensor] | bytes | None
) -> Path:
    """Hand-written adapter folder; None leaves a file out, bytes are written verbatim."""
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        data = config if isinstance(config, bytes) else json.dumps(config).encode()
        (folder / "adapter_config.json").write_bytes(data)
    if isinstance(tensors, bytes):
        (folder / "adapter_model.safetensors").write_bytes(tensors)
    elif tensors is not None:
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def good_config(**changes: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": NUM_VIRTUAL,
        "num_transformer_submodules": 1,
        "token_dim": HIDDEN,
    }
    config.update(changes)
    return {k: v for k, v in config.items() if v is not _DROP}


def good_tensor(p: int = NUM_VIRTUAL, h: int = HIDDEN) -> torch.Tensor:
    return torch.randn(p, h, generator=torch.Generator().manual_seed(3))  # [P, H]


def read(folder: Path, dtype: torch.dtype = torch.float32) -> SoftPrompt:
    return read_adapter(folder, PromptGeometry(HIDDEN, MAX_P, dtype))


@pytest.fixture(scope="module")
def peft_store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, PeftModel]]:
    root = tmp_path_factory.mktemp("peft_store")
    return {
        "pt": (root / "pt-task", save_peft_adapter(root / "pt-task", PromptKind.PROMPT_TUNING)),
        "ptune": (root / "ptune-task", save_peft_adapter(root / "ptune-task", PromptKind.P_TUNING)),
    }


# ---------------------------------------------------------------------------------------------
# Real PEFT adapters


def test_prompt_tuning_adapter_loads_peft_tensor_exactly(
    peft_store: dict[str, tuple[Path, PeftModel]],
) -> None:
    folder, _ = peft_store["pt"]
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert set(saved) == {"prompt_embeddings"}  # PEFT 0.21 saves exactly this key
    prompt = read(folder)
    assert prompt.name == "pt-task"
    assert prompt.kind is PromptKind.PROMPT_TUNING
    assert prompt.peft_type == "PROMPT_TUNING"
    assert prompt.num_virtual_tokens == NUM_VIRTUAL
    assert prompt.source == folder
    assert prompt.embeddings.shape == (NUM_VIRTUAL, HIDDEN)
    assert prompt.embeddings.is_contiguous()
    assert torch.equal(prompt.embeddings, saved["prompt_embeddings"])
    assert len(prompt.content_hash) == 64


def test_p_tuning_adapter_is_the_saved_encoder_output(peft_store: dict[str, tuple[Path, PeftModel]]) -> None:
    folder, peft_model = peft_store["ptune"]
    saved = load_file(str(folder / "adapter_model.safetensors"))
    prompt = read(folder)
    assert prompt.kind is PromptKind.P_TUNING
    assert torch.equal(prompt.embeddings, saved["prompt_embeddings"])
    # What PEFT saved is the encoder (MLP) run on the virtual token ids, not the encoder's weights.
    encoder = peft_model.prompt_encoder["default"]
    tokens = peft_model.prompt_tokens["default"][None, :NUM_VIRTUAL]  # [1, P]
    with torch.no_grad():
        encoder_out = encoder(tokens)[0]  # [P, H]
    torch.testing.assert_close(prompt.embeddings, encoder_out, rtol=0, atol=1e-6)


@pytest.mark.parametrize("key", ["pt", "ptune"])
def test_loaded_prompt_matches_peft_forward(peft_store: dict[str, tuple[Path, PeftModel]], key: str) -> None:
    """PEFT's reloaded adapter and base(cat(prompt, embed(ids))) give the same logits."""
    folder, _ = peft_store[key]
    prompt = read(folder)
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(folder)).eval()
    base = tiny_llama()
    ids = torch.tensor([[1, 17, 42, 99, 3]])  # [1, L]
    with torch.no_grad():
        peft_logits = reloaded(input_ids=ids).logits  # [1, P+L, V]
        embeds = torch.cat([prompt.embeddings[None], base.get_input_embeddings()(ids)], dim=1)  # [1, P+L, H]
        ours = base(inputs_embeds=embeds).logits  # [1, P+L, V]
    torch.testing.assert_close(
        ours[:, -ids.shape[1] :], peft_logits[:, -ids.shape[1] :], rtol=1e-5, atol=1e-5
    )


def test_cast_to_model_dtype(peft_store: dict[str, tuple[Path, PeftModel]]) -> None:
    folder, _ = peft_store["pt"]
    saved = load_file(str(folder / "adapter_model.safetensors"))["prompt_embeddings"]
    prompt = read(folder, dtype=torch.bfloat16)
    assert prompt.embeddings.dtype == torch.bfloat16
    assert torch.equal(prompt.embeddings, saved.to(torch.bfloat16))


def test_content_hash_tracks_file_bytes(tmp_path: Path) -> None:
    a = read(write_adapter(tmp_path / "a", good_config(), {"prompt_embeddings": good_tensor()}))
    b = read(write_adapter(tmp_path / "b", good_config(), {"prompt_embeddings": good_tensor()}))
    c = read(write_adapter(tmp_path / "c", good_config(), {"prompt_embeddings": good_tensor() + 1}))
    assert a.content_hash == b.content_hash  # same bytes, different folder
    assert a.content_hash != c.content_hash


def test_optional_config_fields_may_be_absent(tmp_path: Path) -> None:
    config = good_config(num_virtual_tokens=_DROP, num_transformer_submodules=_DROP)
    prompt = read(write_adapter(tmp_path / "bare", config, {"prompt_embeddings": good_tensor(p=MAX_P)}))
    assert prompt.num_virtual_tokens == MAX_P


def test_float16_file_is_accepted(tmp_path: Path) -> None:
    tensor = good_tensor().half()
    prompt = read(write_adapter(tmp_path / "half", good_config(), {"prompt_embeddings": tensor}))
    assert prompt.embeddings.dtype == torch.float32
    assert torch.equal(prompt.embeddings, tensor.float())


# ---------------------------------------------------------------------------------------------
# Task names


@pytest.mark.parametrize("name", ["a", "sentiment", "qa-v2", "task_1.0", "0abc", "a" * 64])
def test_valid_task_names(name: str) -> None:
    validate_task_name(name)


@pytest.mark.parametrize(
    "name",
    ["", "Bad_Name", "../x", "..", ".hidden", "a/b", "a\\b", "-lead", "_lead", "a b", "abc\n", "é", "a" * 65],
)
def test_invalid_task_names(name: str) -> None:
    with pytest.raises(PromptError, match="allowed names are 1-64 characters"):
        validate_task_name(name)


# ---------------------------------------------------------------------------------------------
# One test per failure reason


def test_bad_folder_name(tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "Bad_Name", good_config(), {"prompt_embeddings": good_tensor()})
    with pytest.raises(PromptError, match=r"invalid task name 'Bad_Name'"):
        read(folder)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(PromptError, match="does not exist"):
        read(tmp_path / "nowhere")


def test_missing_config(tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "t", None, {"prompt_embeddings": good_tensor()})
    with pytest.raises(PromptError, match="adapter_config.json is missing"):
        read(folder)


def test_missing_weights(tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "t", good_config(), None)
    with pytest.raises(PromptError, match="adapter_model.safetensors is missing"):
        read(folder)


def test_config_is_a_folder(tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "t", None, {"prompt_embeddings": good_tensor()})
    (folder / "adapter_config.json").mkdir()
    with pytest.raises(PromptError, match="adapter_config.json is not a regular file"):
        read(folder)


@pytest.mark.parametrize("data", [b"{not json", b"", b"\xff\xfe\x00garbage"])
def test_invalid_json(tmp_path: Path, data: bytes) -> None:
    folder = write_adapter(tmp_path / "t", data, {"prompt_embeddings": good_tensor()})
    with pytest.raises(PromptError, match="adapter_config.json is not valid JSON"):
        read(folder)


def test_json_not_an_object(tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "t", b"[1, 2]", {"prompt_embeddings": good_tensor()})
    with pytest.raises(PromptError, match="must hold a JSON object, found a JSON array"):
        read(folder)


def test_missing_peft_type(tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "t", good_config(peft_type=_DROP), {"prompt_embeddings": good_tensor()})
    with pytest.raises(
        PromptError, match="no 'peft_type'; supported: PROMPT_TUNING, P_TUNING, PREFIX_TUNING"
    ):
        read(folder)


@pytest.mark.parametrize("peft_type", ["LORA", "prompt_tuning", "ADAPTION_PROMPT"])
def test_unsupported_peft_type(tmp_path: Path, peft_type: str) -> None:
    folder = write_adapter(
        tmp_path / "t", good_config(peft_type=peft_type), {"prompt_embeddings": good_tensor()}
    )
    with pytest.raises(
        PromptError,
        match=rf"unsupported peft_type '{peft_type}'; supported: PROMPT_TUNING, P_TUNING, PREFIX_TUNING",
    ):
        read(folder)


def test_peft_type_not_a_string(tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "t", good_config(peft_type=3), {"prompt_embeddings": good_tensor()})
    with pytest.raises(PromptError, match="'peft_type' must be a string, found 3"):
        read(folder)


def test_wrong_tensor_key(tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "t", good_config(), {"embedding.weight": good_tensor()})
    with pytest.raises(
        PromptError,
        match=r"missing tensor\(s\) \['prompt_embeddings'\]; unexpected tensor\(s\) \['embedding.weight'\]",
    ):
        read(folder)


def test_extra_tensor_key(tmp_path: Path) -> None:
    tensors = {"prompt_embeddings": good_tensor(), "lora_A": torch.zeros(2, 2)}
    folder = write_adapter(tmp_path / "t", good_config(), tensors)
    with pytest.raises(PromptError, match=r"unexpected tensor\(s\) \['lora_A'\]"):
        read(folder)


def test_three_d_tensor(tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "t", good_config(), {"prompt_embeddings": good_tensor()[None]})
    with pytest.raises(
        PromptError, match=r"shape \[1, 5, 32\] \(3-D\); PROMPT_TUNING needs 2-D \[num_virtual_tokens, 32\]"
    ):
        read(folder)


def test_wrong_hidden_size(tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "t", good_config(), {"prompt_embeddings": good_tensor(h=48)})
    with pytest.raises(PromptError, match="hidden size 48 .*the model's hidden size is 32"):
        read(folder)


def test_zero_virtual_tokens(tmp_path: Path) -> None:
    config = good_config(num_virtual_tokens=_DROP)
    folder = write_adapter(tmp_path / "t", config, {"prompt_embeddings": torch.zeros(0, HIDDEN)})
    with pytest.raises(PromptError, match="has 0 virtual tokens; allowed: 1 to 8"):
        read(folder)


def test_too_many_virtual_tokens(tmp_path: Path) -> None:
    config = good_config(num_virtual_tokens=MAX_P + 1)
    folder = write_adapter(tmp_path / "t", config, {"prompt_embeddings": good_tensor(p=MAX_P + 1)})
    with pytest.raises(PromptError, match="has 9 virtual tokens; allowed: 1 to 8"):
        read(folder)


def test_num_virtual_tokens_mismatch(tmp_path: Path) -> None:
    folder = write_adapter(
        tmp_path / "t", good_config(num_virtual_tokens=4), {"prompt_embeddings": good_tensor()}
    )
    with pytest.raises(PromptError, match="says num_virtual_tokens=4 but prompt_embeddings has 5 rows"):
        read(folder)


@pytest.mark.parametrize("value", ["5", 0, -1, True, 2.5])
def test_num_virtual_tokens_not_a_positive_int(tmp_path: Path, value: Any) -> None:
    folder = write_adapter(
        tmp_path / "t", good_config(num_virtual_tokens=value), {"prompt_embeddings": good_tensor()}
    )
    with pytest.raises(PromptError, match="'num_virtual_tokens' must be a positive integer"):
        read(folder)


def test_encoder_decoder_adapter(tmp_path: Path) -> None:
    # PEFT stores 2P rows for seq2seq (num_transformer_submodules=2); that is not a causal-LM prompt.
    config = good_config(num_virtual_tokens=3, num_transformer_submodules=2)
    folder = write_adapter(tmp_path / "t", config, {"prompt_embeddings": good_tensor(p=6)})
    with pytest.raises(PromptError, match="'num_transformer_submodules' is 2 .*need 1"):
        read(folder)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_non_float_tensor(tmp_path: Path, dtype: torch.dtype) -> None:
    folder = write_adapter(
        tmp_path / "t", good_config(), {"prompt_embeddings": torch.ones(NUM_VIRTUAL, HIDDEN, dtype=dtype)}
    )
    with pytest.raises(PromptError, match=f"has dtype {str(dtype)[6:]}; a floating-point dtype is required"):
        read(folder)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_in_file(tmp_path: Path, bad: float) -> None:
    tensor = good_tensor()
    tensor[2, 7] = bad
    folder = write_adapter(tmp_path / "t", good_config(), {"prompt_embeddings": tensor})
    with pytest.raises(PromptError, match="holds non-finite values in the file"):
        read(folder)


def test_inf_after_cast_to_bfloat16(tmp_path: Path) -> None:
    # 3.4e38 is finite in float32 (max 3.40e38) but above bfloat16's max (3.39e38): it rounds to inf.
    # (1e39 would not do: it is already inf in a float32 file.)
    tensor = good_tensor()
    tensor[0, 0] = 3.4e38
    folder = write_adapter(tmp_path / "t", good_config(), {"prompt_embeddings": tensor})
    assert torch.isfinite(read(folder, dtype=torch.float32).embeddings).all()
    with pytest.raises(
        PromptError, match="1 value\\(s\\) that become inf when cast to the model dtype bfloat16"
    ):
        read(folder, dtype=torch.bfloat16)


def test_inf_after_cast_to_float16(tmp_path: Path) -> None:
    tensor = good_tensor()
    tensor[1, :3] = 1e5  # float16 max is 65504
    folder = write_adapter(tmp_path / "t", good_config(), {"prompt_embeddings": tensor})
    with pytest.raises(
        PromptError, match="3 value\\(s\\) that become inf .*float16 .*largest magnitude 1e\\+05"
    ):
        read(folder, dtype=torch.float16)


def test_float64_overflowing_float32(tmp_path: Path) -> None:
    tensor = good_tensor().double()
    tensor[0, 0] = 1e39
    folder = write_adapter(tmp_path / "t", good_config(), {"prompt_embeddings": tensor})
    with pytest.raises(PromptError, match="become inf when cast to the model dtype float32"):
        read(folder)


@pytest.mark.parametrize("mangle", ["garbage", "empty", "truncated", "bad_header"])
def test_corrupt_safetensors(tmp_path: Path, mangle: str) -> None:
    folder = write_adapter(tmp_path / "t", good_config(), {"prompt_embeddings": good_tensor()})
    path = folder / "adapter_model.safetensors"
    data = path.read_bytes()
    corrupted = {
        "garbage": b"\x00\x01 this is not safetensors",
        "empty": b"",
        "truncated": data[: len(data) - 7],
        "bad_header": data[:8] + b"{" * (len(data) - 8),
    }[mangle]
    path.write_bytes(corrupted)
    with pytest.raises(PromptError, match="adapter_model.safetensors is not a readable safetensors file"):
        read(folder)


def test_pickle_file_is_never_unpickled(tmp_path: Path) -> None:
    # A torch.save (pickle) file under the safetensors name must be rejected as corrupt, not loaded.
    folder = write_adapter(tmp_path / "t", good_config(), None)
    torch.save({"prompt_embeddings": good_tensor()}, folder / "adapter_model.safetensors")
    with pytest.raises(PromptError, match="not a readable safetensors file"):
        read(folder)
