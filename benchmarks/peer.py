"""The harness's side of vLLM's CPU build: benchmarks/peer_vllm.py run in `.peer-venv` (`make peer-venv`) as a
child process, one JSON line per command and per answer, and the environment vLLM's CPU build needs."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
from pathlib import Path

from benchmarks.common import ROOT

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


class PeerUnavailable(RuntimeError):
    pass


def peer_env(python: Path, threads: int) -> dict[str, str]:
    """The environment vLLM's CPU build runs in (also vs_vllm_http's server): tcmalloc and the venv's
    Intel OpenMP preloaded, OpenMP threads bound to the first `threads` cores, a 2 GiB key/value cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    preload = [p for p in (TCMALLOC, str(python.parent.parent / "lib" / "libiomp5.so")) if Path(p).exists()]
    env.update(
        LD_PRELOAD=":".join(preload),
        VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}",
        VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
        PYTHONUNBUFFERED="1",
    )
    return env


class Peer:
    """benchmarks/peer_vllm.py in .peer-venv: one LLM (dtype, max_num_seqs), JSON lines both ways."""

    def __init__(
        self,
        python: Path,
        model: str,
        workload: Path,
        dtype: str,
        max_num_seqs: int,
        new_tokens: int,
        threads: int,
        log: Path,
        startup_timeout: float,
    ) -> None:
        if not python.exists():
            raise PeerUnavailable(f"{python} does not exist (run `make peer-venv`)")
        env = peer_env(python, threads)
        self.log = log
        self._log = open(log, "a")
        self.proc = subprocess.Popen(
            [
                str(python),
                str(ROOT / "benchmarks" / "peer_vllm.py"),
                "--model",
                model,
                "--workload",
                str(workload),
                "--dtype",
                dtype,
                "--max-num-seqs",
                str(max_num_seqs),
                "--new-tokens",
                str(new_tokens),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.ready = self._read(startup_timeout)
        if "error" in self.ready:
            self.close()
            raise PeerUnavailable(f"vLLM did not start: {self.ready['error']}")

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _read(self, timeout: float) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise PeerUnavailable(f"vLLM worker gave no answer in {timeout:.0f} s; log: {self.log}") from None
        if line is None:
            self.proc.wait()
            tail = "".join(self.log.read_text(errors="replace").splitlines(keepends=True)[-15:])
            raise PeerUnavailable(
                f"vLLM worker exited with {self.proc.returncode}; log {self.log} ends:\n{tail}"
            )
        return json.loads(line)

    def ask(self, cmd: dict, timeout: float = 900) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        out = self._read(timeout)
        if "error" in out:
            raise PeerUnavailable(f"vLLM worker: {out['error']}")
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(60)
            except Exception:
                self.proc.kill()  # our own child, by its handle
                self.proc.wait()
        self._log.close()
