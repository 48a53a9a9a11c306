"""Tests for server/engine/sampler.py: greedy rows, hashed per-row noise, warpers, penalty,
batch invariance."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from server.engine.request import Request, SamplingParams
from server.engine.sampler import (
    SamplingTensors,
    _filter_top_k_top_p,
    apply_openai_penalties,
    apply_repetition_penalty,
    prepare,
    row_uniforms,
    sample,
)
from server.prompts.types import PromptKind, SoftPrompt


def make_params(
    n: int,
    sampling: bool | list[bool] = True,
    temperature: float | list[float] = 1.0,
    top_k: int | list[int] = 0,
    top_p: float | list[float] = 1.0,
    repetition_penalty: float | list[float] = 1.0,
    seeds: int | list[int] = 0,
) -> SamplingTensors:
    def col(v, dtype):
        return torch.tensor(v if isinstance(v, list) else [v] * n, dtype=dtype)

    return SamplingTensors(
        sampling=col(sampling, torch.bool),
        temperature=col(temperature, torch.float32),
        top_k=col(top_k, torch.int64),
        top_p=col(top_p, torch.float32),
        repetition_penalty=col(repetition_penalty, torch.float32),
        seeds=col(seeds, torch.int64),
    )


def take_rows(p: SamplingTensors, rows: list[int]) -> SamplingTensors:
    idx = torch.tensor(rows, dtype=torch.int64)
    return SamplingTensors(
        sampling=p.sampling[idx],
        temperature=p.temperature[idx],
        top_k=p.top_k[idx],
        top_p=p.top_p[idx],
        repetition_penalty=p.repetition_penalty[idx],
        seeds=p.seeds[idx],
    )


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum().item()
    expected = probs.double() * n
    keep = expected > 0
    return float((((counts.double() - expected) ** 2)[keep] / expected[keep]).sum())


# Upper 1e-4 tail quantiles of chi-square (df -> value), so honest code fails about once in 10^4 runs
# (and the tests are deterministic anyway: seeds are fixed).
CHI2_CRIT = {1: 15.14, 2: 18.42, 3: 21.11, 4: 23.51, 5: 25.74, 7: 29.88}


# --- greedy -------------------------------------------------------------------------------------


def test_greedy_rows_return_argmax_and_log_softmax() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 40, generator=g) * 3
    # Greedy rows must ignore their warper settings entirely.
    params = make_params(5, sampling=False, temperature=0.3, top_k=2, top_p=0.1, seeds=[1, 2, 3, 4, 5])
    tokens, logprobs = sample(logits, params, torch.zeros(5, dtype=torch.int64), None)
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, logits.argmax(-1))
    expected = logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs.float(), expected, rtol=0, atol=1e-6)


def test_greedy_row_inside_sampling_batch_uses_plain_log_softmax() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 40, generator=g) * 3
    params = make_params(
        3, sampling=[True, False, True], temperature=[0.5, 0.5, 2.0], top_k=[0, 3, 5], seeds=[7, 8, 9]
    )
    tokens, logprobs = sample(logits, params, torch.zeros(3, dtype=torch.int64), None)
    assert int(tokens[1]) == int(logits[1].argmax())
    torch.testing.assert_close(float(logprobs[1]), float(logits[1].log_softmax(-1).max()), rtol=0, atol=1e-6)


# --- the hashed noise ---------------------------------------------------------------------------


def test_uniforms_are_strictly_inside_unit_interval_and_roughly_uniform() -> None:
    seeds = torch.tensor([0, 1, -1, 2**31 - 1, 2**32, 2**62, -(2**63)], dtype=torch.int64).repeat_interleave(
        3
    )
    steps = torch.tensor([0, 1, 10_000] * 7, dtype=torch.int64)
    u = row_uniforms(seeds, steps, 5000)
    assert u.shape == (21, 5000)
    assert bool((u > 0).all()) and bool((u < 1).all())
    # 105k draws: the mean and the 10-bin histogram of a uniform variable.
    assert abs(float(u.mean()) - 0.5) < 0.005
    hist = torch.histc(u.float(), bins=10, min=0.0, max=1.0)
    assert chi_square(hist, torch.full((10,), 0.1)) < 40.0  # df 9, p ~ 1e-5


def test_uniforms_depend_only_on_seed_step_and_token() -> None:
    seeds = torch.tensor([11, 22, 33, 44], dtype=torch.int64)
    steps = torch.tensor([0, 5, 5, 9], dtype=torch.int64)
    full = row_uniforms(seeds, steps, 300)
    assert torch.equal(full, row_uniforms(seeds, steps, 300))  # deterministic
    for i in range(4):
        alone = row_uniforms(seeds[i : i + 1], steps[i : i + 1], 300)
        assert torch.equal(alone[0], full[i])
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.equal(row_uniforms(seeds[perm], steps[perm], 300), full[perm])
    # The vocabulary size only truncates: token t's noise does not depend on how many tokens there are.
    assert torch.equal(row_uniforms(seeds, steps, 100), full[:, :100])


def test_uniforms_differ_across_seeds_steps_and_tokens() -> None:
    base_seed, base_step = 12345, 3
    variants = [
        (base_seed, base_step),
        (base_seed + 1, base_step),
        (base_seed, base_step + 1),
        (base_seed + 2**32, base_step),  # only the high 32 bits differ
        (-base_seed, base_step),
    ]
    seeds = torch.tensor([s for s, _ in variants], dtype=torch.int64)
    steps = torch.tensor([t for _, t in variants], dtype=torch.int64)
    u = row_uniforms(seeds, steps, 1000)
    for i in range(len(variants)):
        for j in range(i + 1, len(variants)):
            # Distinct streams: essentially no coincidences, and uncorrelated.
            assert float((u[i] == u[j]).float().mean()) < 0.01, (variants[i], variants[j])
            corr = torch.corrcoef(torch.stack([u[i], u[j]]))[0, 1]
            assert abs(float(corr)) < 0.15, (variants[i], variants[j])
    # Within one row, tokens get (nearly) distinct values.
    assert torch.unique(u[0]).numel() > 990


# --- batch invariance of sampled tokens ----------------------------------------------------------


def test_sampled_row_is_the_same_alone_and_at_any_position_in_a_batch() -> None:
    g = torch.Generator().manual_seed(3)
    n, vocab = 6, 64
    logits = torch.randn(n, vocab, generator=g) * 2
    params = make_params(
        n,
        sampling=True,
        temperature=[0.7, 1.0, 1.3, 0.9, 1.0, 2.0],
        top_k=[0, 10, 0, 5, 0, 20],
        top_p=[1.0, 1.0, 0.9, 0.95, 0.7, 1.0],
        seeds=[100, 200, 300, 400, 500, 600],
    )
    steps = torch.tensor([0, 1, 2, 3, 4, 5], dtype=torch.int64)
    tokens, logprobs = sample(logits, params, steps, None)
    for i in range(n):
        t1, lp1 = sample(logits[i : i + 1], take_rows(params, [i]), steps[i : i + 1], None)
        assert int(t1) == int(tokens[i])
        torch.testing.assert_close(lp1[0], logprobs[i], rtol=0, atol=1e-6)
    for perm in ([5, 4, 3, 2, 1, 0], [2, 0, 5, 1, 3, 4]):
        idx = torch.tensor(perm)
        tp, lpp = sample(logits[idx], take_rows(params, perm), steps[idx], None)
        assert torch.equal(tp, tokens[idx])
        torch.testing.assert_close(lpp, logprobs[idx], rtol=0, atol=1e-6)


def test_different_seeds_and_steps_give_different_draws() -> None:
    # A flat distribution over 1000 tokens: the same token from two independent draws is a 1/1000 event.
    n = 50
    logits = torch.zeros(n, 1000)
    by_seed, _ = sample(logits, make_params(n, seeds=list(range(n))), torch.zeros(n, dtype=torch.int64), None)
    by_step, _ = sample(logits, make_params(n, seeds=7), torch.arange(n, dtype=torch.int64), None)
    assert torch.unique(by_seed).numel() >= 45
    assert torch.unique(by_step).numel() >= 45


def test_mixed_greedy_and_sampling_batch_matches_each_row_alone() -> None:
    g = torch.Generator().manual_seed(4)
    n, vocab = 8, 50
    logits = torch.randn(n, vocab, generator=g) * 2
    seen = torch.rand(n, vocab, generator=g) < 0.2
    params = make_params(
        n,
        sampling=[False, True, False, True, True, False, True, True],
        temperature=[1.0, 0.8, 1.0, 1.5, 1.0, 1.0, 0.6, 1.0],
        top_k=[0, 0, 0, 7, 0, 0, 3, 0],
        top_p=[1.0, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5],
        repetition_penalty=[1.0, 1.3, 1.2, 1.0, 1.0, 1.0, 1.1, 1.0],
        seeds=[1, 2, 3, 4, 5, 6, 7, 8],
    )
    steps = torch.tensor([0, 3, 1, 4, 1, 5, 9, 2], dtype=torch.int64)
    tokens, logprobs = sample(logits, params, steps, seen)
    for i in range(n):
        ti, lpi = sample(logits[i : i + 1], take_rows(params, [i]), steps[i : i + 1], seen[i : i + 1])
        assert int(ti) == int(tokens[i]), i
        torch.testing.assert_close(lpi[0], logprobs[i], rtol=0, atol=1e-6)
    # Greedy rows are the argmax of their (penalised) logits.
    penalised = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    for i in (0, 2, 5):
        assert int(tokens[i]) == int(penalised[i].argmax())


def test_unfiltered_row_is_unaffected_by_a_filtering_neighbour() -> None:
    g = torch.Generator().manual_seed(5)
    vocab = 49152  # the default model's vocabulary
    logits = torch.randn(2, vocab, generator=g) * 5
    # top_p = 1.0 and top_k = 0 are documented as "off": no logit may be removed.
    filtered = _filter_top_k_top_p(logits[:1], torch.zeros(1, dtype=torch.int64), torch.ones(1))
    assert bool(torch.isfinite(filtered).all())
    # ... and so the row's reported log-probability cannot depend on a neighbour that uses top_k.
    alone = make_params(1, sampling=True, seeds=42)
    pair = make_params(2, sampling=True, top_k=[0, 5], seeds=[42, 43])
    steps = torch.zeros(2, dtype=torch.int64)
    t_alone, lp_alone = sample(logits[:1], alone, steps[:1], None)
    t_pair, lp_pair = sample(logits, pair, steps, None)
    assert int(t_alone) == int(t_pair[0])
    torch.testing.assert_close(lp_alone[0], lp_pair[0], rtol=0, atol=1e-7)


# --- the sampled distribution -------------------------------------------------------------------


@pytest.mark.parametrize("vary", ["seed", "step"])
def test_empirical_frequencies_match_tempered_softmax(vary: str) -> None:
    n = 20_000
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.5])
    temperature = 0.6
    logits = base.expand(n, -1).clone()
    if vary == "seed":
        params = make_params(n, temperature=temperature, seeds=list(range(n)))
        steps = torch.full((n,), 3, dtype=torch.int64)
    else:  # one request's successive draws must also be independent samples
        params = make_params(n, temperature=temperature, seeds=987654321)
        steps = torch.arange(n, dtype=torch.int64)
    tokens, logprobs = sample(logits, params, steps, None)
    counts = torch.bincount(tokens, minlength=6)
    expected = (base / temperature).softmax(-1)
    assert chi_square(counts, expected) < CHI2_CRIT[5]
    # The untempered softmax is clearly rejected by the same statistic (the test has power).
    assert chi_square(counts, base.softmax(-1)) > 10 * CHI2_CRIT[5]
    # Reported log-probabilities are those of the tempered distribution.
    torch.testing.assert_close(logprobs, expected.log()[tokens], rtol=0, atol=1e-5)


def test_top_k_never_leaves_the_top_k() -> None:
    n, vocab, k = 5000, 30, 4
    g = torch.Generator().manual_seed(6)
    row = torch.randn(vocab, generator=g)
    logits = row.expand(n, -1).clone()
    tokens, logprobs = sample(
        logits,
        make_params(n, temperature=3.0, top_k=k, seeds=list(range(n))),
        torch.zeros(n, dtype=torch.int64),
        None,
    )
    top = set(row.topk(k).indices.tolist())
    assert set(tokens.tolist()) == top  # only the top k, and every one of them reachable
    kept = (row[list(sorted(top))] / 3.0).softmax(-1)
    counts = torch.bincount(tokens, minlength=vocab)[list(sorted(top))]
    assert chi_square(counts, kept) < CHI2_CRIT[3]
    # log-probabilities are renormalised over the k survivors
    order = sorted(top)
    for t, lp in zip(tokens[:50].tolist(), logprobs[:50].tolist()):
        assert math.isclose(lp, math.log(float(kept[order.index(t)])), abs_tol=1e-5)


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    perm = torch.tensor([2, 0, 3, 1])  # shuffle token ids so the filter must scatter back correctly
    row = probs.log()[perm]  # token perm[j] ... row[j] is the logit of token j
    n = 4000

    def draw(top_p: float) -> torch.Tensor:
        logits = row.expand(n, -1).clone()
        tokens, _ = sample(
            logits, make_params(n, top_p=top_p, seeds=list(range(n))), torch.zeros(n, dtype=torch.int64), None
        )
        return tokens

    # the token ids holding probabilities 0.5, 0.3, 0.15
    first, second, third = (perm.tolist().index(r) for r in range(3))

    assert set(draw(0.8).tolist()) == {first, second}  # 0.5 + 0.3 reaches 0.8
    assert set(draw(0.75).tolist()) == {first, second}
    assert set(draw(0.85).tolist()) == {first, second, third}
    assert set(draw(0.5).tolist()) == {first}  # 0.5 alone reaches 0.5
    assert set(draw(1e-6).tolist()) == {first}  # the top token always survives
    assert set(draw(1.0).tolist()) == {0, 1, 2, 3}

    tokens = draw(0.8)
    counts = torch.bincount(tokens, minlength=4)[[first, second]]
    assert chi_square(counts, torch.tensor([0.5, 0.3]) / 0.8) < CHI2_CRIT[1]


def test_filter_top_k_top_p_masks_exactly_the_expected_sets() -> None:
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(4, 20, generator=g, dtype=torch.float64)
    top_k = torch.tensor([0, 3, 0, 5])
    top_p = torch.tensor([0.6, 1.0, 1e-9, 0.5], dtype=torch.float64)
    out = _filter_top_k_top_p(logits, top_k, top_p)
    for i in range(4):
        probs = logits[i].softmax(-1)
        order = probs.argsort(descending=True).tolist()
        k = int(top_k[i]) or 20
        kept_probs = logits[i][order[:k]].softmax(-1)
        # smallest prefix of the top-k (renormalised) whose mass reaches top_p
        m, mass = 0, 0.0
        while m < k and (m == 0 or mass < float(top_p[i])):
            mass += float(kept_probs[m])
            m += 1
        expected = set(order[:m])
        finite = set(torch.isfinite(out[i]).nonzero().flatten().tolist())
        assert finite == expected, i
        idx = sorted(expected)
        assert torch.equal(out[i][idx], logits[i][idx])  # survivors keep their logits


def test_top_token_survives_top_p_zero() -> None:
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 20, generator=g)
    out = _filter_top_k_top_p(logits, torch.tensor([0, 1, 4]), torch.zeros(3))
    finite = torch.isfinite(out)
    assert finite.sum(-1).tolist() == [1, 1, 1]
    assert torch.equal(finite.float().argmax(-1), logits.argmax(-1))


# --- repetition penalty --------------------------------------------------------------------------


def test_repetition_penalty_matches_transformers() -> None:
    g = torch.Generator().manual_seed(8)
    n, vocab = 4, 40
    logits = torch.randn(n, vocab, generator=g) * 3
    logits[0, 0] = 0.0  # the zero edge case
    penalties = [1.0, 1.2, 0.8, 2.5]
    history = [torch.randint(0, vocab, (12,), generator=g) for _ in range(n)]
    history[0][0] = 0
    seen = torch.zeros(n, vocab, dtype=torch.bool)
    for i, h in enumerate(history):
        seen[i, h] = True
    ours = apply_repetition_penalty(logits, seen, torch.tensor(penalties))
    for i in range(n):
        ref = RepetitionPenaltyLogitsProcessor(penalty=penalties[i])(
            history[i][None], logits[i : i + 1].clone()
        )
        torch.testing.assert_close(ours[i], ref[0], rtol=1e-6, atol=0)
    assert not torch.equal(ours[1], logits[1])  # the penalty did something

    # Through sample(): greedy rows pick the argmax of the penalised logits and report its log-softmax.
    params = make_params(n, sampling=False, repetition_penalty=penalties)
    tokens, logprobs = sample(logits, params, torch.zeros(n, dtype=torch.int64), seen)
    for i in range(n):
        ref = RepetitionPenaltyLogitsProcessor(penalty=penalties[i])(
            history[i][None], logits[i : i + 1].clone()
        )[0]
        assert int(tokens[i]) == int(ref.argmax())
        torch.testing.assert_close(float(logprobs[i]), float(ref.log_softmax(-1).max()), rtol=0, atol=1e-5)


def test_repetition_penalty_changes_the_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.9, -1.0]])
    seen = torch.tensor([[True, False, False]])
    tokens, _ = sample(
        logits,
        make_params(1, sampling=False, repetition_penalty=1.5),
        torch.zeros(1, dtype=torch.int64),
        seen,
    )
    assert int(tokens[0]) == 1  # 3.0 / 1.5 = 2.0 < 2.9
    tokens, _ = sample(
        logits,
        make_params(1, sampling=False, repetition_penalty=1.0),
        torch.zeros(1, dtype=torch.int64),
        seen,
    )
    assert int(tokens[0]) == 0


# --- OpenAI's penalties and logit_bias ------------------------------------------------------------


def test_openai_penalties_follow_the_formula_token_by_token() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [1.0, 1.0, 1.0, 1.0]])
    counts = torch.tensor([[0.0, 2.0, 1.0, 3.0], [1.0, 0.0, 0.0, 0.0]])
    frequency, presence = torch.tensor([0.5, -1.0]), torch.tensor([1.5, 0.25])
    out = apply_openai_penalties(logits, counts, frequency, presence)
    for b in range(2):
        for j in range(4):  # logit[j] - count[j] * frequency - (count[j] > 0) * presence, by hand
            c = counts[b, j].item()
            expected = logits[b, j].item() - c * frequency[b].item() - (presence[b].item() if c > 0 else 0.0)
            assert out[b, j].item() == pytest.approx(expected)


def _request(output: list[int], params: SamplingParams, inputs: list[int] | None = None) -> Request:
    prompt = SoftPrompt(
        name="t",
        kind=PromptKind.PROMPT_TUNING,
        embeddings=torch.zeros(1, 4),
        content_hash="",
        source=Path("."),
    )
    r = Request(
        task="t", prompt=prompt, input_ids=inputs or [3, 3, 3], params=params, seed=0, sink=lambda e: None
    )
    r.output_ids = list(output)
    return r


def test_prepare_counts_generated_tokens_only_and_places_each_rows_bias() -> None:
    rows = [
        _request(
            [1, 1, 2], SamplingParams(frequency_penalty=0.5), inputs=[1, 1, 1, 1]
        ),  # input tokens do not count
        _request([0], SamplingParams(logit_bias=((4, -100.0), (2, 7.5)))),
        _request([2], SamplingParams()),
    ]
    batch = prepare(rows, 6, torch.device("cpu"))
    assert batch.flags.penalty and batch.seen is None  # no repetition penalty: no seen matrix
    assert batch.counts is not None and batch.counts[0].tolist() == [0, 2, 1, 0, 0, 0]
    assert batch.counts[2].tolist() == [0, 0, 1, 0, 0, 0]
    assert batch.params.presence_penalty is not None and batch.params.presence_penalty.tolist() == [0, 0, 0]
    assert batch.bias is not None and batch.bias[1].tolist() == [0, 0, 7.5, 0, -100, 0]
    assert batch.bias[0].abs().sum() == 0 and batch.bias[2].abs().sum() == 0


def test_bias_then_penalties_change_the_greedy_choice_of_their_row_only() -> None:
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0]] * 3)
    rows = [
        _request([0, 0], SamplingParams(frequency_penalty=1.0)),  # 5 - 2 = 3 < 4: token 1
        _request([], SamplingParams(logit_bias=((3, 6.0),))),  # 0 + 6 > 5: token 3
        _request([0, 0], SamplingParams()),  # untouched: token 0
    ]
    batch = prepare(rows, 4, torch.device("cpu"))
    tokens, _ = sample(
        logits.clone(), batch.params, batch.steps, batch.seen, batch.flags, batch.counts, batch.bias
    )
    assert tokens.tolist() == [1, 3, 0]
    # The order: the bias applies before the repetition penalty (vLLM's): (1 + 7) / 2 = 4 < 5, where
    # penalising first would give 1 / 2 + 7 = 7.5 and pick token 2.
    row = [_request([], SamplingParams(repetition_penalty=2.0, logit_bias=((2, 7.0),)), inputs=[2])]
    batch = prepare(row, 4, torch.device("cpu"))
    tokens, _ = sample(
        torch.tensor([[5.0, 4.0, 1.0, 0.0]]),
        batch.params,
        batch.steps,
        batch.seen,
        batch.flags,
        batch.counts,
        batch.bias,
    )
    assert tokens.tolist() == [0]
