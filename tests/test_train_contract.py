"""`softmux train --output/--output-choices-from-data/--default`: the contract is checked before any
training and written as task.json beside the adapter, atomically with it (no training run here)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

import server.models
import server.training
from server.cli import build_parser, parse_default, parse_output
from server.cli import main as cli_main
from server.model_card import render_card
from server.models import LoadedModel
from server.prompts.settings import SETTINGS_FILE, SettingsError, parse_settings
from server.prompts.store import read_adapter
from server.prompts.types import PromptGeometry
from server.structured import GrammarError, OutputSpec
from server.training import (
    TrainConfig,
    check_contract,
    choices_from_data,
    initial_prompt,
    save_adapter,
    task_settings,
    train,
    write_task_settings,
)

LABELS = {"choice": ["positive", "negative"]}


def write_jsonl(path: Path, outputs: list[str]) -> Path:
    path.write_text(
        "".join(json.dumps({"input": f"text {i}", "output": o}) + "\n" for i, o in enumerate(outputs))
    )
    return path


def train_args(data: Path, *extra: str) -> list[str]:
    return ["train", "--task", "toy", "--data", str(data), *extra]


# ---- the command line ----------------------------------------------------------------------------


def test_the_contract_options_parse_into_the_config_fields(tmp_path):
    ns = build_parser().parse_args(
        train_args(
            tmp_path / "d.jsonl",
            "--output",
            json.dumps(LABELS),
            "--default",
            "temperature=0",
            "--default",
            "max-new-tokens=8",
            "--default",
            "stop=###",
            "--default",
            'stop=["\\n", "END"]',
        )
    )
    assert ns.output == LABELS and not ns.output_choices_from_data
    assert ns.defaults == {"temperature": 0.0, "max_new_tokens": 8, "stop": ["###", "\n", "END"]}
    assert type(ns.defaults["temperature"]) is float and type(ns.defaults["max_new_tokens"]) is int
    plain = build_parser().parse_args(train_args(tmp_path / "d.jsonl"))
    assert plain.output is None and plain.defaults is None and not plain.output_choices_from_data


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--output", "{bad"], "not valid JSON"),
        (["--output", '["positive"]'], "JSON object"),
        (["--output", '{"choice": []}'], "non-empty list"),
        (["--output", '{"regex": "a", "choice": ["b"]}'], "one constraint"),
        (["--output", '{"json_schema": {}}'], "unknown key"),
        (["--output", '{"json_object": false}'], "no constraint"),
        (["--output", '{"choice": ["a"]}', "--output-choices-from-data"], "not allowed with"),
        (["--default", "temperature"], "KEY=VALUE"),
        (["--default", "temprature=0"], "unknown default 'temprature'"),
        (["--default", "max_new_tokens=1.5"], "valid integer"),
        (["--default", "top_p=2"], "less than or equal to 1"),
        (
            [
                "--default",
                "stop=a",
                "--default",
                "stop=b",
                "--default",
                "stop=c",
                "--default",
                "stop=d",
                "--default",
                "stop=e",
            ],
            "stop",
        ),
    ],
)
def test_a_bad_contract_is_a_usage_error_before_the_model_loads(tmp_path, monkeypatch, capsys, args, reason):
    monkeypatch.setattr(server.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exc:
        cli_main(train_args(write_jsonl(tmp_path / "d.jsonl", ["yes"]), *args))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument --" in err and reason in err


def test_choices_from_data_that_is_no_classification_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(server.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    data = write_jsonl(tmp_path / "d.jsonl", [f"answer {i}" for i in range(300)])
    with pytest.raises(SystemExit, match="300 distinct outputs"):
        cli_main(train_args(data, "--output-choices-from-data"))


def test_the_parsers_return_the_fields_types():
    assert parse_output('{"regex": "[0-9]+"}') == {"regex": "[0-9]+"}
    assert parse_default("top_k=5") == ("top_k", 5)
    assert parse_default("repetition_penalty=1.1") == ("repetition_penalty", 1.1)
    assert parse_default('stop="\\n"') == ("stop", ["\n"])
    assert parse_default("stop=[not json") == ("stop", ["[not json"])


# ---- task.json from the config ------------------------------------------------------------------


def test_task_settings_from_the_config(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ["negative", "positive", "negative", "neutral"])
    assert task_settings(TrainConfig(task="toy", data=data)) is None  # no contract: no task.json
    assert task_settings(
        TrainConfig(task="toy", data=data, output_choices_from_data=True, defaults={"temperature": 0.0})
    ) == {
        "output": {"choice": ["negative", "neutral", "positive"]},
        "defaults": {"temperature": 0.0},
    }
    assert task_settings(TrainConfig(task="toy", data=data, defaults={"max_new_tokens": 4})) == {
        "defaults": {"max_new_tokens": 4}
    }
    with pytest.raises(ValueError, match="not both"):
        task_settings(TrainConfig(task="toy", data=data, output=LABELS, output_choices_from_data=True))
    with pytest.raises(SettingsError, match="defaults.top_k"):
        task_settings(TrainConfig(task="toy", data=data, defaults={"top_k": -1}))
    with pytest.raises(ValueError, match="empty output"):
        choices_from_data([{"input": "a", "output": ""}])


def test_a_contract_that_does_not_compile_is_refused_before_training(lm, tmp_path, monkeypatch):
    with pytest.raises(GrammarError, match="unclosed group"):
        check_contract(lm, {"output": {"regex": "(a"}})
    check_contract(lm, {"output": LABELS, "defaults": {"temperature": 0.0}})
    check_contract(lm, {"defaults": {"temperature": 0.0}})  # no output: nothing to compile
    monkeypatch.setattr(server.training, "prepare_data", lambda *a: pytest.fail("training started"))
    data = write_jsonl(tmp_path / "d.jsonl", ["yes", "no"])
    with pytest.raises(GrammarError):
        train(
            TrainConfig(task="toy", data=data, store=tmp_path / "store", output={"regex": "(a"}),
            lm,
            log=lambda _: None,
        )
    assert not (tmp_path / "store").exists()


# ---- writing ------------------------------------------------------------------------------------


def test_write_task_settings_gives_a_file_the_server_reads_back(tmp_path):
    settings = {"output": LABELS, "defaults": {"temperature": 0.0, "max_new_tokens": 8}}
    path = write_task_settings(tmp_path, settings)
    assert path == tmp_path / SETTINGS_FILE
    parsed = parse_settings(path.read_bytes())
    assert parsed.output_spec == OutputSpec.from_fields(LABELS)
    assert parsed.defaults.given() == {"temperature": 0.0, "max_new_tokens": 8}


@pytest.mark.parametrize(
    "settings", [None, {"output": {"regex": "[0-9]{4}"}, "defaults": {"max_new_tokens": 6}}]
)
def test_save_adapter_installs_task_json_beside_the_adapter(lm: LoadedModel, tmp_path, settings):
    store = tmp_path / "store"
    cfg = TrainConfig(task="toy", data=tmp_path / "d.jsonl", store=store, num_virtual_tokens=3, init="random")
    init, peft_cfg = initial_prompt(lm, cfg)
    folder = save_adapter(lm, cfg, peft_cfg, init, "# toy\n", "tiny", settings)
    assert sorted(os.listdir(store)) == ["toy"]  # installed whole: no hidden temp folder left
    files = sorted(os.listdir(folder))
    prompt = read_adapter(folder, PromptGeometry.of(lm, 8, device="cpu"))
    if settings is None:
        assert SETTINGS_FILE not in files and prompt.settings.output is None
    else:
        assert SETTINGS_FILE in files and oct((folder / SETTINGS_FILE).stat().st_mode & 0o777) == "0o644"
        assert prompt.settings.output == settings["output"] and prompt.settings.defaults.max_new_tokens == 6


def test_a_bad_task_json_never_becomes_visible(lm: LoadedModel, tmp_path):
    store = tmp_path / "store"
    cfg = TrainConfig(task="toy", data=tmp_path / "d.jsonl", store=store, num_virtual_tokens=2, init="random")
    init, peft_cfg = initial_prompt(lm, cfg)
    with pytest.raises(ValueError, match="priority"):
        save_adapter(lm, cfg, peft_cfg, init, "# toy\n", "tiny", {"priority": 1, "min_priority": 5})
    assert os.listdir(store) == []  # the temp folder is gone and nothing was installed


def test_the_card_shows_the_contract_only_when_there_is_one(tmp_path):
    settings = {"output": LABELS, "defaults": {"temperature": 0.0}}
    args: dict[str, Any] = dict(
        train_rows=[{"input": "a", "output": "positive"}],
        held=[{"input": "b", "output": "negative"}],
        steps=2,
        before=0.0,
        after=1.0,
        losses=[1.0, 0.5],
        train_seconds=1.0,
        seconds=2.0,
        samples=[],
    )
    cfg = TrainConfig(task="toy", data=write_jsonl(tmp_path / "d.jsonl", ["positive"]), output=LABELS)
    card = render_card(cfg, "org/base", **args, task_settings=settings)
    assert "## Contract (task.json)" in card and json.dumps(settings, indent=2) in card
    assert "## Contract" not in render_card(cfg, "org/base", **args)


def test_train_writes_the_contract_it_was_given(lm, tmp_path, monkeypatch):
    """train()'s wiring, the optimiser and both evaluations stubbed out:
    task.json and the card carry the contract."""
    monkeypatch.setattr(
        server.training, "optimise", lambda cfg, lm, init, encoded, steps: (init, [1.0] * steps, 0.0)
    )
    monkeypatch.setattr(server.training, "evaluate", lambda lm, emb, held, *a: (0.5, ["no"] * len(held)))
    data = write_jsonl(tmp_path / "d.jsonl", ["yes", "no"] * 4)
    cfg = TrainConfig(
        task="toy",
        data=data,
        store=tmp_path / "store",
        num_virtual_tokens=2,
        init="random",
        steps=1,
        holdout=2,
        progress=False,
        output_choices_from_data=True,
        defaults={"max_new_tokens": 3},
    )
    result = train(cfg, lm, log=lambda _: None)
    expected = {"output": {"choice": ["no", "yes"]}, "defaults": {"max_new_tokens": 3}}
    assert json.loads((result.folder / SETTINGS_FILE).read_text()) == expected
    assert "## Contract (task.json)" in (result.folder / "README.md").read_text()
