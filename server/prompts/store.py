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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load

from server.prompts.settings import (
    DEFAULT_SETTINGS,
    MAX_SETTINGS_BYTES,
    SETTINGS_FILE,
    SettingsError,
    TaskSettings,
    parse_settings,
)
from server.prompts.types import PromptError, PromptGeometry, PromptKind, SoftPrompt

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


def read_adapter(folder: Path, geometry: PromptGeometry) -> SoftPrompt:
    """Read a folder that holds exactly one task (every kind but multitask prompt tuning)."""
    prompts = read_task_folder(folder, geometry)
    if len(prompts) != 1:
        raise PromptError(f"{folder.name} holds {len(prompts)} tasks; expected one")
    return prompts[0]


def read_task_folder(folder: Path, geometry: PromptGeometry) -> list[SoftPrompt]:
    """Read, validate and convert one adapter folder into its tasks; raise PromptError saying why not.

    Every kind gives one task named after the folder, except MULTITASK_PROMPT_TUNING, which gives
    one task per sub-task, named `<folder>.<t>`. Tensors are cast to the geometry's dtype, on its
    device, contiguous; its `kv_shape` is needed to accept PREFIX_TUNING.
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
    digest = content_hash(config_bytes, weights_bytes)
    settings = read_settings(folder)
    dtype, dev = geometry.dtype, geometry.device

    if kind is PromptKind.PREFIX_TUNING:
        kv = _read_prefix(tensors, config, geometry)  # [L, 2, H_kv, P, D]
        kv = _cast_checked(kv, dtype=dtype, device=dev)
        return [
            SoftPrompt(
                name=folder.name,
                kind=kind,
                embeddings=None,
                content_hash=digest,
                source=folder,
                prefix_kv=kv,
                settings=settings,
            )
        ]
    if kind is PromptKind.MULTITASK_PROMPT_TUNING:
        per_task = _read_multitask(tensors, config, geometry)  # T x [P, H]
        return [
            SoftPrompt(
                name=f"{folder.name}.{t}",
                kind=kind,
                embeddings=_cast_checked(e, dtype=dtype, device=dev),
                content_hash=f"{digest}:{t}",
                source=folder,
                settings=settings,
            )
            for t, e in enumerate(per_task)
        ]
    embeddings = _read_prompt_embeddings(tensors, config, kind, geometry)  # [P, H] in the file's dtype
    embeddings = _cast_checked(embeddings, dtype=dtype, device=dev)
    return [
        SoftPrompt(
            name=folder.name,
            kind=kind,
            embeddings=embeddings,
            content_hash=digest,
            source=folder,
            settings=settings,
        )
    ]


def read_settings(folder: Path) -> TaskSettings:
    """The folder's optional task.json (weight, queue quota, priority class); the defaults without one.
    Not part of the content hash: settings never change a prompt's keys and values."""
    if not (folder / SETTINGS_FILE).exists():
        return DEFAULT_SETTINGS
    try:
        return parse_settings(_read_bytes(folder / SETTINGS_FILE, MAX_SETTINGS_BYTES))
    except SettingsError as e:
        raise PromptError(str(e)) from None


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
    supported = ", ".join(k.value for k in PromptKind)
    if "peft_type" not in config:
        raise PromptError(f"{CONFIG_FILE} has no 'peft_type'; supported: {supported}")
    peft_type = config["peft_type"]
    if not isinstance(peft_type, str):
        raise PromptError(
            f"{CONFIG_FILE} 'peft_type' must be a string, found {peft_type!r}; supported: {supported}"
        )
    try:
        kind = PromptKind(peft_type)
    except ValueError:
        kind = None
    if kind is None:
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
# tensors to serve (in the file's dtype; casting comes after).


def _floating(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise PromptError(f"{name} has dtype {_dtype_name(t.dtype)}; a floating-point dtype is required")


def _check_count(num_tokens: int, geometry: PromptGeometry) -> None:
    if not 1 <= num_tokens <= geometry.max_virtual_tokens:
        raise PromptError(
            f"{EMBEDDINGS_KEY} has {num_tokens} virtual tokens; allowed: 1 to {geometry.max_virtual_tokens}"
        )


def _read_prompt_embeddings(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], kind: PromptKind, geometry: PromptGeometry
) -> torch.Tensor:
    """PROMPT_TUNING and P_TUNING: one `prompt_embeddings` tensor [P, hidden].

    For P_TUNING, PEFT's save_pretrained stores the prompt encoder's output, not its weights, so
    the tensor is served as is and the encoder never runs.
    """
    _expect_keys(tensors, {EMBEDDINGS_KEY})
    emb = tensors[EMBEDDINGS_KEY]
    _floating(EMBEDDINGS_KEY, emb)
    hidden_size = geometry.hidden_size
    if emb.dim() != 2:
        raise PromptError(
            f"{EMBEDDINGS_KEY} has shape {list(emb.shape)} ({emb.dim()}-D); "
            f"{kind.value} needs 2-D [num_virtual_tokens, {hidden_size}]"
        )
    num_tokens, width = emb.shape
    if width != hidden_size:
        raise PromptError(
            f"{EMBEDDINGS_KEY} has hidden size {width} (shape {list(emb.shape)}); "
            f"the model's hidden size is {hidden_size}"
        )
    _check_count(num_tokens, geometry)
    _check_num_virtual_tokens(config, num_tokens)
    return emb  # [P, H]


def _read_prefix(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], geometry: PromptGeometry
) -> torch.Tensor:
    """PREFIX_TUNING: `prompt_embeddings` [P, num_layers*2*kv_heads*head_dim] -> [L, 2, H_kv, P, D].

    PEFT lays a token's row out as (layer, key|value, kv head, head dim): layer i's key is slice
    2i, its value 2i+1. Keys are stored without rotary encoding, as the cache holds them.
    """
    shape = geometry.kv_shape
    if shape is None:
        raise PromptError("PREFIX_TUNING needs the model's layer geometry, which this server did not provide")
    _expect_keys(tensors, {EMBEDDINGS_KEY})
    emb = tensors[EMBEDDINGS_KEY]
    _floating(EMBEDDINGS_KEY, emb)
    layers, heads, dim = shape.num_layers, shape.num_kv_heads, shape.head_dim
    width = layers * 2 * heads * dim
    for key, want in (("num_layers", layers), ("token_dim", heads * dim)):
        got = _config_int(config, key)
        if got is not None and got != want:
            raise PromptError(
                f"{CONFIG_FILE} '{key}' is {got}; the model needs {want} ({layers} layers, "
                f"{heads} KV heads of dimension {dim})"
            )
    if emb.dim() != 2 or emb.shape[1] != width:
        raise PromptError(
            f"{EMBEDDINGS_KEY} has shape {list(emb.shape)}; PREFIX_TUNING for this model needs "
            f"[num_virtual_tokens, {width}] = num_layers {layers} x 2 x KV heads {heads} x head dim {dim}"
        )
    num_tokens = emb.shape[0]
    _check_count(num_tokens, geometry)
    _check_num_virtual_tokens(config, num_tokens)
    kv = emb.view(num_tokens, layers * 2, heads, dim).permute(1, 2, 0, 3)  # [L*2, H_kv, P, D]
    return kv.reshape(layers, 2, heads, num_tokens, dim)


MULTITASK_KEYS = {EMBEDDINGS_KEY, "prefix_task_cols", "prefix_task_rows"}


def _read_multitask(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], geometry: PromptGeometry
) -> list[torch.Tensor]:
    """MULTITASK_PROMPT_TUNING: sub-task t's prompt is E * (cols[t] @ rows[t]), each [P, H]."""
    _expect_keys(tensors, MULTITASK_KEYS)
    emb, cols, rows = (tensors[k] for k in (EMBEDDINGS_KEY, "prefix_task_cols", "prefix_task_rows"))
    for name, t in zip(("prompt_embeddings", "prefix_task_cols", "prefix_task_rows"), (emb, cols, rows)):
        _floating(name, t)
    hidden = geometry.hidden_size
    if emb.dim() != 2 or emb.shape[1] != hidden:
        raise PromptError(
            f"{EMBEDDINGS_KEY} has shape {list(emb.shape)}; needs [num_virtual_tokens, {hidden}]"
        )
    num_tokens = emb.shape[0]
    _check_count(num_tokens, geometry)
    _check_num_virtual_tokens(config, num_tokens)
    if (
        cols.dim() != 3
        or rows.dim() != 3
        or cols.shape[0] != rows.shape[0]
        or cols.shape[1] != num_tokens
        or rows.shape[2] != hidden
        or cols.shape[2] != rows.shape[1]
    ):
        raise PromptError(
            f"prefix_task_cols {list(cols.shape)} and prefix_task_rows {list(rows.shape)} do not fit; "
            f"need [T, {num_tokens}, r] and [T, r, {hidden}]"
        )
    declared = _config_int(config, "num_tasks")
    if declared is not None and declared != cols.shape[0]:
        raise PromptError(
            f"{CONFIG_FILE} says num_tasks={declared} but the tensors hold {cols.shape[0]} sub-tasks"
        )
    e, c, r = emb.double(), cols.double(), rows.double()
    return [e * (c[t] @ r[t]) for t in range(cols.shape[0])]  # T x [P, H]


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
            f"{_dtype_name(dtype)} (largest magnitude {largest:.4g}; "
            f"{_dtype_name(dtype)} holds up to {limit:.4g})"
        )
    return cast.to(device).contiguous()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
