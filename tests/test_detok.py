"""Tests for server/engine/detok.py against the default model's real byte-level BPE tokenizer."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from server.engine.detok import IncrementalText


@pytest.fixture(scope="module")
def tok(default_model_dir: Path):
    return AutoTokenizer.from_pretrained(default_model_dir)


def feed(text: IncrementalText, ids: list[int]) -> list[str]:
    return [text.add(i) for i in ids]


TEXTS = [
    "Hello world, how are you?",
    "Café naïve façade, crème brûlée à la carte.",
    "Emoji: 😀👍🏽 and a family 👨‍👩‍👧 done.",
    "日本語のテキストと中文字符 mixed with English.",
    "  leading spaces,   runs   of spaces\n\nnew lines\tand tabs ",
    "Ελληνικά, русский, עברית, العربية",
]


@pytest.mark.parametrize("s", TEXTS)
def test_deltas_concatenate_to_the_full_decode(tok, s: str) -> None:
    ids = tok.encode(s, add_special_tokens=False)
    expected = tok.decode(ids, skip_special_tokens=True)
    assert expected == s  # sanity: the tokenizer round-trips these texts
    text = IncrementalText(tok)
    deltas = feed(text, ids)
    assert "".join(deltas) == expected
    assert text.text == expected
    assert not any("\ufffd" in d for d in deltas)  # never half a character
    assert not text.stopped


def test_multibyte_characters_are_held_until_complete(tok) -> None:
    s = "a 😀 b"
    ids = tok.encode(s, add_special_tokens=False)
    per_token = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in per_token), "the emoji should span several byte-level tokens"
    text = IncrementalText(tok)
    deltas = feed(text, ids)
    assert "" in deltas  # some tokens add nothing yet
    assert "😀" in deltas or any("😀" in d for d in deltas)
    assert "".join(deltas) == s


def test_random_mixed_texts_round_trip(tok) -> None:
    rng = random.Random(1234)
    pool = list("abcXYZ019 ,.!?\n") + [
        "é",
        "ñ",
        "ü",
        "ß",
        "日",
        "本",
        "語",
        "中",
        "😀",
        "🎉",
        "👍🏽",
        "Ω",
        "ж",
        "  ",
    ]
    for _ in range(30):
        s = "".join(rng.choice(pool) for _ in range(rng.randint(1, 40)))
        ids = tok.encode(s, add_special_tokens=False)
        text = IncrementalText(tok)
        assert "".join(feed(text, ids)) == tok.decode(ids, skip_special_tokens=True) == s


def test_special_tokens_are_skipped(tok) -> None:
    special = [i for i in tok.all_special_ids if i is not None]
    assert special
    ids = tok.encode("Hi there", add_special_tokens=False)
    mixed = [special[0], *ids[:1], special[-1], *ids[1:], special[0]]
    text = IncrementalText(tok)
    deltas = feed(text, mixed)
    assert "".join(deltas) == tok.decode(mixed, skip_special_tokens=True) == "Hi there"


# --- stop strings --------------------------------------------------------------------------------


def test_stop_string_cuts_text_and_sets_stopped(tok) -> None:
    s = "Hello world, how are you?"
    ids = tok.encode(s, add_special_tokens=False)
    text = IncrementalText(tok, stop=("how",))
    deltas = feed(text, ids)
    assert text.stopped
    assert text.text == "Hello world, "
    assert "how" not in "".join(deltas)
    assert "".join(deltas) == "Hello world, "


def test_nothing_is_emitted_after_the_stop(tok) -> None:
    s = "one two three four five"
    ids = tok.encode(s, add_special_tokens=False)
    text = IncrementalText(tok, stop=(" three",))
    deltas, stopped_at = [], None
    for i, token in enumerate(ids):
        deltas.append(text.add(token))
        if text.stopped and stopped_at is None:
            stopped_at = i
    assert stopped_at is not None and stopped_at < len(ids) - 1  # there were tokens after the stop
    assert all(d == "" for d in deltas[stopped_at + 1 :])
    assert text.text == "one two" == "".join(deltas)
    # more tokens later still add nothing
    assert text.add(ids[0]) == ""
    assert text.text == "one two" and text.stopped


def test_stop_string_spanning_two_tokens_is_found(tok) -> None:
    s = "Hello world, how are you?"
    ids = tok.encode(s, add_special_tokens=False)
    stop = "lo wor"  # spans "Hello" and " world"
    assert not any(stop in tok.decode([i]) for i in ids)
    text = IncrementalText(tok, stop=(stop,))
    feed(text, ids)
    assert text.stopped
    assert text.text == "Hel"


def test_stop_string_spanning_two_tokens_is_never_streamed(tok) -> None:
    s = "Hello world, how are you?"
    ids = tok.encode(s, add_special_tokens=False)
    text = IncrementalText(tok, stop=("lo wor",))
    deltas = feed(text, ids)
    assert text.text == "Hel"
    assert "".join(deltas) == text.text  # "lo" must not have been streamed before the stop was seen
    assert text.flush() == ""  # nothing held back past a stop


def test_held_back_tail_is_released_by_flush_when_no_stop_completes(tok) -> None:
    s = "Hello wo"
    ids = tok.encode(s, add_special_tokens=False)
    text = IncrementalText(tok, stop=("world",))
    deltas = feed(text, ids)
    assert not text.stopped
    streamed = "".join(deltas)
    assert s.startswith(streamed) and not streamed.endswith("wo")  # "wo" could still become "world"
    assert streamed + text.flush() == s == text.text
    assert text.flush() == ""  # released once


def test_partial_match_that_diverges_is_released_without_flush(tok) -> None:
    s = "Hello wonderful day"
    ids = tok.encode(s, add_special_tokens=False)
    text = IncrementalText(tok, stop=("world",))
    assert "".join(feed(text, ids)) == s  # the tail "day" cannot start "world": nothing held
    assert text.flush() == ""


def test_random_texts_with_a_stop_string(tok) -> None:
    """Streamed text is always a prefix of the final text, and deltas + flush == text cut at the stop."""
    rng = random.Random(99)
    pool = list("ab c,.\n") + ["é", "日", "😀", " the", "ab"]
    for _ in range(60):
        s = "".join(rng.choice(pool) for _ in range(rng.randint(5, 30)))
        i = rng.randrange(len(s))
        stop = s[i : i + rng.randint(1, 4)] if rng.random() < 0.8 else "zzz"
        ids = tok.encode(s, add_special_tokens=False)
        text = IncrementalText(tok, stop=(stop,))
        expected = s[: s.find(stop)] if stop in s else s
        streamed = ""
        for token in ids:
            streamed += text.add(token)
            assert expected.startswith(streamed), (s, stop, streamed)
        assert text.stopped == (stop in s)
        assert streamed + text.flush() == expected == text.text, (s, stop)


def test_earliest_of_several_stop_strings_wins(tok) -> None:
    s = "Hello world, how are you?"
    ids = tok.encode(s, add_special_tokens=False)
    assert tok.decode(ids[1:2]) == " world"  # both stops below arrive in this one token
    text = IncrementalText(
        tok, stop=("ld", "wo", "you")
    )  # "wo" is not first in the tuple but earliest in the text
    deltas = feed(text, ids)
    assert text.stopped
    assert text.text == "Hello "
    assert "".join(deltas) == "Hello "


def test_stop_found_in_the_first_token_and_multibyte_stop(tok) -> None:
    ids = tok.encode("Hello world", add_special_tokens=False)
    text = IncrementalText(tok, stop=("Hell",))
    assert feed(text, ids) == ["", ""]
    assert text.stopped and text.text == ""

    s = "ok 日本 then 😀 fine"
    ids = tok.encode(s, add_special_tokens=False)
    text = IncrementalText(tok, stop=("😀",))
    deltas = feed(text, ids)
    assert text.stopped
    assert text.text == "ok 日本 then "
    assert "".join(deltas) == "ok 日本 then "


def test_no_match_leaves_text_whole(tok) -> None:
    s = "Hello world, how are you?"
    ids = tok.encode(s, add_special_tokens=False)
    text = IncrementalText(tok, stop=("xyz", "Hello!"))
    assert "".join(feed(text, ids)) == s
    assert not text.stopped and text.text == s
