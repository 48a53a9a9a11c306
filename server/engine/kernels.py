"""softmux's CPU kernels (server/engine/csrc/: cpu_ops.cpp, attention.cpp, panel_linear.cpp, layers.cpp,
ops.h, vec8.h): built once per machine, loaded at start.

The build needs a C++ compiler (g++ or clang) and takes about a minute the first time; the library is
cached under `<cache_dir>/kernels/<key>`, keyed by the source, torch's version and this CPU's
instruction-set flags (it is compiled for this CPU: -march=native). Where it cannot be built or
loaded (no compiler, another platform), `load()` returns None, says why in the log once, and the
engine runs the same computation with torch ops. `--no-native-kernels` turns them off.

The boundary is typed twice: the library registers a pass's kernels as operators with schemas
(`torch.ops.softmux.*`, which arguments they write included; their output shapes are registered here), so
torch.compile and make_fx trace through them; and `Kernels` calls them behind one typed method each (the
shapes in its docstrings, the checks in the C++), so every call site is checked by mypy and nothing
leaks as `Any`. One library per process: the operator names are global.

`softmux build-kernels` builds them ahead of time (the Dockerfile and `make` call it); the first start
builds them otherwise.

Builds are safe against a build killed halfway (Ctrl-C during the first `make serve`, a worker shut
down): one process builds at a time under an OS file lock (released when its holder dies, unlike
torch's own lock file, which a killed build leaves behind and which made every later start wait
forever), and a library built once is imported as it is, from any checkout of the same sources (torch's
loader would rebuild it whenever the sources' path differs).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import torch

log = logging.getLogger("softmux.kernels")

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = [CSRC / name for name in ("cpu_ops.cpp", "attention.cpp", "panel_linear.cpp", "layers.cpp")]
HEADERS = [CSRC / "vec8.h", CSRC / "ops.h"]  # part of the build key, not compiled on their own
_lock = threading.Lock()
_loaded: dict[str, Kernels | None] = {}


class DecoderStack(Protocol):
    """Every layer of a llama-like decoder for one pass (csrc/layers.cpp), named to the op by `handle`."""

    @property
    def handle(self) -> int: ...


class Kernels:
    """The compiled kernels behind typed methods, one per kernel (csrc/ops.h has the C++ side).

    A pass's kernels are operators with schemas (`torch.ops.softmux.*`, registered by the library's
    TORCH_LIBRARY block; their output shapes by `_register_shapes`), so torch.compile and make_fx trace
    through them; the load-time helpers (packing weights) are plain functions of the module."""

    def __init__(self, module: ModuleType) -> None:
        self._m = module
        _register_shapes()
        ops = torch.ops.softmux  # each op's one overload, held: the packet would resolve it on every call
        self._decode_attention = ops.decode_attention.default
        self._rms_norm = ops.rms_norm.default
        self._rotary = ops.rotary.default
        self._silu_mul = ops.silu_mul.default
        self._greedy = ops.greedy.default
        self._panel_linear = ops.panel_linear.default
        self._decoder_stack = ops.decoder_stack.default

    @property
    def library(self) -> Path:
        """The compiled library file."""
        return Path(str(self._m.__file__))

    def decode_attention(
        self,
        q: torch.Tensor,  # [N, H, D]
        k_new: torch.Tensor,  # [N, H_kv, D]
        v_new: torch.Tensor,  # [N, H_kv, D]
        kpool: torch.Tensor,  # [H_kv, slots, D], written at `write`
        vpool: torch.Tensor,  # [H_kv, slots, D]
        write: torch.Tensor,  # [N] int64
        slots: torch.Tensor,  # [N, T] int64
        lengths: torch.Tensor,  # [N] int64
        scale: float,
    ) -> torch.Tensor:  # [N, H * D]
        out: torch.Tensor = self._decode_attention(
            q, k_new, v_new, kpool, vpool, write, slots, lengths, scale
        )
        return out

    def rms_norm(
        self, h: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, offset: float
    ) -> torch.Tensor:
        """h [N, C] (+= residual in place, when given) -> the norm of h, [N, C]."""
        out: torch.Tensor = self._rms_norm(h, residual, weight, eps, offset)
        return out

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """x [N, heads, D] rotated in place by cos/sin [N, D]."""
        self._rotary(x, cos, sin)

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up, [N, I]."""
        out: torch.Tensor = self._silu_mul(gate, up)
        return out

    def greedy(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [B, V] -> (argmax [B] int64, finite [B] bool)."""
        tokens, finite = self._greedy(logits)
        return tokens, finite

    def panel_linear_vectorized(self) -> bool:
        return bool(self._m.panel_linear_vectorized())

    def pack_panels(self, weight: torch.Tensor) -> torch.Tensor:
        """weight [N, K] -> panels [ceil(N / 16), K, 16], same dtype."""
        out: torch.Tensor = self._m.pack_panels(weight)
        return out

    def pack_panels_int8(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """weight [N, K] -> (int8 panels [ceil(N / 16), K, 16], per-channel scales [N] float32)."""
        panels, scales = self._m.pack_panels_int8(weight)
        return panels, scales

    def panel_linear(
        self,
        x: torch.Tensor,  # [M, K] contiguous
        panels: torch.Tensor,  # from pack_panels or pack_panels_int8
        n: int,
        bias: torch.Tensor | None,  # [n] float32
        scales: torch.Tensor | None = None,  # [n] float32, exactly for int8 panels
    ) -> torch.Tensor:  # [M, n] in x's dtype
        out: torch.Tensor = self._panel_linear(x, panels, n, bias, scales)
        return out

    def decoder_stack(
        self,
        norm_weights: list[torch.Tensor],  # per layer: input norm, post norm
        norm_eps: list[float],
        norm_offsets: list[float],
        panels: list[torch.Tensor],  # per layer: qkv, o, up, gate, down
        biases: list[torch.Tensor | None],
        out_features: list[int],
        scales: list[torch.Tensor | None],
        scalings: list[float],  # per layer
        heads: int,
        kv_heads: int,
        head_dim: int,
    ) -> DecoderStack:
        """A stack holding these weights (by reference) for `run_stack`; it lives as long as the object."""
        stack: DecoderStack = self._m.DecoderStack(
            norm_weights,
            norm_eps,
            norm_offsets,
            panels,
            biases,
            out_features,
            scales,
            scalings,
            heads,
            kv_heads,
            head_dim,
        )
        return stack

    def run_stack(
        self,
        stack: DecoderStack,
        h: torch.Tensor,  # [N, C] the residual stream, updated in place
        cos: torch.Tensor,  # [N, D] in h's dtype
        sin: torch.Tensor,  # [N, D]
        kpool: torch.Tensor,  # [L, H_kv, slots, D]
        vpool: torch.Tensor,  # [L, H_kv, slots, D]
        write: torch.Tensor,  # [N] int64
        slots: torch.Tensor,  # [N, T] int64
        lengths: torch.Tensor,  # [N] int64
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (h, the last layer's MLP output, not yet added)
        residual: torch.Tensor = self._decoder_stack(
            stack.handle, h, cos, sin, kpool, vpool, write, slots, lengths
        )
        return h, residual


@functools.cache
def _register_shapes() -> None:
    """Each op's output for tensors without data (torch.compile and make_fx trace with these); once
    per process. The C++ checks inputs at run time; these give shapes and dtypes only."""

    def same_as_first(x: torch.Tensor, *rest: Any) -> torch.Tensor:
        return torch.empty_like(x)

    def nothing(*args: Any) -> None:
        return None

    def greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = logits.shape[0]
        return logits.new_empty(rows, dtype=torch.int64), logits.new_empty(rows, dtype=torch.bool)

    def attention(q: torch.Tensor, *rest: Any) -> torch.Tensor:
        return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])

    def panel_linear(x: torch.Tensor, panels: torch.Tensor, n: int, *rest: Any) -> torch.Tensor:
        return x.new_empty(x.shape[0], n)

    def stack(handle: int, h: torch.Tensor, *rest: Any) -> torch.Tensor:
        return torch.empty_like(h)

    for name, shape in (
        ("rms_norm", same_as_first),
        ("rotary", nothing),
        ("silu_mul", same_as_first),
        ("greedy", greedy),
        ("decode_attention", attention),
        ("panel_linear", panel_linear),
        ("decoder_stack", stack),
    ):
        torch.library.register_fake(f"softmux::{name}", shape)


def cpuinfo(field: str) -> str:
    """The first value of `field` in /proc/cpuinfo ('flags', 'model name'), or '' where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def build_key() -> str:
    digest = hashlib.blake2b(digest_size=8)
    for part in (
        *(source.read_bytes() for source in SOURCES + HEADERS),
        torch.__version__.encode(),
        (cpuinfo("flags") or platform.processor()).encode(),
        platform.machine().encode(),
    ):
        digest.update(part)
    return digest.hexdigest()


def load(cache_dir: Path) -> Kernels | None:
    """The compiled kernels, or None (reason logged) where they cannot be built here."""
    key = build_key()
    with _lock:
        if key in _loaded:
            return _loaded[key]
        module: Kernels | None = None
        if platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
            log.warning("native kernels: not built for %s; using torch ops", platform.machine())
        else:
            build_dir = Path(cache_dir) / "kernels" / key
            try:
                module = Kernels(_import_or_build(build_dir, f"softmux_cpu_ops_{key}"))
                log.info("native kernels loaded from %s", build_dir)
            except Exception as exc:  # no compiler, headers or linker: the torch path serves the same results
                log.warning("native kernels unavailable (%s); using torch ops", build_failure(exc))
                module = None
        _loaded[key] = module
        return module


# What a failed build's output says -> what to install (Debian/Ubuntu names; other systems have the same).
_REMEDIES = {
    "Python.h": "install Python's headers (apt-get install python3-dev)",
    "Ninja is required": "pip install ninja",
    "c++: not found": "install a C++ compiler (apt-get install g++)",
    "omp.h": "install a compiler with OpenMP (apt-get install g++)",
}


def build_failure(exc: Exception) -> str:
    """One line on why the build failed and what to do: the compiler's first error, not the ninja
    command line that torch's message starts with."""
    text = str(exc) or type(exc).__name__
    lines = text.splitlines()
    reason = lines[0]
    for line in lines:
        if "error:" in line:
            reason = line[line.index("error:") :]
            break
        if "not found" in line:  # the shell's answer for a missing compiler
            reason = line
            break
    remedy = next((fix for needle, fix in _REMEDIES.items() if needle in text), "")
    return f"{reason.strip()}; {remedy}" if remedy else reason.strip()


def _import_or_build(build_dir: Path, name: str) -> ModuleType:
    """The library in build_dir imported as it is, or built there first (one process at a time)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(build_dir / "softmux-build.lock"):
        library = build_dir / f"{name}.so"
        if library.exists():
            try:
                return _import(library, name)
            except ImportError as exc:  # cut short by a killed build: build it again
                log.warning("native kernels: %s does not load (%s); rebuilding", library, exc)
                library.unlink()
        # torch's own lock file, if one is here, was left by a build that died: only our lock's holder builds.
        (build_dir / "lock").unlink(missing_ok=True)
        _put_ninja_on_path()
        from torch.utils import cpp_extension

        return cpp_extension.load(
            name=name,
            sources=[str(source) for source in SOURCES],
            extra_cflags=["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=os.environ.get("SOFTMUX_KERNELS_VERBOSE") == "1",
        )


def _put_ninja_on_path() -> None:
    """torch builds with the `ninja` it finds on PATH. The `ninja` package (a dependency) puts one beside
    the venv's python, which is on PATH only in an activated venv, not for `.venv/bin/softmux serve`."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:  # torch's error then names what is missing
        return
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def _import(library: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module spec for {library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` held by this process; the OS releases it if the process dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (torch's own serialises builds there)
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
