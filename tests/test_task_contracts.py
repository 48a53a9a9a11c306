"""The shipped tasks' contracts (prompts_store/*/task.json): each loads as the server loads it, compiles
for the default model's tokenizer and accepts every expected answer of its task's data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.make_datasets import CONTRACTS
from server.engine.grammar import GrammarCompiler
from server.models import LoadedModel
from server.prompts.settings import SETTINGS_FILE
from server.prompts.store import read_task_folder
from server.prompts.types import PromptGeometry
from server.structured import OutputSpec

ROOT = Path(__file__).resolve().parent.parent
STORE, DATA = ROOT / "prompts_store", ROOT / "data"
WITH_CONTRACT = sorted(p.parent.name for p in STORE.glob(f"*/{SETTINGS_FILE}"))
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "city": {"type": "string"}},
    "required": ["name", "city"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def compiler(lm: LoadedModel) -> GrammarCompiler:
    """The tiny model carries the default model's tokenizer:
    the same token strings the server compiles for."""
    return GrammarCompiler.for_model(lm)


def test_the_tasks_with_a_clear_answer_shape_have_the_contract_the_scripts_write():
    assert WITH_CONTRACT == sorted(set(CONTRACTS) | {f"{t}-trained" for t in CONTRACTS})
    for folder in WITH_CONTRACT:  # what make_text_tasks.py / train_tasks.py would write again
        assert (
            json.loads((STORE / folder / SETTINGS_FILE).read_text())
            == CONTRACTS[folder.removesuffix("-trained")]
        )


@pytest.mark.parametrize("folder", WITH_CONTRACT)
def test_a_shipped_contract_loads_compiles_and_accepts_its_data(folder, default_model_dir, compiler, lm):
    hidden = json.loads((default_model_dir / "config.json").read_text())["hidden_size"]
    (prompt,) = read_task_folder(STORE / folder, PromptGeometry(hidden_size=hidden, max_virtual_tokens=128))
    spec, defaults = prompt.settings.output_spec, prompt.settings.defaults
    assert spec is not None and defaults.temperature == 0.0
    compiled = compiler.compile(spec)
    task = folder.removesuffix("-trained")
    outputs = [
        json.loads(line)["output"]
        for split in ("train", "test")
        for line in (DATA / f"{task}.{split}.jsonl").open()
    ]
    longest = 0
    for output in outputs:
        ids = lm.tokenizer(output, add_special_tokens=False)["input_ids"]
        longest = max(longest, len(ids))
        matcher = compiled.matcher()
        assert all(matcher.consume_token(t) for t in ids), (folder, output, matcher.get_error())
        assert matcher.is_accepting(), (folder, output)
    assert (
        defaults.max_new_tokens is not None and defaults.max_new_tokens >= longest
    )  # a default request is never cut short


def test_a_schema_keeps_its_property_order_the_order_answers_are_written_in(compiler, lm):
    spec = OutputSpec.from_fields({"json": PERSON})
    assert spec is not None and spec.text.index('"name"') < spec.text.index('"city"')
    reordered = {
        "additionalProperties": False,
        "required": ["name", "city"],
        "type": "object",
        "properties": PERSON["properties"],
    }
    assert OutputSpec.from_fields({"json": reordered}) == spec  # other keys are still canonical
    compiled = compiler.compile(spec)
    for text, ok in (
        ('{"name": "Ann Lee", "city": "Oslo"}', True),
        ('{"city": "Oslo", "name": "Ann Lee"}', False),
    ):
        matcher = compiled.matcher()
        consumed = all(
            matcher.consume_token(t) for t in lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        )
        assert (consumed and matcher.is_accepting()) is ok, text
