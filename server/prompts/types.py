"""Value types shared by the soft-prompt store, the registry and the engine."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch


class PromptKind(str, Enum):
    """PEFT prompt-learning methods softmux can serve.

    Values are PEFT's own `peft_type` strings, so `PromptKind(config["peft_type"])` parses a
    config. Adding a kind means adding a member here and a tensor reader in `store.py`.
    """

    PROMPT_TUNING = "PROMPT_TUNING"
    # The saved tensor is already the encoder's output; it is served like PROMPT_TUNING.
    P_TUNING = "P_TUNING"


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
    embeddings: torch.Tensor  # [P, H] in model dtype and on the model's device, contiguous
    content_hash: str  # sha256 over adapter_config.json and adapter_model.safetensors bytes
    source: Path  # the adapter folder it was read from

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def peft_type(self) -> str:
        return self.kind.value
