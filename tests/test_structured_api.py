"""Structured outputs and task contracts over HTTP: OpenAI's response_format (through the official
client, with a pydantic model's schema), vLLM's structured_outputs, TGI's grammar; refusals naming
the field; a task.json contract that binds every request, its defaults, and its refusal when bad."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import jsonschema
import openai
import pytest
from fastapi import FastAPI
from pydantic import BaseModel, Field

from server.api.app import create_app
from tests.api_support import live_server, make_store, settings_for, write_task

LABELS = ["positive", "negative", "neutral"]
DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=99)


@pytest.fixture(scope="module")
def store(tmp_path_factory, lm):
    root = tmp_path_factory.mktemp("store")
    make_store(root, lm.hidden_size)
    write_task(root, "labels", 3, lm.hidden_size, seed=21)
    (root / "labels" / "task.json").write_text(
        json.dumps({"output": {"choice": LABELS}, "defaults": {"max_new_tokens": 6, "temperature": 0}})
    )
    write_task(root, "bad-contract", 3, lm.hidden_size, seed=22)
    (root / "bad-contract" / "task.json").write_text(json.dumps({"output": {"regex": "(unclosed"}}))
    return root


@pytest.fixture(scope="module")
def app(lm, store) -> FastAPI:
    return create_app(settings_for(store), loader=lambda: lm, wait=True)


@pytest.fixture(scope="module")
def base_url(app) -> Iterator[str]:
    with live_server(app) as base:
        yield base


@pytest.fixture(scope="module")
def oai(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_response_format_with_a_pydantic_schema_validates(oai):
    schema = Person.model_json_schema()
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    for seed in range(3):
        out = oai.completions.create(
            model="beta",
            prompt=f"Person {seed}:",
            max_tokens=40,
            seed=seed,
            extra_body={"response_format": fmt},
        )
        choice = out.choices[0]
        if choice.finish_reason == "stop":
            Person.model_validate_json(choice.text)
            jsonschema.validate(json.loads(choice.text), schema)
    chat = oai.chat.completions.create(
        model="alpha",
        messages=[{"role": "user", "content": "any object"}],
        max_tokens=30,
        response_format={"type": "json_object"},
    )
    if chat.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(chat.choices[0].message.content or ""), dict)


def test_vllm_structured_outputs_regex_and_choice_and_their_streams(oai, base_url):
    out = oai.completions.create(
        model="gamma",
        prompt="Date:",
        max_tokens=12,
        temperature=0,
        extra_body={"structured_outputs": {"regex": DATE}},
    )
    assert out.choices[0].finish_reason == "stop" and re.fullmatch(DATE, out.choices[0].text), out
    stream = oai.completions.create(
        model="gamma",
        prompt="Date:",
        max_tokens=12,
        temperature=0,
        stream=True,
        extra_body={"structured_outputs": {"regex": DATE}},
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == out.choices[0].text
    chat = oai.chat.completions.create(
        model="alpha",
        messages=[{"role": "user", "content": "How was it?"}],
        max_tokens=6,
        extra_body={"structured_outputs": {"choice": LABELS}},
    )
    assert chat.choices[0].message.content in LABELS


def test_tgi_grammar_on_generate_and_generate_stream(base_url):
    import httpx

    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    body = {
        "task": "beta",
        "inputs": "Answer:",
        "parameters": {"max_new_tokens": 20, "grammar": {"type": "json", "value": schema}},
    }
    r = httpx.post(f"{base_url}/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["details"]["finish_reason"] == "eos_token"
    jsonschema.validate(json.loads(r.json()["generated_text"]), schema)
    regex = {**body, "parameters": {"max_new_tokens": 12, "grammar": {"type": "regex", "value": DATE}}}
    with httpx.stream("POST", f"{base_url}/generate_stream", json=regex, timeout=60) as s:
        events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
    assert re.fullmatch(DATE, events[-1]["generated_text"])


@pytest.mark.parametrize(
    ("route", "body", "field", "reason"),
    [
        (
            "/generate",
            {"parameters": {"grammar": {"type": "json", "value": {"type": "objec"}}}},
            "parameters.grammar",
            "objec",
        ),
        (
            "/generate",
            {"parameters": {"grammar": {"type": "regex", "value": "(a"}}},
            "parameters.grammar",
            "unclosed group",
        ),
        ("/generate", {"parameters": {"grammar": {"type": "xml", "value": "x"}}}, "grammar", "json"),
        (
            "/v1/completions",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
            "schema",
        ),
        (
            "/v1/completions",
            {"structured_outputs": {"regex": DATE, "choice": LABELS}},
            "structured_outputs",
            "one constraint",
        ),
        (
            "/v1/completions",
            {"structured_outputs": {"grammar": "start: nowhere"}},
            "structured_outputs",
            "nowhere",
        ),
        (
            "/v1/completions",
            {"structured_outputs": {"json": False}},
            "structured_outputs",
            "accepts no answer",
        ),
        (
            "/v1/completions",
            {"structured_outputs": {"json_object": "yes"}},
            "structured_outputs",
            "true or false",
        ),
        (
            "/v1/completions",
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": DATE}},
            "structured_outputs",
            "both constrain",
        ),
        (
            "/v1/completions",
            {"response_format": {"type": "json_object"}, "ignore_eos": True},
            "ignore_eos",
            "ignore_eos",
        ),
        (
            "/v1/completions",
            {"model": "labels", "structured_outputs": {"regex": DATE}},
            "structured_outputs",
            "fixes its output",
        ),
    ],
)
def test_a_constraint_that_cannot_be_enforced_is_refused_naming_the_field(
    base_url, route, body, field, reason
):
    import httpx

    if route == "/generate":
        params = {"max_new_tokens": 4, **body["parameters"]}
        payload = {"task": "beta", "inputs": "x", "parameters": params}
    else:
        payload = {"model": "beta", "prompt": "x", "max_tokens": 4, **body}
    r = httpx.post(f"{base_url}{route}", json=payload, timeout=60)
    assert r.status_code in (400, 422), r.text
    assert reason in r.text and field in r.text, r.text


def test_a_task_contract_binds_every_request_and_fills_its_defaults(oai, base_url):
    import httpx

    for prompt in ("great", "awful", "fine", "x"):
        out = oai.completions.create(
            model="labels", prompt=prompt, temperature=1.0, seed=1
        )  # sampled, still a label
        assert out.choices[0].text in LABELS and out.choices[0].finish_reason == "stop"
    same = oai.completions.create(
        model="labels", prompt="great", extra_body={"structured_outputs": {"choice": LABELS}}
    )
    assert same.choices[0].text in LABELS  # repeating the contract is allowed
    r = httpx.post(f"{base_url}/generate", json={"task": "labels", "inputs": "great"}, timeout=60)
    assert (
        r.json()["generated_text"] in LABELS and r.json()["details"]["seed"] is None
    )  # temperature 0 by default: greedy
    card = oai.models.retrieve("labels").model_dump()
    assert card["contract"] == {
        "output": {"choice": LABELS},
        "defaults": {"max_new_tokens": 6, "temperature": 0.0},
    }
    tasks = {t["name"]: t for t in httpx.get(f"{base_url}/tasks", timeout=10).json()["tasks"]}
    assert tasks["labels"]["settings"]["output"] == {"choice": LABELS}


def test_a_contract_that_does_not_compile_refuses_only_its_task(oai, base_url):
    import httpx

    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="bad-contract", prompt="x", max_tokens=2)
    failures = httpx.get(f"{base_url}/tasks", timeout=10).json()
    assert "unclosed group" in json.dumps(failures)
    assert oai.completions.create(model="alpha", prompt="x", max_tokens=2).choices[0].text is not None


def test_a_compile_past_the_limit_is_refused_and_the_running_batch_goes_on(app, oai, base_url, monkeypatch):
    """A constraint whose compile outlasts the limit is a 422 naming the field, while requests already
    running (and new unconstrained ones) are served: compiling never runs on the engine thread."""
    import threading
    import time

    import httpx

    import server.service as service_module
    from server.engine.grammar import GrammarCompiler

    release = threading.Event()
    slow = GrammarCompiler._compile

    def stalled(self, spec):
        if "stall" in spec.text:
            release.wait(30)
        return slow(self, spec)

    monkeypatch.setattr(GrammarCompiler, "_compile", stalled)
    monkeypatch.setattr(service_module, "COMPILE_TIMEOUT", 0.5)
    try:
        began = time.monotonic()
        body = {
            "model": "alpha",
            "prompt": "x",
            "max_tokens": 4,
            "structured_outputs": {"regex": "stall[0-9]+"},
        }
        r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=30)
        assert (
            r.status_code == 422
            and "to compile" in r.text
            and r.json()["error"]["param"] == "structured_outputs"
        )
        assert time.monotonic() - began < 10
        assert (
            oai.completions.create(model="beta", prompt="still", max_tokens=3).choices[0].finish_reason
            == "length"
        )
    finally:
        release.set()
