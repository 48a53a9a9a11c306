"""Value types shared by the soft-prompt store, the registry and the engine."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from server.prompts.settings import DEFAULT_SETTINGS, TaskSettings

if TYPE_CHECKING:
    from server.models import LoadedModel


class PromptKind(str, Enum):
    """PEFT prompt-learning methods softmux can serve.

    Values are PEFT's own `peft_type` strings, so `PromptKind(config["peft_type"])` parses a
    config. Adding a kind means adding a member here and a tensor reader in `store.py`.
    """

    PROMPT_TUNING = "PROMPT_TUNING"
    # The saved tensor is already the encoder's output; it is served like PROMPT_TUNING.
    P_TUNING = "P_TUNING"
    # A per-layer key/value prefix: no embeddings, inserted into the cache as it is.
    PREFIX_TUNING = "PREFIX_TUNING"
    # One shared prompt modulated per sub-task; each sub-task is served as its own task.
    MULTITASK_PROMPT_TUNING = "MULTITASK_PROMPT_TUNING"


@dataclass(frozen=True)
class KVShape:
    """The model geometry a key/value prefix must match."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: Any) -> KVShape:
        """From a transformers model config (grouped-query attention aware)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(text.num_hidden_layers, getattr(text, "num_key_value_heads", None) or heads, head_dim)


@dataclass(frozen=True)
class PromptGeometry:
    """What an adapter folder must fit to be served by a model, and what its tensors become.

    One object for the store's reader, the registry and training: the model's hidden size and
    key/value layout, the largest prompt accepted, and the dtype and device tensors are cast to.
    """

    hidden_size: int
    max_virtual_tokens: int
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    kv_shape: KVShape | None = None  # the model's layers, KV heads, head dim: needed to accept PREFIX_TUNING

    @classmethod
    def of(
        cls, lm: LoadedModel, max_virtual_tokens: int, *, device: torch.device | str | None = None
    ) -> PromptGeometry:
        """For a loaded model (prompts land on its device unless `device` says otherwise)."""
        return cls(
            hidden_size=lm.hidden_size,
            max_virtual_tokens=max_virtual_tokens,
            dtype=lm.dtype,
            device=torch.device(lm.device if device is None else device),
            kv_shape=KVShape.of(lm.model.config),
        )


class PromptError(ValueError):
    """An adapter folder or task name that cannot be served; `reason` is meant for humans."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# eq=False: a field-wise __eq__ would compare tensors, whose truth value is ambiguous;
# identity equality is what callers need (compare `content_hash` for "same content").
@dataclass(frozen=True, eq=False)
class SoftPrompt:
    name: str
    kind: PromptKind
    embeddings: torch.Tensor | None  # [P, H] in model dtype and on the model's device; None for prefix tuning
    content_hash: str  # sha256 over adapter_config.json and adapter_model.safetensors bytes
    source: Path  # the adapter folder it was read from
    prefix_kv: torch.Tensor | None = (
        None  # [num_layers, 2, H_kv, P, D]: keys then values (prefix tuning only)
    )
    settings: TaskSettings = DEFAULT_SETTINGS  # the folder's task.json: weight, queue quota, priority class

    @property
    def num_virtual_tokens(self) -> int:
        if self.embeddings is not None:
            return int(self.embeddings.shape[0])
        assert self.prefix_kv is not None
        return int(self.prefix_kv.shape[3])

    @property
    def cache_key(self) -> tuple[str, str]:
        """Identifies this exact prompt: a replaced task gets a new key, so stale caches never match."""
        return (self.name, self.content_hash)

    @property
    def peft_type(self) -> str:
        return self.kind.value
