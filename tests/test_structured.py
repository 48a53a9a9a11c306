"""Structured outputs in the engine: constraints compile or are refused with the reason, masks match
llguidance's own, and constrained rows give the masked solo reference's tokens alone and mixed."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
import torch

from server.engine.engine import Engine
from server.engine.grammar import Compiled, GrammarCompiler, GrammarError, OutputKind, OutputSpec
from server.engine.masks import MaskWorker, allowed_tokens
from server.engine.request import FinishReason, SamplingParams
from server.engine.scheduler import SchedulerConfig
from server.models import LoadedModel
from tests.support import make_prompt, make_request, start_engine

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
LABELS = ["positive", "negative", "neutral"]
YES_NO = 'start: answer "."\nanswer: "yes" | "no"'


@pytest.fixture(scope="module")
def compiler(lm: LoadedModel) -> GrammarCompiler:
    return GrammarCompiler.for_model(lm)


@pytest.fixture(scope="module")
def prompts(lm: LoadedModel):
    return [make_prompt(f"task{i}", p, lm, seed=i) for i, p in enumerate([1, 4, 9])]


def test_specs_are_canonical_and_the_vllm_shape_takes_exactly_one():
    a = OutputSpec.of(OutputKind.JSON_SCHEMA, {"b": 1, "a": {"type": "string"}})
    assert a == OutputSpec.of(OutputKind.JSON_SCHEMA, '{"a": {"type": "string"}, "b": 1}')
    assert OutputSpec.from_fields({"regex": DATE}) == OutputSpec(OutputKind.REGEX, DATE)
    assert OutputSpec.from_fields({"json_object": False, "choice": None}) is None
    assert OutputSpec.from_fields({"choice": LABELS}).as_fields() == {"choice": LABELS}
    with pytest.raises(GrammarError, match="one constraint"):
        OutputSpec.from_fields({"regex": DATE, "choice": LABELS})
    with pytest.raises(GrammarError, match="unknown key"):
        OutputSpec.from_fields({"json_schema": {}})
    with pytest.raises(GrammarError, match="non-empty list"):
        OutputSpec.of(OutputKind.CHOICE, [])
    with pytest.raises(GrammarError, match="not valid JSON"):
        OutputSpec.of(OutputKind.JSON_SCHEMA, "{nope")
    assert OutputSpec.of(OutputKind.JSON_SCHEMA, True) == OutputSpec.of(
        OutputKind.JSON_SCHEMA, {}
    )  # any JSON value
    with pytest.raises(GrammarError, match="no answer"):
        OutputSpec.of(OutputKind.JSON_SCHEMA, False)


@pytest.mark.parametrize(
    ("kind", "value", "reason"),
    [
        (OutputKind.JSON_SCHEMA, {"type": "objec"}, "objec"),
        (OutputKind.JSON_SCHEMA, {"type": "string", "format": "bogus"}, "format"),
        (OutputKind.JSON_SCHEMA, {"$ref": "#/nope"}, "nope"),
        (OutputKind.REGEX, "(a", "unclosed group"),
        (OutputKind.GRAMMAR, "start: undefined_rule", "undefined_rule"),
    ],
)
def test_a_constraint_that_cannot_be_enforced_is_refused_with_its_reason_and_cached(
    compiler, kind, value, reason
):
    spec = OutputSpec.of(kind, value)
    with pytest.raises(GrammarError, match=reason):
        compiler.compile(spec)
    before = compiler.compiles
    with pytest.raises(GrammarError, match=reason):
        compiler.compile(spec)
    assert compiler.compiles == before  # the failure came from the cache


def test_compiles_are_cached_and_each_matcher_has_its_own_state(compiler, lm):
    spec = OutputSpec.of(OutputKind.CHOICE, LABELS)
    first = compiler.compile(spec)
    before = compiler.compiles
    assert compiler.compile(spec) is first and compiler.compiles == before
    a, b = first.matcher(), first.matcher()
    (token,) = lm.tokenizer("positive", add_special_tokens=False)["input_ids"]
    assert a.consume_token(token) and a.is_stopped()
    assert not b.is_stopped()  # a copy, not a shared state


def test_the_worker_fills_the_same_masks_as_llguidance_and_leaves_free_rows_open(compiler, lm, prompts):
    vocab = compiler.vocab_size
    worker = MaskWorker(vocab)
    rows = [make_request(prompts[0], [1], SamplingParams()).request for _ in range(3)]
    specs = [OutputSpec.of(OutputKind.REGEX, DATE), None, OutputSpec.of(OutputKind.JSON_SCHEMA, PERSON)]
    for row, spec in zip(rows, specs):
        row.matcher = None if spec is None else compiler.compile(spec).matcher()
    pending = worker.start(rows)
    assert pending is not None
    bitmask, fill, _ = pending.wait()
    allowed = allowed_tokens(bitmask, vocab)  # [3, V]
    assert fill > 0 and allowed[1].all()
    for i in (0, 2):
        expected = (
            torch.frombuffer(bytearray(rows[i].matcher.compute_logit_bias()), dtype=torch.uint8)[:vocab] > 0
        )
        assert torch.equal(allowed[i], expected)
        assert 0 < int(allowed[i].sum()) < vocab
    assert worker.start([rows[1]]) is None  # nothing constrained: no work, no mask
    worker.close()


@torch.inference_mode()
def reference_constrained(
    lm: LoadedModel, prompt: torch.Tensor, ids: list[int], n: int, compiled: Compiled | None
) -> list[int]:
    """The solo reference under a constraint: the base model alone, greedy over the tokens a fresh
    matcher allows (llguidance's byte mask, not the engine's bitmask path), stopping where the grammar
    is complete or at end-of-sequence."""
    embed, eos = lm.model.get_input_embeddings(), lm.eos_token_ids
    matcher = None if compiled is None else compiled.matcher()
    x = torch.cat([prompt, embed(torch.tensor(ids))])[None]
    out: list[int] = []
    for _ in range(n):
        logits = lm.model(inputs_embeds=x).logits[0, -1]
        if matcher is not None:
            allowed = (
                torch.frombuffer(bytearray(matcher.compute_logit_bias()), dtype=torch.uint8)[
                    : logits.shape[0]
                ]
                > 0
            )
            logits = logits.masked_fill(~allowed, float("-inf"))
        token = int(logits.argmax())
        out.append(token)
        if token in eos:
            break
        if matcher is not None:
            assert matcher.consume_token(token)
            if matcher.is_stopped():
                break
        x = torch.cat([x, embed(torch.tensor([[token]]))], dim=1)
    return out


def check_valid(spec: OutputSpec | None, text: str) -> None:
    """The independent check of a finished answer: jsonschema, re.fullmatch, membership."""
    if spec is None:
        return
    if spec.kind is OutputKind.JSON_SCHEMA:
        jsonschema.validate(json.loads(text), json.loads(spec.text))
    elif spec.kind is OutputKind.JSON_OBJECT:
        assert isinstance(json.loads(text), dict)
    elif spec.kind is OutputKind.REGEX:
        assert re.fullmatch(spec.text, text), text
    elif spec.kind is OutputKind.CHOICE:
        assert text in json.loads(spec.text)
    else:
        assert text in ("yes.", "no."), text


CASES = [
    (OutputKind.CHOICE, LABELS, 8),
    (None, None, 6),
    (OutputKind.REGEX, DATE, 14),
    (OutputKind.JSON_SCHEMA, PERSON, 40),
    (OutputKind.GRAMMAR, YES_NO, 6),
    (OutputKind.JSON_OBJECT, None, 5),  # cut by max_new_tokens: "length", whatever it holds so far
]


def test_constrained_rows_match_the_masked_reference_alone_and_in_a_staggered_mixed_batch(
    lm, prompts, compiler
):
    rng = random.Random(4)
    specs = [None if kind is None else OutputSpec.of(kind, value) for kind, value, _ in CASES]
    inputs = [[rng.randrange(40_000) for _ in range(2 + i)] for i in range(len(CASES))]
    engine = start_engine(lm)

    def run(i: int, seed_matcher: bool = True):
        params = SamplingParams(max_new_tokens=CASES[i][2])
        t = make_request(prompts[i % 3], inputs[i], params)
        t.request.matcher = None if specs[i] is None else compiler.compile(specs[i]).matcher()
        engine.submit(t.request)
        return t

    try:
        alone = []
        for i in range(len(CASES)):  # one at a time
            t = run(i)
            alone.append((t.result, t.request.output_ids)[::-1])
        together = []
        for i in range(len(CASES)):  # staggered: each joins a batch already decoding
            together.append(run(i))
        assert [(t.result.finish_reason, t.request.output_ids) for t in together] == [
            (r.finish_reason, o) for o, r in alone
        ]
        for i, (out, result) in enumerate(alone):
            compiled = None if specs[i] is None else compiler.compile(specs[i])
            assert out == reference_constrained(
                lm, prompts[i % 3].embeddings, inputs[i], CASES[i][2], compiled
            ), CASES[i]
            if result.finish_reason is FinishReason.EOS:
                check_valid(specs[i], result.generated_text)
        reasons = [r.finish_reason for _, r in alone]
        assert (
            reasons[0] is reasons[2] is reasons[4] is FinishReason.EOS
        )  # complete: the grammar allowed nothing more
        assert reasons[5] is FinishReason.LENGTH
        assert engine.mask_stats.passes > 0 and engine.mask_stats.grammar_errors == 0
    finally:
        engine.stop()


def test_a_preempted_constrained_row_resumes_its_matcher_exactly(lm, prompts, compiler):
    numbers = {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 999},
        "minItems": 9,
        "maxItems": 9,
    }
    spec = OutputSpec.of(OutputKind.JSON_SCHEMA, numbers)
    block_bytes = Engine(lm, SchedulerConfig(1, 1, 1)).runner.block_bytes
    # 9 usable blocks of 16 tokens: three prefixes take 3, and six rows grow to 3 blocks each.
    engine = Engine(lm, SchedulerConfig(16, 100_000, 1000), 1 << 30, kv_cache_bytes=10 * block_bytes)
    engine.start()
    rng = random.Random(11)
    try:
        tracked = []
        for k in range(6):
            t = make_request(
                prompts[k % 3],
                [rng.randrange(40_000) for _ in range(3 + k)],
                SamplingParams(max_new_tokens=40),
            )
            t.request.matcher = compiler.compile(spec).matcher()
            engine.submit(t.request)
            tracked.append(t)
        for t in tracked:
            ref = reference_constrained(
                lm, t.request.prompt.embeddings, t.request.input_ids, 40, compiler.compile(spec)
            )
            assert t.result and t.request.output_ids == ref
            if t.result.finish_reason is FinishReason.EOS:
                check_valid(spec, t.result.generated_text)
        assert any(t.request.preemptions > 0 for t in tracked)
    finally:
        engine.stop()


def test_seeded_sampling_under_a_constraint_is_the_same_alone_and_mixed_and_stays_valid(
    lm, prompts, compiler
):
    spec = OutputSpec.of(OutputKind.REGEX, DATE)
    engine = start_engine(lm)
    try:
        params = SamplingParams(max_new_tokens=14, do_sample=True, temperature=1.5, seed=42)

        def run(extra: int):
            others = [
                make_request(prompts[1], [7] * (k + 2), SamplingParams(max_new_tokens=9))
                for k in range(extra)
            ]
            t = make_request(prompts[0], [3, 4, 5], params)
            t.request.matcher = compiler.compile(spec).matcher()
            for r in [*others, t]:
                engine.submit(r.request)
            return t.result

        alone, mixed = run(0), run(3)
        assert alone.generated_text == mixed.generated_text and re.fullmatch(DATE, alone.generated_text)
    finally:
        engine.stop()


def test_a_matcher_in_error_fails_its_row_with_the_reason_and_the_batch_goes_on(lm, prompts, compiler):
    engine = start_engine(lm)
    try:
        broken = make_request(prompts[0], [1, 2], SamplingParams(max_new_tokens=5))
        broken.request.matcher = compiler.compile(OutputSpec.of(OutputKind.CHOICE, LABELS)).matcher()
        broken.request.matcher.consume_token(
            lm.tokenizer("zzz", add_special_tokens=False)["input_ids"][0]
        )  # never allowed
        fine = make_request(prompts[1], [3, 4], SamplingParams(max_new_tokens=5))
        engine.submit(broken.request)
        engine.submit(fine.request)
        assert "structured output" in broken.error.message
        assert fine.result.finish_reason is FinishReason.LENGTH
        assert engine.mask_stats.grammar_errors == 1
    finally:
        engine.stop()
