"""Hot reload: a thread that polls the store folder and applies changes to the registry.

Polling (stat of each task folder's two adapter files every `interval` seconds) works on every
filesystem, including network mounts and container volumes where inotify events never arrive.
Requests already running keep the `SoftPrompt` they started with, so a reload never disturbs them.
"""

from __future__ import annotations

import logging
import threading

from server.prompts.registry import Registry

log = logging.getLogger("softmux.prompts")


class StoreWatcher:
    def __init__(self, registry: Registry, interval: float = 1.0) -> None:
        self.registry = registry
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="softmux-store-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.registry.refresh()
            except Exception:  # never let one bad look end hot reload
                log.exception("store refresh failed")
