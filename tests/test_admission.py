"""server/admission.py: the token budget a request must fit before it is queued (pure functions)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from server.admission import fit_lengths
from server.config import Settings
from server.engine.request import SamplingParams
from server.errors import InvalidRequest

NAMES = ("inputs", "parameters.max_new_tokens")
LIMITS = Settings(max_batch_tokens=100, max_input_tokens=50, max_new_tokens=40)


def model(window: int | None) -> Any:
    """Just what fit_lengths reads of a loaded model: its config's position window."""
    return SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=window)))


def fit(n_input: int, new: int, *, window: int | None = None, pool: int = 1000, fit_new: bool = False) -> int:
    params = fit_lengths(
        LIMITS, 10, n_input, SamplingParams(max_new_tokens=new), model(window), pool, fit_new, NAMES
    )
    return params.max_new_tokens


def test_a_request_within_every_limit_keeps_its_parameters() -> None:
    assert fit(20, 30) == 30


@pytest.mark.parametrize(
    ("n_input", "new", "window", "pool", "field", "says"),
    [
        (51, 5, None, 1000, "inputs", "at most 50"),
        (0, 5, None, 1000, "inputs", "must not be empty"),
        (50, 41, None, 1000, "parameters.max_new_tokens", "= 101 exceeds max_batch_tokens (100)"),
        (20, 30, 55, 1000, "parameters.max_new_tokens", "the model's context (55)"),
        (20, 30, None, 59, "parameters.max_new_tokens", "key/value pool (59 tokens"),
    ],
)
def test_each_limit_refuses_naming_its_field(n_input, new, window, pool, field, says) -> None:
    with pytest.raises(InvalidRequest) as caught:
        fit(n_input, new, window=window, pool=pool)
    assert caught.value.field == field and says in str(caught.value)


def test_fit_new_tokens_lowers_the_limit_to_what_is_left() -> None:
    assert fit(20, 1000, fit_new=True) == 40  # the server's max_new_tokens
    assert fit(45, 1000, fit_new=True) == 40  # 100 - 10 - 45 = 45 left: the server's limit is lower
    assert fit(20, 1000, window=50, fit_new=True) == 20  # the model's positions: 50 - 10 - 20
    assert fit(20, 5, window=50, fit_new=True) == 5  # a smaller ask stays as asked
