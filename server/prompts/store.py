"""Reading and validating one soft-prompt task: a PEFT adapter folder on disk.

A task folder holds `adapter_config.json` and `adapter_model.safetensors`, exactly what PEFT's
`save_pretrained` writes; the folder name is the task name. Every check raises `PromptError`
with a reason that names what was found and what is allowed, because these reasons are shown
to whoever dropped the folder into the store (logs, `GET /tasks`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from safetensors.torch import load as safetensors_load

from server.prompts.types import PromptError, PromptKind, SoftPrompt

TASK_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
TASK_NAME_RULE = (
    "1-64 characters from lowercase a-z, digits 0-9, '.', '_' and '-', starting with a letter or digit"
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
EMBEDDINGS_KEY = "prompt_embeddings"

# Caps on what we read into memory, so a stray huge file is rejected instead of exhausting RAM.
# Generous on purpose: later kinds (prefix tuning) store num_layers * 2 * kv_dim values per token.
MAX_CONFIG_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 256 << 20


def validate_task_name(name: str) -> None:
    """Raise PromptError unless `name` is a valid task name (it is also a folder name and a URL part)."""
    if not isinstance(name, str):
        raise PromptError(f"task name must be a string, got {type(name).__name__}; allowed: {TASK_NAME_RULE}")
    # fullmatch, not match: `$` alone also matches before a trailing newline ("abc\n").
    if TASK_NAME_RE.fullmatch(name) is None:
        raise PromptError(f"invalid task name {name!r}: allowed names are {TASK_NAME_RULE}")


def read_adapter(
    folder: Path,
    *,
    hidden_size: int,
    max_virtual_tokens: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> SoftPrompt:
    """Read, validate and convert one adapter folder; raise PromptError saying why it cannot be served.

    The returned embeddings are cast to `dtype`, placed on `device` and contiguous.
    """
    folder = Path(folder)
    validate_task_name(folder.name)
    if not folder.is_dir():
        raise PromptError(f"adapter folder {str(folder)!r} does not exist or is not a folder")

    # Read each file once: the hash and the parsed content come from the same bytes.
    config_bytes = _read_bytes(folder / CONFIG_FILE, MAX_CONFIG_BYTES)
    config = _parse_config(config_bytes)
    kind = _parse_kind(config)
    weights_bytes = _read_bytes(folder / WEIGHTS_FILE, MAX_WEIGHTS_BYTES)
    tensors = _load_safetensors(weights_bytes)

    embeddings = _TENSOR_READERS[kind](
        tensors, config, kind, hidden_size=hidden_size, max_virtual_tokens=max_virtual_tokens
    )  # [P, H] in the file's dtype
    embeddings = _cast_checked(embeddings, dtype=dtype, device=torch.device(device))  # [P, H]
    return SoftPrompt(
        name=folder.name,
        kind=kind,
        embeddings=embeddings,
        content_hash=content_hash(config_bytes, weights_bytes),
        source=folder,
    )


def content_hash(config_bytes: bytes, weights_bytes: bytes) -> str:
    """sha256 over both files; each is length-prefixed so moving bytes between files changes the hash."""
    h = hashlib.sha256()
    for blob in (config_bytes, weights_bytes):
        h.update(len(blob).to_bytes(8, "little"))
        h.update(blob)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# File and config parsing


def _read_bytes(path: Path, limit: int) -> bytes:
    if not path.exists():
        raise PromptError(f"{path.name} is missing (a task folder needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    if not path.is_file():
        raise PromptError(f"{path.name} is not a regular file")
    try:
        size = path.stat().st_size
        if size > limit:
            raise PromptError(f"{path.name} is {size} bytes; at most {limit} bytes are accepted")
        with path.open("rb") as f:
            data = f.read(limit + 1)  # +1: notice a file that grew past the limit since stat()
    except OSError as e:
        raise PromptError(f"cannot read {path.name}: {e.strerror or e}") from e
    if len(data) > limit:
        raise PromptError(f"{path.name} is over {limit} bytes; at most {limit} bytes are accepted")
    return data


def _parse_config(data: bytes) -> dict[str, Any]:
    try:
        config = json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise PromptError(f"{CONFIG_FILE} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise PromptError(f"{CONFIG_FILE} must hold a JSON object, found a JSON {_json_type(config)}")
    return config


def _parse_kind(config: Mapping[str, Any]) -> PromptKind:
    supported = ", ".join(k.value for k in _TENSOR_READERS)
    if "peft_type" not in config:
        raise PromptError(f"{CONFIG_FILE} has no 'peft_type'; supported: {supported}")
    peft_type = config["peft_type"]
    if not isinstance(peft_type, str):
        raise PromptError(f"{CONFIG_FILE} 'peft_type' must be a string, found {peft_type!r}; supported: {supported}")
    try:
        kind = PromptKind(peft_type)
    except ValueError:
        kind = None
    if kind is None or kind not in _TENSOR_READERS:
        raise PromptError(f"unsupported peft_type {peft_type!r}; supported: {supported}")
    return kind


def _load_safetensors(data: bytes) -> dict[str, torch.Tensor]:
    # safetensors only: never torch.load/pickle, which can run code from the file.
    try:
        return safetensors_load(data)
    except Exception as e:  # SafetensorError subclasses Exception directly; other errors mean corrupt too
        raise PromptError(f"{WEIGHTS_FILE} is not a readable safetensors file: {e}") from e


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "null" if value is None else type(value).__name__


def _config_int(config: Mapping[str, Any], key: str) -> int | None:
    """An optional positive integer config field; None when absent or null."""
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PromptError(f"{CONFIG_FILE} '{key}' must be a positive integer, found {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Per-kind tensor readers: check the file's tensors against the config and the model, return the
# tensor to serve. Adding a kind means adding a reader and registering it in _TENSOR_READERS.

TensorReader = Callable[..., torch.Tensor]


def _read_prompt_embeddings(
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    kind: PromptKind,
    *,
    hidden_size: int,
    max_virtual_tokens: int,
) -> torch.Tensor:
    """PROMPT_TUNING and P_TUNING: one `prompt_embeddings` tensor [P, hidden].

    For P_TUNING, PEFT's save_pretrained stores the prompt encoder's output, not its weights, so
    the tensor is served as is and the encoder never runs.
    """
    _expect_keys(tensors, {EMBEDDINGS_KEY})
    emb = tensors[EMBEDDINGS_KEY]
    if not emb.is_floating_point():
        raise PromptError(f"{EMBEDDINGS_KEY} has dtype {_dtype_name(emb.dtype)}; a floating-point dtype is required")
    if emb.dim() != 2:
        raise PromptError(
            f"{EMBEDDINGS_KEY} has shape {list(emb.shape)} ({emb.dim()}-D); "
            f"{kind.value} needs 2-D [num_virtual_tokens, {hidden_size}]"
        )
    num_tokens, width = emb.shape
    if width != hidden_size:
        raise PromptError(
            f"{EMBEDDINGS_KEY} has hidden size {width} (shape {list(emb.shape)}); the model's hidden size is {hidden_size}"
        )
    if not 1 <= num_tokens <= max_virtual_tokens:
        raise PromptError(
            f"{EMBEDDINGS_KEY} has {num_tokens} virtual tokens; allowed: 1 to {max_virtual_tokens}"
        )
    _check_num_virtual_tokens(config, num_tokens)
    return emb  # [P, H]


def _check_num_virtual_tokens(config: Mapping[str, Any], num_rows: int) -> None:
    submodules = _config_int(config, "num_transformer_submodules")
    if submodules is not None and submodules != 1:
        # PEFT sets 2 for encoder-decoder models (one prompt per stack, stored as 2P rows);
        # prepending all rows to a decoder-only model would not be what was trained.
        raise PromptError(
            f"{CONFIG_FILE} 'num_transformer_submodules' is {submodules} (an encoder-decoder adapter); "
            "softmux serves decoder-only causal LMs, which need 1"
        )
    declared = _config_int(config, "num_virtual_tokens")
    expected_rows = None if declared is None else declared * (submodules or 1)
    if expected_rows is not None and expected_rows != num_rows:
        raise PromptError(
            f"{CONFIG_FILE} says num_virtual_tokens={declared} but {EMBEDDINGS_KEY} has {num_rows} rows"
        )


def _expect_keys(tensors: Mapping[str, torch.Tensor], expected: set[str]) -> None:
    found = set(tensors)
    if found == expected:
        return
    missing, extra = sorted(expected - found), sorted(found - expected)
    parts = []
    if missing:
        parts.append(f"missing tensor(s) {missing}")
    if extra:
        parts.append(f"unexpected tensor(s) {extra}")
    raise PromptError(f"{WEIGHTS_FILE}: {'; '.join(parts)}; expected exactly {sorted(expected)}")


_TENSOR_READERS: Mapping[PromptKind, TensorReader] = MappingProxyType(
    {
        PromptKind.PROMPT_TUNING: _read_prompt_embeddings,
        PromptKind.P_TUNING: _read_prompt_embeddings,
    }
)

SUPPORTED_KINDS: frozenset[PromptKind] = frozenset(_TENSOR_READERS)


# ---------------------------------------------------------------------------------------------
# Casting


def _cast_checked(tensor: torch.Tensor, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Cast to the model dtype, rejecting NaN/inf in the file and values that overflow in the cast."""
    exact = tensor.to(torch.float64)  # every float dtype converts to float64 exactly
    nan, inf = int(torch.isnan(exact).sum()), int(torch.isinf(exact).sum())
    if nan or inf:
        raise PromptError(f"{EMBEDDINGS_KEY} holds non-finite values in the file: {nan} NaN, {inf} inf")
    # Cast on the CPU (same rounding as on an accelerator) so the check does not sync a device.
    cast = tensor.to(dtype=dtype).contiguous()
    overflow = int((~torch.isfinite(cast)).sum())
    if overflow:
        largest = float(exact.abs().max())
        limit = torch.finfo(dtype).max
        raise PromptError(
            f"{EMBEDDINGS_KEY} has {overflow} value(s) that become inf when cast to the model dtype "
            f"{_dtype_name(dtype)} (largest magnitude {largest:.4g}; {_dtype_name(dtype)} holds up to {limit:.4g})"
        )
    return cast.to(device).contiguous()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
