"""n samples of one prompt: one prefill, the other samples forked from it sharing its blocks; each
sample gives exactly what it gives when run alone with its own seed."""

from __future__ import annotations

import pytest

from server.admission import sample_seed
from server.engine.request import FinishReason, SamplingParams
from server.models import LoadedModel
from tests.support import Tracked, make_prompt, make_request, reference_greedy, start_engine


@pytest.fixture(scope="module")
def prompts(lm: LoadedModel):
    return [make_prompt(f"task{i}", p, lm, seed=i) for i, p in enumerate([3, 7])]


def samples(prompt, ids: list[int], params: SamplingParams, n: int, seed: int = 5) -> list[Tracked]:
    tracked = [make_request(prompt, ids, params, seed=sample_seed(seed, i)) for i in range(n)]
    tracked[0].request.forks = [t.request for t in tracked[1:]]
    return tracked


@pytest.mark.parametrize(
    "length", [5, 16, 21]
)  # a partial last block (copied), a full one (nothing to copy), past one block
def test_forked_samples_match_each_sample_run_alone_and_cost_one_prefill(lm, prompts, length):
    params = SamplingParams(max_new_tokens=12, do_sample=True, temperature=1.3, ignore_eos=True)
    ids = [(7 * k + 3) % 30_000 for k in range(length)]
    engine = start_engine(lm)
    try:
        alone = []
        for i in range(4):
            t = make_request(prompts[0], ids, params, seed=sample_seed(5, i))
            engine.submit(t.request)
            alone.append(t.result.generated_text)
        before = (engine.stats.rows_prefilled, engine.scheduler.forked, engine.runner.pool.stats.allocated)
        other = make_request(prompts[1], [9, 8, 7], SamplingParams(max_new_tokens=20))  # a running neighbour
        engine.submit(other.request)
        group = samples(prompts[0], ids, params, 4)
        engine.submit(group[0].request)
        assert [t.result.generated_text for t in group] == alone
        assert len(set(alone)) > 1  # the samples differ: each has its own seed stream
        assert engine.stats.rows_prefilled - before[0] == 2  # the neighbour and one row for the four samples
        assert engine.scheduler.forked - before[1] == 3
        assert other.request.output_ids == reference_greedy(lm, prompts[1].embeddings, [9, 8, 7], 20)
        pool = (
            engine.pool_stats()
        )  # every block a sample held came back: only prefixes and cached blocks remain
        assert (
            engine.scheduler.held_tokens == 0
            and pool["blocks_used"] == pool["prefix_blocks"] + pool["cached_token_blocks"]
        )
    finally:
        engine.stop()


def test_samples_that_find_no_row_wait_and_are_prefilled_alone_still_exact(lm, prompts):
    ids = [11, 12, 13, 14, 15, 16, 17]
    engine = start_engine(lm, max_batch_size=2)
    try:
        group = samples(prompts[1], ids, SamplingParams(max_new_tokens=6), 4)
        engine.submit(group[0].request)
        ref = reference_greedy(lm, prompts[1].embeddings, ids, 6)
        for t in group:
            assert t.result.finish_reason is FinishReason.LENGTH and t.request.output_ids == ref
        assert engine.scheduler.forked == 1  # one row was free beside the parent; two waited for rows
    finally:
        engine.stop()


def test_a_cancelled_parent_before_its_prefill_ends_its_samples_too(lm, prompts):
    engine = start_engine(lm)
    try:
        group = samples(prompts[0], [1, 2, 3], SamplingParams(max_new_tokens=4), 3)
        group[0].request.cancel()
        engine.submit(group[0].request)
        assert [t.result.finish_reason for t in group] == [FinishReason.CANCELLED] * 3
    finally:
        engine.stop()


def test_groups_of_samples_take_their_rows_together_so_every_sample_forks(lm, prompts):
    """Four prompts with n=4 under a batch of 8 rows: a prompt is admitted only when its four rows are
    free, so each prefill is followed by its three forks and nobody is prefilled twice."""
    engine = start_engine(lm, max_batch_size=8)
    try:
        params = SamplingParams(max_new_tokens=5, do_sample=True, seed=None)
        groups = [samples(prompts[g % 2], [g + 1, g + 2, g + 3], params, 4, seed=g) for g in range(4)]
        for group in groups:
            engine.submit(group[0].request)
        for group in groups:
            assert all(t.result.finish_reason is FinishReason.LENGTH for t in group)
        assert engine.stats.rows_prefilled == 4 and engine.scheduler.forked == 12
    finally:
        engine.stop()
