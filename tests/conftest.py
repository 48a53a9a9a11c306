"""Shared fixtures: the real default model (converted once into the shared cache) and a tiny llama."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import Settings
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
    return tiny_test_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer_from=default_model_dir, initializer_range=0.3)


@pytest.fixture(scope="session")
def lm(tiny_model_dir: Path) -> LoadedModel:
    """The tiny model loaded once, in float64: engine and API tests check batching logic bit for bit,
    without float32 near-ties. Nothing in the tests mutates it."""
    return load_model(str(tiny_model_dir), dtype="float64")
