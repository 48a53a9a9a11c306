"""The in-memory set of servable tasks, loaded from the store folder.

One folder per task; a folder that fails validation is skipped and remembered with its reason,
so one bad upload never takes the server down and `GET /tasks` can say what is wrong.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import torch

from server.prompts.store import read_task_folder
from server.prompts.types import KVShape, PromptError, SoftPrompt

logger = logging.getLogger("softmux.prompts")


class Registry:
    """Thread-safe map of task name -> SoftPrompt, plus the folders that failed and why.

    The HTTP threads read while a reload (later: hot reload, admin uploads) writes, so every
    access takes the lock; a reload builds new maps and swaps them in at once, so readers never
    see a half-loaded store.
    """

    def __init__(
        self,
        store: Path,
        *,
        hidden_size: int,
        max_virtual_tokens: int,
        dtype: torch.dtype,
        device: torch.device | str,
        kv_shape: KVShape | None = None,
    ) -> None:
        self.store = Path(store)
        self.hidden_size = hidden_size
        self.max_virtual_tokens = max_virtual_tokens
        self.dtype = dtype
        self.device = torch.device(device)
        self.kv_shape = kv_shape
        self._lock = threading.Lock()
        self._prompts: dict[str, SoftPrompt] = {}
        self._failures: dict[str, str] = {}

    def read(self, folder: Path) -> list[SoftPrompt]:
        """Read one adapter folder (one task, or one per sub-task) with this registry's model limits."""
        return read_task_folder(
            folder,
            hidden_size=self.hidden_size,
            max_virtual_tokens=self.max_virtual_tokens,
            dtype=self.dtype,
            device=self.device,
            kv_shape=self.kv_shape,
        )

    def load_all(self) -> None:
        """(Re)scan the store: load every valid task folder, record every invalid one with its reason."""
        prompts: dict[str, SoftPrompt] = {}
        failures: dict[str, str] = {}
        folders = self._task_folders()
        folder_names = {f.name for f in folders}
        for folder in folders:
            try:
                loaded = self.read(folder)
                # A multitask sub-task `<folder>.<t>` must not shadow a folder of that name.
                clash = [p.name for p in loaded if p.name != folder.name and (p.name in folder_names or p.name in prompts)]
                if clash:
                    raise PromptError(f"sub-task name(s) {clash} collide with existing task names")
                prompts.update((p.name, p) for p in loaded)
            except PromptError as e:
                failures[folder.name] = e.reason
                logger.warning("skipping task folder %r in %s: %s", folder.name, self.store, e.reason)
        with self._lock:
            self._prompts, self._failures = prompts, failures
        logger.info(
            "loaded %d task(s) from %s%s",
            len(prompts),
            self.store,
            f", skipped {len(failures)}" if failures else "",
        )

    def _task_folders(self) -> list[Path]:
        if not self.store.is_dir():
            # An empty server is still useful (admin uploads, base model health checks).
            logger.warning("prompt store %s does not exist or is not a folder; serving no tasks", self.store)
            return []
        try:
            entries = sorted(self.store.iterdir())
        except OSError as e:
            logger.warning("cannot list prompt store %s: %s; serving no tasks", self.store, e)
            return []
        # Hidden folders are ignored: they are the place for in-progress uploads and tooling state.
        return [p for p in entries if p.is_dir() and not p.name.startswith(".")]

    def get(self, name: str) -> SoftPrompt | None:
        with self._lock:
            return self._prompts.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._prompts)

    def tasks(self) -> list[SoftPrompt]:
        """All servable tasks, sorted by name."""
        with self._lock:
            return [self._prompts[n] for n in sorted(self._prompts)]

    def failures(self) -> dict[str, str]:
        """{folder name: reason} for every folder skipped by the last load; a copy."""
        with self._lock:
            return dict(sorted(self._failures.items()))

    def describe(self) -> dict[str, Any]:
        """The JSON body of `GET /tasks`."""
        with self._lock:
            prompts, failures = dict(self._prompts), dict(self._failures)
        return {
            "tasks": [
                {
                    "name": p.name,
                    "peft_type": p.kind.value,
                    "num_virtual_tokens": p.num_virtual_tokens,
                    "prefix_length": p.num_virtual_tokens,  # cache entries in front of every request of this task
                    "folder": p.source.name,
                }
                for p in (prompts[n] for n in sorted(prompts))
            ],
            "failed": [{"folder": f, "reason": failures[f]} for f in sorted(failures)],
        }

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._prompts

    def __len__(self) -> int:
        with self._lock:
            return len(self._prompts)
