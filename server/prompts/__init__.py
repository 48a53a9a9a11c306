"""Soft-prompt tasks: the store on disk (PEFT adapter folders) and the in-memory registry."""

from server.prompts.registry import Registry
from server.prompts.store import TASK_NAME_RE, read_adapter, validate_task_name
from server.prompts.types import PromptError, PromptKind, SoftPrompt

__all__ = [
    "TASK_NAME_RE",
    "PromptError",
    "PromptKind",
    "Registry",
    "SoftPrompt",
    "read_adapter",
    "validate_task_name",
]
