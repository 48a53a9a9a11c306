"""Atomic changes to the store folder: new task folders appear whole or not at all.

Every writer (`softmux train`, `PUT /tasks/{name}`) writes into a hidden temporary folder inside
the store (`.<name>.tmp-XXXX`: hidden folders are never served), validates it there, and only
then renames it into place. A rename within one filesystem is atomic, so a crash at any point
leaves either the old task, the new task, or a hidden leftover that the next start cleans up.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from server.prompts.store import validate_task_name

log = logging.getLogger("softmux.prompts")
T = TypeVar("T")

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"


def temp_folder(store: Path, name: str) -> Path:
    """A fresh hidden folder in `store` for writing task `name` (world-readable: the store is shared)."""
    validate_task_name(name)
    store.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}{TMP_MARK}", dir=store))
    tmp.chmod(0o755)
    return tmp


def check_folder(tmp: Path, name: str, read: Callable[[Path], T]) -> T:
    """Run `read` (e.g. `Registry.read`) on the hidden folder `tmp` as if it were named `name`.

    The store's reader takes the task name from the folder name, which a hidden temp folder does
    not have; a symlink named `name` in a private temp dir (never in the store) stands in for it.
    """
    with tempfile.TemporaryDirectory(prefix="softmux-check-") as d:
        link = Path(d) / name
        link.symlink_to(Path(tmp).resolve(), target_is_directory=True)
        return read(link)


def install(store: Path, name: str, tmp: Path) -> None:
    """Move the finished folder `tmp` to `store/name`, replacing any task of that name.

    Replacing renames the old folder aside first (hidden), renames the new one in, then deletes
    the old one: the task is absent only between two renames (microseconds), never half-written.
    """
    validate_task_name(name)
    for f in tmp.iterdir():
        f.chmod(0o644)  # safetensors and mkstemp write private files
    target = store / name
    aside: Path | None = None
    if target.exists():
        aside = store / f".{name}{OLD_MARK}{os.getpid()}-{time.monotonic_ns()}"
        os.rename(target, aside)
    try:
        os.rename(tmp, target)
    except OSError:
        if aside is not None:  # put the old task back
            os.rename(aside, target)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def remove(store: Path, name: str) -> bool:
    """Delete task folder `store/name` atomically (rename aside, then delete); False if absent."""
    validate_task_name(name)
    target = store / name
    if not target.is_dir():
        return False
    aside = store / f".{name}{OLD_MARK}{os.getpid()}-{time.monotonic_ns()}"
    os.rename(target, aside)
    shutil.rmtree(aside, ignore_errors=True)
    return True


def clean_leftovers(store: Path, older_than_s: float = 0.0) -> list[str]:
    """Delete hidden temp/aside folders left by crashed writers; returns their names.

    `older_than_s` spares folders a live writer (another process) may still be filling.
    """
    removed: list[str] = []
    if not store.is_dir():
        return removed
    now = time.time()
    for entry in store.iterdir():
        if not (entry.name.startswith(".") and (TMP_MARK in entry.name or OLD_MARK in entry.name)):
            continue
        try:
            if not entry.is_dir() or now - entry.stat().st_mtime < older_than_s:
                continue
        except OSError:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
        log.info("removed leftover %s from %s", entry.name, store)
    return removed
