"""The OpenAI-compatible routes, driven by the official `openai` package against a real uvicorn
server: completions and chat (streaming and not), models, parameter mapping, errors."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest
import torch
from fastapi import FastAPI

from server.api.app import create_app
from server.models import LoadedModel
from tests.api_support import TASKS, live_server, make_store, settings_for
from tests.support import reference_greedy


@pytest.fixture(scope="module")
def store(tmp_path_factory, lm):
    root = tmp_path_factory.mktemp("store")
    return root, make_store(root, lm.hidden_size)


@pytest.fixture(scope="module")
def app(lm, store) -> FastAPI:
    return create_app(settings_for(store[0]), loader=lambda: lm, wait=True)


@pytest.fixture(scope="module")
def base_url(app) -> Iterator[str]:
    with live_server(app) as base:
        yield base


@pytest.fixture(scope="module")
def oai(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=30)


def greedy_text(lm: LoadedModel, store, task: str, ids: list[int], n: int) -> str:
    return lm.tokenizer.decode(
        reference_greedy(lm, store[1][task].double(), ids, n), skip_special_tokens=True
    )


def test_models_lists_the_tasks(oai):
    assert sorted(m.id for m in oai.models.list()) == sorted(TASKS)
    assert oai.models.retrieve("beta").id == "beta"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope")


def test_completion_greedy_matches_the_reference(oai, lm, store):
    prompt = "The quick brown fox"
    out = oai.completions.create(model="beta", prompt=prompt, max_tokens=7, temperature=0)
    ids = lm.tokenizer(prompt)["input_ids"]
    assert out.object == "text_completion" and out.model == "beta"
    assert out.choices[0].text == greedy_text(lm, store, "beta", ids, 7)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        len(ids),
        7,
        len(ids) + 7,
    )


def test_completion_stream_equals_the_whole_answer(oai):
    kwargs = dict(model="alpha", prompt="one two three", max_tokens=9, temperature=0)
    whole = oai.completions.create(**kwargs).choices[0].text
    chunks = list(oai.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 9


def test_completion_stop_string_and_list(oai):
    free = (
        oai.completions.create(model="gamma", prompt="hello world", max_tokens=12, temperature=0)
        .choices[0]
        .text
    )
    stop = free[4:7]
    assert stop.strip()
    for value in (stop, [stop, "zzzz"]):
        out = oai.completions.create(
            model="gamma", prompt="hello world", max_tokens=12, temperature=0, stop=value
        )
        assert out.choices[0].text == free[: free.index(stop)] and out.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(oai):
    """The same seed gives the same text; other seeds give other texts, and they are not the greedy
    one: a test that passes when the seed is ignored or sampling silently turns greedy is no test."""
    kwargs = dict(
        model="gamma",
        prompt="hello",
        max_tokens=8,
        temperature=0.9,
        top_p=0.95,
        extra_body={"ignore_eos": True},
    )
    a = oai.completions.create(**kwargs, seed=123).choices[0].text
    assert oai.completions.create(**kwargs, seed=123).choices[0].text == a
    others = {oai.completions.create(**kwargs, seed=s).choices[0].text for s in (1, 2, 3)}
    greedy = oai.completions.create(**{**kwargs, "temperature": 0}).choices[0].text
    assert others - {a} and {a, *others} - {greedy}


def test_chat_applies_the_template_after_the_soft_prompt(oai, lm, store):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    out = oai.chat.completions.create(model="beta", messages=messages, max_tokens=6, temperature=0)
    text = lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == greedy_text(lm, store, "beta", ids, 6)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 6


def test_chat_stream_and_content_parts(oai):
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}],
        },
    ]
    whole = oai.chat.completions.create(model="alpha", messages=messages, max_tokens=8, temperature=0)
    chunks = list(
        oai.chat.completions.create(
            model="alpha", messages=messages, max_tokens=8, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_without_max_tokens_fits_the_limits(oai):
    out = oai.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "hi"}], temperature=0
    )
    assert 1 <= out.usage.completion_tokens <= 64


def test_ignore_eos_runs_past_eos_on_completions_and_chat(oai, app, lm, store):
    engine = app.state.service.engine
    eos_ids, engine.eos_ids = engine.eos_ids, set(range(lm.model.config.vocab_size))  # every token is an eos
    try:
        prompt, messages = "The quick brown fox", [{"role": "user", "content": "What is 2+2?"}]
        stops = oai.completions.create(model="beta", prompt=prompt, max_tokens=7, temperature=0)
        assert stops.choices[0].finish_reason == "stop" and stops.usage.completion_tokens == 1
        out = oai.completions.create(
            model="beta", prompt=prompt, max_tokens=7, temperature=0, extra_body={"ignore_eos": True}
        )
        ids = lm.tokenizer(prompt)["input_ids"]
        assert out.choices[0].text == greedy_text(lm, store, "beta", ids, 7)
        assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 7
        chat = oai.chat.completions.create(
            model="beta", messages=messages, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
        )
        assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 6
    finally:
        engine.eos_ids = eos_ids


def test_unknown_model_is_404_in_openai_shape(oai, base_url):
    with pytest.raises(openai.NotFoundError) as info:
        oai.completions.create(model="nope", prompt="x", max_tokens=2)
    assert info.value.status_code == 404
    r = httpx.post(
        f"{base_url}/v1/chat/completions",
        json={"model": "nope", "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.status_code == 404
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == "model" and error["code"] == "model_not_found" and "'nope'" in error["message"]


def test_n_choices_share_one_prompt_and_each_is_its_own_seeded_sample(oai, base_url):
    """n=3: three choices; choice 0 is the n=1 answer with the same seed, the others their own seed
    streams; usage counts the prompt once and every choice's tokens; a stream gives the same texts."""
    ask = {
        "model": "beta",
        "prompt": "Once upon",
        "max_tokens": 8,
        "temperature": 1.2,
        "seed": 17,
        "extra_body": {"ignore_eos": True},
    }
    one = oai.completions.create(**ask)
    three = oai.completions.create(**ask, n=3)
    texts = [c.text for c in sorted(three.choices, key=lambda c: c.index)]
    assert [c.index for c in three.choices] == [0, 1, 2] and texts[0] == one.choices[0].text
    assert len(set(texts)) > 1
    assert three.usage.prompt_tokens == one.usage.prompt_tokens and three.usage.completion_tokens == 24
    streamed = ["", "", ""]
    for chunk in oai.completions.create(**ask, n=3, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == texts
    chat = oai.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0, n=2
    )
    assert (
        len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content
    )  # greedy
    for n in (0, 17):
        r = httpx.post(f"{base_url}/v1/completions", json={"model": "alpha", "prompt": "x", "n": n})
        assert r.status_code == 422 and r.json()["error"]["param"] == "n"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": "alpha", "prompt": "x", "max_tokens": 65}, "max_tokens"),
        ("/v1/completions", {"model": "alpha", "prompt": "x", "temperature": 3}, "temperature"),
        ("/v1/completions", {"model": "alpha", "prompt": "x", "top_p": 0}, "top_p"),
        ("/v1/completions", {"model": "alpha", "prompt": ["a", "b"]}, "prompt"),
        ("/v1/completions", {"model": "alpha", "prompt": ""}, "prompt"),
        ("/v1/completions", {"model": "alpha", "prompt": "x", "stop": ["a"] * 5}, "stop"),
        ("/v1/completions", {"model": "alpha", "prompt": "x", "logprobs": 6}, "logprobs"),
        ("/v1/completions", {"model": "alpha", "prompt": "x", "top_logprobs": 2}, None),
        (
            "/v1/chat/completions",
            {"model": "alpha", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            None,
        ),
        (
            "/v1/chat/completions",
            {
                "model": "alpha",
                "messages": [{"role": "user", "content": "x"}],
                "logprobs": True,
                "top_logprobs": 21,
            },
            "top_logprobs",
        ),
        ("/v1/completions", {"model": "alpha", "prompt": " word" * 100}, "prompt"),
        ("/v1/completions", {"model": "alpha"}, "prompt"),
        ("/v1/chat/completions", {"model": "alpha", "messages": []}, "messages"),
        (
            "/v1/chat/completions",
            {"model": "alpha", "messages": [{"role": "tool", "content": "x"}]},
            "messages.0.role",
        ),
        (
            "/v1/chat/completions",
            {"model": "alpha", "messages": [{"role": "user", "content": "x"}], "seed": -1},
            "seed",
        ),
        ("/v1/completions", {"model": "alpha", "prompt": "x", "ignore_eos": "maybe"}, "ignore_eos"),
        ("/v1/completions", {"model": "alpha", "prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
        ("/v1/completions", {"model": "alpha", "prompt": "x", "frequency_penalty": -3}, "frequency_penalty"),
        ("/v1/completions", {"model": "alpha", "prompt": "x", "logit_bias": {"17": 101}}, "logit_bias"),
        ("/v1/completions", {"model": "alpha", "prompt": "x", "logit_bias": {"hello": 1}}, "logit_bias"),
        ("/v1/completions", {"model": "alpha", "prompt": "x", "logit_bias": {"10000000": 1}}, "logit_bias"),
        (
            "/v1/chat/completions",
            {"model": "alpha", "messages": [{"role": "user", "content": "x"}], "frobnicate": 1},
            "frobnicate",
        ),
    ],
)
def test_bad_requests_are_422_in_openai_shape(base_url, path, body, param):
    r = httpx.post(base_url + path, json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param


def test_logit_bias_and_penalties_reach_the_sampler(oai, lm):
    """A +100 bias makes one token the answer every step (OpenAI's documented effect); -100 bans it."""
    token = 1337
    forced = oai.completions.create(
        model="alpha", prompt="x", max_tokens=4, temperature=0, logit_bias={str(token): 100}
    )
    assert forced.choices[0].text == lm.tokenizer.decode([token] * 4)
    plain = oai.completions.create(model="alpha", prompt="x", max_tokens=4, temperature=0)
    first = lm.tokenizer(plain.choices[0].text, add_special_tokens=False)["input_ids"][0]
    banned = oai.completions.create(
        model="alpha", prompt="x", max_tokens=4, temperature=0, logit_bias={str(first): -100}
    )
    assert lm.tokenizer(banned.choices[0].text, add_special_tokens=False)["input_ids"][0] != first
    r = oai.completions.create(
        model="alpha", prompt="x", max_tokens=8, temperature=0, frequency_penalty=-2, presence_penalty=-2
    )
    assert r.choices[0].text != plain.choices[0].text or len(plain.choices[0].text) == 0


def test_completion_logprobs_are_the_models_and_the_stream_carries_the_same(oai, base_url, lm, store):
    """Greedy, no bias: each token's log-probability is the model's own (torch.log_softmax over the
    reference's logits), its alternatives are the top 3, the chosen one first; the stream's chunks
    carry the same figures token by token."""
    prompt, n = "The quick brown fox", 6
    r = oai.completions.create(
        model="beta", prompt=prompt, max_tokens=n, temperature=0, logprobs=3, extra_body={"ignore_eos": True}
    )
    lp = r.choices[0].logprobs
    ids = lm.tokenizer(prompt)["input_ids"]
    soft = store[1]["beta"].double()
    embed = lm.model.get_input_embeddings()
    generated = reference_greedy(lm, soft, ids, n)
    for i in range(n):
        x = torch.cat([soft, embed(torch.tensor(ids + generated[:i]))])[None]
        logp = torch.log_softmax(lm.model(inputs_embeds=x).logits[0, -1].double(), dim=-1)
        assert lp.token_logprobs[i] == pytest.approx(
            logp[generated[i]].item(), abs=1e-5
        )  # the sampler works in float32
        top = logp.topk(3)
        assert list(lp.top_logprobs[i].values()) == pytest.approx(
            top.values.tolist(), abs=1e-5
        )  # the sampler works in float32
        assert lp.tokens[i] == lm.tokenizer.decode([generated[i]])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    body = {
        "model": "beta",
        "prompt": prompt,
        "max_tokens": n,
        "temperature": 0,
        "logprobs": 3,
        "ignore_eos": True,
        "stream": True,
    }
    streamed: list[float] = []
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                if choice["logprobs"] is not None:
                    streamed += choice["logprobs"]["token_logprobs"]
    assert streamed == lp.token_logprobs


def test_chat_logprobs_with_alternatives_and_bytes(oai):
    r = oai.chat.completions.create(
        model="alpha",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert bytes(entry.bytes) == entry.token.encode() and len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy: the most likely
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    plain = oai.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    assert (
        plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content
    )


def test_null_max_tokens_takes_openais_default(base_url):
    """Found by the fuzz run: an explicit `"max_tokens": null` was a 500."""
    body = {"model": "alpha", "prompt": "x", "max_tokens": None, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{base_url}/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16


def test_malformed_json_is_422(base_url):
    r = httpx.post(
        f"{base_url}/v1/completions", content=b"{oops", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request_error"
