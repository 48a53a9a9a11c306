"""Shared fixtures: the real default model (converted once into the shared cache) and a tiny llama."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from server.config import Settings, default_cache_dir
from server.engine import kernels
from server.models import LoadedModel, ensure_default_model, load_model
from tests.tiny_model import tiny_test_model


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    # Settings().cache_dir honours SOFTMUX_CACHE_DIR, so tests share `make model`'s cache.
    return ensure_default_model(Settings().cache_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    """A seeded 2-layer llama (hidden 64) with SmolLM2's tokenizer: fast, deterministic tests.

    initializer_range 0.3 (not 0.02): with tiny weights attention is nearly uniform and positions
    barely matter, so a wrong position or mask would go unnoticed; peaked attention exposes them.
    """
    return tiny_test_model(
        tmp_path_factory.mktemp("tiny-llama"), tokenizer_from=default_model_dir, initializer_range=0.3
    )


@pytest.fixture(scope="session")
def lm(tiny_model_dir: Path) -> LoadedModel:
    """The tiny model loaded once, in float64: engine and API tests check batching logic bit for bit,
    without float32 near-ties. Nothing in the tests mutates it."""
    return load_model(str(tiny_model_dir), dtype="float64")


@pytest.fixture(scope="session")
def ops() -> kernels.Kernels:
    """softmux's native kernels (built once per machine), or the test is skipped where no compiler is."""
    module = kernels.load(default_cache_dir())
    if module is None:
        # Where a compiler exists the kernels must build: a silent fallback would hide a broken build.
        assert shutil.which("c++") is None and shutil.which("g++") is None, (
            "a C++ compiler is here but the kernels did not build"
        )
        pytest.skip("no C++ compiler: the engine runs torch ops")
    return module
