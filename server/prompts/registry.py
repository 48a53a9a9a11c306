"""The in-memory set of servable tasks, loaded from the store folder.

One folder per task; a folder that fails validation is skipped and remembered with its reason,
so one bad upload never takes the server down and `GET /tasks` can say what is wrong.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.prompts.settings import SETTINGS_FILE, TaskSettings
from server.prompts.store import CONFIG_FILE, WEIGHTS_FILE, read_task_folder, validate_task_name
from server.prompts.types import PromptError, PromptGeometry, PromptKind, SoftPrompt

logger = logging.getLogger("softmux.prompts")

Signature = tuple[tuple[str, int, int], ...]  # (file, mtime_ns, size) of a folder's adapter files


@dataclass(frozen=True)
class TaskInfo:
    """What the registry knows about a servable task without holding its tensors."""

    name: str
    folder: Path
    kind: PromptKind
    num_virtual_tokens: int
    content_hash: str
    created: float  # mtime of the adapter weights file (seconds since the epoch)
    settings: TaskSettings  # the folder's task.json (defaults without one)


def folder_signature(folder: Path) -> Signature | None:
    """Cheap change detector for hot reload: stat of the adapter files and task.json;
    None if the folder is gone."""
    out = []
    for name in (CONFIG_FILE, WEIGHTS_FILE, SETTINGS_FILE):
        try:
            st = (folder / name).stat()
        except OSError:
            if not folder.is_dir():
                return None
            out.append((name, -1, -1))
            continue
        out.append((name, st.st_mtime_ns, st.st_size))
    return tuple(out)


class Registry:
    """Thread-safe map of task name -> SoftPrompt, plus the folders that failed and why.

    The HTTP threads read while a reload (hot reload, admin uploads) writes, so every access
    takes the lock; a reload builds new maps and swaps them in at once, so readers never see a
    half-loaded store. Single folders change with `load_folder` / `remove_folder`; `refresh`
    applies whatever changed on disk since the last look (the store watcher calls it).

    Memory: at most `max_resident` prompts keep their tensors loaded (least recently used are
    dropped first, None: no bound); a dropped prompt is read again from disk on its next `get`.
    Requests keep the `SoftPrompt` they started with, so dropping or replacing never affects them.
    """

    def __init__(
        self,
        store: Path,
        geometry: PromptGeometry,
        *,
        max_resident: int | None = None,
        check_settings: Callable[[TaskSettings], None] | None = None,
    ) -> None:
        """`check_settings`: raises ValueError for a task.json the server cannot honour (its output
        contract does not compile for this model's tokenizer); such a task is refused with the reason."""
        self.store = Path(store)
        self.geometry = geometry
        self.check_settings = check_settings
        self.max_resident = max_resident
        self._lock = threading.Lock()
        self._info: dict[str, TaskInfo] = {}  # every servable task
        self._prompts: OrderedDict[str, SoftPrompt] = (
            OrderedDict()
        )  # resident ones, least recently used first
        self._failures: dict[str, str] = {}
        self._folders: dict[str, tuple[Signature | None, list[str]]] = {}  # folder -> (signature, task names)
        self._missing: set[str] = set()  # folders seen gone once (removal needs two looks: see refresh)
        self._write = threading.Lock()  # one writer at a time (watcher, admin API); readers use _lock

    def read(self, folder: Path) -> list[SoftPrompt]:
        """Read one adapter folder (one task, or one per sub-task) with this registry's model limits,
        its task.json checked against the server (its output contract compiled)."""
        prompts = read_task_folder(folder, self.geometry)
        if self.check_settings is not None and prompts:
            try:
                self.check_settings(prompts[0].settings)
            except ValueError as e:
                raise PromptError(f"{SETTINGS_FILE}: {e}") from None
        return prompts

    def load_all(self) -> None:
        """(Re)scan the store: load every valid task folder, record every invalid one with its reason."""
        with self._write:
            folders = self._task_folders()
            infos: dict[str, TaskInfo] = {}
            prompts: dict[str, SoftPrompt] = {}
            failures: dict[str, str] = {}
            seen: dict[str, tuple[Signature | None, list[str]]] = {}
            folder_names = {f.name for f in folders}
            for folder in folders:
                sig = folder_signature(folder)
                try:
                    loaded = self._read_checked(folder, folder_names, taken=set(infos))
                    prompts.update((p.name, p) for p in loaded)
                    infos.update((p.name, self._info_of(p)) for p in loaded)
                    seen[folder.name] = (sig, [p.name for p in loaded])
                except PromptError as e:
                    failures[folder.name] = e.reason
                    seen[folder.name] = (sig, [])
                    logger.warning("skipping task folder %r in %s: %s", folder.name, self.store, e.reason)
            with self._lock:
                self._info, self._failures, self._folders = infos, failures, seen
                self._prompts = OrderedDict(sorted(prompts.items()))
                self._missing.clear()
                self._trim()
        logger.info(
            "loaded %d task(s) from %s%s",
            len(infos),
            self.store,
            f", skipped {len(failures)}" if failures else "",
        )

    def _read_checked(self, folder: Path, folder_names: set[str], taken: set[str]) -> list[SoftPrompt]:
        loaded = self.read(folder)
        # A multitask sub-task `<folder>.<t>` must not shadow a folder of that name.
        clash = [
            p.name for p in loaded if p.name != folder.name and (p.name in folder_names or p.name in taken)
        ]
        if clash:
            raise PromptError(f"sub-task name(s) {clash} collide with existing task names")
        return loaded

    @staticmethod
    def _info_of(p: SoftPrompt) -> TaskInfo:
        try:
            created = (p.source / WEIGHTS_FILE).stat().st_mtime
        except OSError:
            created = 0.0
        return TaskInfo(
            name=p.name,
            folder=p.source,
            kind=p.kind,
            num_virtual_tokens=p.num_virtual_tokens,
            content_hash=p.content_hash,
            created=created,
            settings=p.settings,
        )

    def _trim(self) -> None:
        """Drop least recently used tensors beyond the bound (caller holds _lock)."""
        if self.max_resident is None:
            return
        while len(self._prompts) > max(0, self.max_resident):
            name, _ = self._prompts.popitem(last=False)
            logger.debug("dropped task %r from memory (least recently used)", name)

    # ---- single-folder changes (admin API, hot reload) -----------------------------------------
    def load_folder(self, name: str) -> list[SoftPrompt]:
        """Read `store/name` and add or replace its task(s);
        raises PromptError (the registry is then unchanged)."""
        validate_task_name(name)
        with self._write:
            return self._load_folder(self.store / name)

    def _load_folder(self, folder: Path) -> list[SoftPrompt]:
        sig = folder_signature(folder)
        with self._lock:
            old_names = set(self._folders.get(folder.name, (None, []))[1])
            taken = set(self._info) - old_names
        folder_names = {f.name for f in self._task_folders()}
        try:
            loaded = self._read_checked(folder, folder_names, taken)
        except PromptError as e:
            with self._lock:  # remembered: not retried until the files change; its tasks still listed
                self._folders[folder.name] = (sig, sorted(old_names))
            raise e
        with self._lock:
            for n in old_names:
                self._info.pop(n, None)
                self._prompts.pop(n, None)
            for p in loaded:
                self._info[p.name] = self._info_of(p)
                self._prompts[p.name] = p
            self._folders[folder.name] = (sig, [p.name for p in loaded])
            self._failures.pop(folder.name, None)
            self._missing.discard(folder.name)
            self._trim()
        return loaded

    def remove_folder(self, name: str) -> list[str]:
        """Forget the task(s) of folder `name` (the files are the caller's business);
        returns the task names."""
        with self._write:
            return self._forget(name)

    def _forget(self, folder_name: str) -> list[str]:
        with self._lock:
            _, names = self._folders.pop(folder_name, (None, []))
            for n in names:
                self._info.pop(n, None)
                self._prompts.pop(n, None)
            self._failures.pop(folder_name, None)
            self._missing.discard(folder_name)
        return names

    def refresh(self) -> dict[str, list[str]]:
        """Apply what changed in the store since the last look; returns {"loaded", "removed", "failed"}
        folder names.

        A folder counts as removed only when two consecutive looks miss it: replacing a task renames
        the old folder aside and the new one in, and a look between the two renames must not drop it.
        """
        changes: dict[str, list[str]] = {"loaded": [], "removed": [], "failed": []}
        with self._write:
            present = {f.name: f for f in self._task_folders()}
            with self._lock:
                known = dict(self._folders)
            for name in sorted(set(known) - set(present)):
                if name in self._missing:
                    self._forget(name)
                    changes["removed"].append(name)
                    logger.info("task folder %r left the store; no longer served", name)
                else:
                    self._missing.add(name)
            for name, folder in sorted(present.items()):
                self._missing.discard(name)
                sig = folder_signature(folder)
                if name in known and known[name][0] == sig:
                    continue
                try:
                    self._load_folder(folder)
                    changes["loaded"].append(name)
                    logger.info("task folder %r (re)loaded from the store", name)
                except PromptError as e:
                    self._forget(name)
                    with self._lock:
                        self._folders[name] = (sig, [])
                        self._failures[name] = e.reason
                    changes["failed"].append(name)
                    logger.warning("skipping task folder %r in %s: %s", name, self.store, e.reason)
        return changes

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
        """The task's prompt, read again from disk if it was dropped from memory; None if unknown."""
        with self._lock:
            prompt = self._prompts.get(name)
            if prompt is not None:
                self._prompts.move_to_end(name)
                return prompt
            info = self._info.get(name)
        if info is None:
            return None
        try:
            loaded = {p.name: p for p in self.read(info.folder)}
        except PromptError as e:  # changed or gone on disk since: the watcher will catch up
            logger.warning("cannot reload task %r from %s: %s", name, info.folder, e.reason)
            return None
        prompt = loaded.get(name)
        if prompt is None:
            return None
        with self._lock:
            if self._info.get(name) is not info:  # replaced or removed meanwhile
                return self._prompts.get(name)
            if (
                prompt.content_hash != info.content_hash or prompt.settings != info.settings
            ):  # changed on disk: serve that
                self._info[name] = self._info_of(prompt)
            self._prompts[name] = prompt
            self._trim()
        return prompt

    def info(self, name: str) -> TaskInfo | None:
        with self._lock:
            return self._info.get(name)

    def resident(self) -> list[str]:
        """Tasks whose tensors are in memory, least recently used first."""
        with self._lock:
            return list(self._prompts)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._info)

    def tasks(self) -> list[SoftPrompt]:
        """All servable tasks, sorted by name (reads dropped ones back from disk)."""
        return [p for p in (self.get(n) for n in self.names()) if p is not None]

    def failures(self) -> dict[str, str]:
        """{folder name: reason} for every folder skipped by the last load; a copy."""
        with self._lock:
            return dict(sorted(self._failures.items()))

    def describe(self) -> dict[str, Any]:
        """The JSON body of `GET /tasks`."""
        with self._lock:
            infos, failures = dict(self._info), dict(self._failures)
        return {
            "tasks": [
                {
                    "name": p.name,
                    "peft_type": p.kind.value,
                    "num_virtual_tokens": p.num_virtual_tokens,
                    # cache entries in front of every request of this task
                    "prefix_length": p.num_virtual_tokens,
                    "folder": p.folder.name,
                    "settings": p.settings.shown(),
                }
                for p in (infos[n] for n in sorted(infos))
            ],
            "failed": [{"folder": f, "reason": failures[f]} for f in sorted(failures)],
        }

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._info

    def __len__(self) -> int:
        with self._lock:
            return len(self._info)
