"""The engine against a solo reference: mixed tasks, different lengths, late joins, limits, faults."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
import torch

from server.engine.engine import Engine
from server.engine.request import FinishReason, SamplingParams, TokenEvent
from server.engine.runner import Acceleration
from server.engine.scheduler import Policy, SchedulerConfig, ShuttingDown
from server.models import LoadedModel, load_model
from server.prompts.types import PromptKind, SoftPrompt
from tests.support import (
    make_engine,
    make_prompt,
    make_request,
    reference_greedy,
    start_engine,
    submit_and_check_solo,
    wait_until,
)

VOCAB_USED = 40_000  # stay inside ordinary tokens of the real tokenizer


@pytest.fixture(scope="module")
def prompts(lm: LoadedModel):
    return [make_prompt(f"task{i}", p, lm, seed=i) for i, p in enumerate([1, 4, 9, 20])]


def random_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB_USED) for _ in range(n)]


def test_mixed_batch_matches_solo_reference_with_late_joins(lm, prompts):
    """4 tasks with different prompt lengths, inputs of 1..23 tokens, requests joining mid-decode."""
    rng = random.Random(0)
    engine = start_engine(lm)
    try:
        tracked = []
        specs = [(prompts[k % 4], random_ids(rng, 1 + (k * 5) % 23), 4 + (k * 7) % 15) for k in range(16)]
        first, late = specs[:10], specs[10:]
        for prompt, ids, n in first:
            tracked.append(make_request(prompt, ids, SamplingParams(max_new_tokens=n)))
            engine.submit(tracked[-1].request)
        # Let the batch get going, then add more while it decodes.
        assert tracked[0].done.wait(60)
        for prompt, ids, n in late:
            tracked.append(make_request(prompt, ids, SamplingParams(max_new_tokens=n)))
            engine.submit(tracked[-1].request)
        for t, (prompt, ids, n) in zip(tracked, specs):
            result = t.result
            expected = reference_greedy(lm, prompt.embeddings, ids, n)
            assert t.request.output_ids == expected, (
                f"{prompt.name} L={len(ids)} differs from the solo reference"
            )
            assert result.generated_tokens == n and result.finish_reason is FinishReason.LENGTH
            assert result.input_tokens == len(ids) and result.virtual_tokens == prompt.num_virtual_tokens
            assert result.generated_text == lm.tokenizer.decode(expected, skip_special_tokens=True)
        stats = engine.stats
        assert stats.mixed_task_passes > 0 and stats.max_tasks_in_pass == 4
        assert stats.joined_running_batch > 0
        assert stats.max_rows_in_pass > 4
    finally:
        engine.stop()


def test_late_request_starts_within_two_steps(lm, prompts):
    """A request submitted while another decodes gets its first token within two steps."""
    engine = start_engine(lm)
    rng = random.Random(1)
    try:
        order: list[str] = []
        late = make_request(prompts[2], random_ids(rng, 7), SamplingParams(max_new_tokens=3), stream=True)
        long = make_request(prompts[1], random_ids(rng, 5), SamplingParams(max_new_tokens=40), stream=True)

        def long_sink(event, _orig=long.sink):
            _orig(event)
            if isinstance(event, TokenEvent):
                order.append("long")
                if order.count("long") == 5:
                    engine.submit(late.request)  # from inside the loop: deterministic timing

        def late_sink(event, _orig=late.sink):
            _orig(event)
            if isinstance(event, TokenEvent):
                order.append("late")

        long.request.sink = long_sink
        late.request.sink = late_sink
        engine.submit(long.request)
        assert late.result.generated_tokens == 3 and long.result.generated_tokens == 40
        first_late = order.index("late")
        assert order[:first_late].count("long") <= 5 + 2
        assert late.done.is_set() and order.index("late") < len(order) - 1, (
            "the late request waited for the batch to drain"
        )
        assert engine.stats.joined_running_batch == 1
        assert long.request.output_ids == reference_greedy(
            lm, prompts[1].embeddings, long.request.input_ids, 40
        )
        assert late.request.output_ids == reference_greedy(
            lm, prompts[2].embeddings, late.request.input_ids, 3
        )
    finally:
        engine.stop()


def test_seeded_sampling_is_the_same_alone_and_in_a_mixed_batch(lm, prompts):
    rng = random.Random(2)
    specs = [
        (
            prompts[k % 4],
            random_ids(rng, 2 + k),
            SamplingParams(
                max_new_tokens=12,
                do_sample=True,
                temperature=0.7 + 0.1 * k,
                top_k=[0, 50, 5][k % 3],
                top_p=[1.0, 0.9, 0.5][k % 3],
                repetition_penalty=[1.0, 1.3][k % 2],
                seed=1000 + k,
            ),
        )
        for k in range(8)
    ]
    engine = start_engine(lm)
    try:
        alone = []
        for prompt, ids, params in specs:
            t = make_request(prompt, ids, params)
            engine.submit(t.request)
            alone.append(t.result.generated_text)
            assert t.result.seed == params.seed
        together = [make_request(p, ids, params) for p, ids, params in specs]
        for t in together:
            engine.submit(t.request)
        assert [t.result.generated_text for t in together] == alone
        assert engine.stats.mixed_task_passes > 0
        # Different seeds give different samples (the seed is really used).
        other = make_request(specs[0][0], specs[0][1], SamplingParams(**{**specs[0][2].__dict__, "seed": 7}))
        engine.submit(other.request)
        assert other.result.generated_text != alone[0]
    finally:
        engine.stop()


def test_limits_rows_and_tokens_are_respected(lm, prompts):
    rng = random.Random(3)
    specs = [(prompts[k % 4], random_ids(rng, 3 + k), 6) for k in range(9)]
    # Each row reserves P + L + 6 tokens; 90 tokens holds only a few rows at a time.
    engine = start_engine(lm, max_batch_size=3, max_batch_tokens=90)
    try:
        submit_and_check_solo(engine, lm, specs)
        assert engine.stats.max_rows_in_pass <= 3
        assert engine.scheduler.held_tokens == 0 and not engine.scheduler.running
    finally:
        engine.stop()


def test_eos_ends_a_row_and_is_not_in_the_text(lm, prompts):
    rng = random.Random(4)
    ids = random_ids(rng, 6)
    expected = reference_greedy(lm, prompts[1].embeddings, ids, 10)
    engine = start_engine(lm)
    engine.eos_ids = {expected[3]}
    try:
        t = make_request(prompts[1], ids, SamplingParams(max_new_tokens=10))
        engine.submit(t.request)
        first_eos = expected.index(expected[3])
        assert t.result.finish_reason is FinishReason.EOS
        assert t.request.output_ids == expected[: first_eos + 1]
        assert t.result.generated_tokens == first_eos + 1
        assert t.result.generated_text == lm.tokenizer.decode(expected[:first_eos], skip_special_tokens=True)
    finally:
        engine.stop()


def test_ignore_eos_runs_past_eos_while_a_normal_row_in_the_same_batch_stops(lm, prompts):
    rng = random.Random(4)
    ids = random_ids(rng, 6)
    expected = reference_greedy(lm, prompts[1].embeddings, ids, 10)
    first_eos = expected.index(expected[3])
    engine = make_engine(lm)
    engine.eos_ids = {expected[3]}
    normal = make_request(prompts[1], ids, SamplingParams(max_new_tokens=10))
    ignoring = make_request(prompts[1], ids, SamplingParams(max_new_tokens=10, ignore_eos=True))
    streamed = make_request(prompts[1], ids, SamplingParams(max_new_tokens=10, ignore_eos=True), stream=True)
    for t in (normal, ignoring, streamed):
        engine.scheduler.add(t.request)  # queued before the loop starts: one batch
    engine.start()
    try:
        assert normal.result.finish_reason is FinishReason.EOS
        assert normal.request.output_ids == expected[: first_eos + 1]
        full = lm.tokenizer.decode(
            expected, skip_special_tokens=True
        )  # the eos here is an ordinary token: its text stays
        for t in (ignoring, streamed):
            assert t.result.finish_reason is FinishReason.LENGTH
            assert t.request.output_ids == expected and t.result.generated_tokens == 10
            assert t.result.generated_text == full
        assert "".join(e.text for e in streamed.events if isinstance(e, TokenEvent)) == full
        assert engine.stats.max_rows_in_pass == 3 and engine.stats.prefill_passes == 1
    finally:
        engine.stop()


def test_stop_string_ends_a_row_and_is_cut(lm, prompts):
    rng = random.Random(5)
    ids = random_ids(rng, 6)
    expected = reference_greedy(lm, prompts[3].embeddings, ids, 12)
    full = lm.tokenizer.decode(expected, skip_special_tokens=True)
    head = lm.tokenizer.decode(expected[:5], skip_special_tokens=True)
    stop = full[len(head) : len(head) + 3]
    assert stop.strip(), "test setup: pick a visible stop string"
    engine = start_engine(lm)
    try:
        t = make_request(prompts[3], ids, SamplingParams(max_new_tokens=12, stop=(stop,)))
        engine.submit(t.request)
        assert t.result.finish_reason is FinishReason.STOP
        assert t.result.generated_text == full[: full.index(stop)]
        assert stop not in t.result.generated_text
    finally:
        engine.stop()


def test_cancelled_row_leaves_and_others_are_unaffected(lm, prompts):
    rng = random.Random(6)
    engine = start_engine(lm)
    try:
        victim = make_request(prompts[0], random_ids(rng, 4), SamplingParams(max_new_tokens=200), stream=True)
        other = make_request(prompts[1], random_ids(rng, 9), SamplingParams(max_new_tokens=30))

        def cancel_after_3(event, _orig=victim.sink):
            _orig(event)
            if isinstance(event, TokenEvent) and len(victim.request.output_ids) == 3:
                victim.request.cancel()

        victim.request.sink = cancel_after_3
        engine.submit(victim.request)
        engine.submit(other.request)
        assert victim.result.finish_reason is FinishReason.CANCELLED
        assert len(victim.request.output_ids) <= 4  # dropped at the next step
        assert other.request.output_ids == reference_greedy(
            lm, prompts[1].embeddings, other.request.input_ids, 30
        )
    finally:
        engine.stop()


def test_poisoned_prompt_fails_only_its_own_request(lm, prompts):
    rng = random.Random(7)
    bad = make_prompt("poisoned", 3, lm, seed=99)
    bad.embeddings[1, 0] = float("nan")
    engine = start_engine(lm)
    try:
        good = make_request(prompts[2], random_ids(rng, 5), SamplingParams(max_new_tokens=8))
        poisoned = make_request(bad, random_ids(rng, 5), SamplingParams(max_new_tokens=8))
        engine.submit(good.request)
        engine.submit(poisoned.request)
        assert "non-finite" in poisoned.error.message
        assert good.request.output_ids == reference_greedy(
            lm, prompts[2].embeddings, good.request.input_ids, 8
        )
        assert engine.alive
        again = make_request(prompts[0], random_ids(rng, 3), SamplingParams(max_new_tokens=4))
        engine.submit(again.request)
        assert again.result.generated_tokens == 4
    finally:
        engine.stop()


ACCELERATION = [Acceleration(), Acceleration(prepack_weights=False, native_kernels=False)]


@pytest.mark.parametrize("accel", ACCELERATION, ids=["accelerated", "plain"])
def test_float32_mixed_batch_matches_reference(tiny_model_dir, prompts, accel):
    """The serving dtype on CPU: same check in float32 (prompts recast), with the packed weights and
    native kernels and without (--no-prepack-weights --no-native-kernels)."""
    lm32 = load_model(str(tiny_model_dir), dtype="float32")
    rng = random.Random(8)
    engine = start_engine(lm32, accel=accel)
    try:
        specs = [(p.embeddings.float(), random_ids(rng, 3 + 4 * k), 10) for k, p in enumerate(prompts)]
        tracked = []
        for k, (emb, ids, n) in enumerate(specs):
            prompt = make_prompt(f"f32-{k}", emb.shape[0], lm32, seed=k)
            object.__setattr__(prompt, "embeddings", emb)
            tracked.append((make_request(prompt, ids, SamplingParams(max_new_tokens=n)), emb, ids, n))
            engine.submit(tracked[-1][0].request)
        for t, emb, ids, n in tracked:
            assert t.result.finish_reason is FinishReason.LENGTH
            assert t.request.output_ids == reference_greedy(lm32, emb, ids, n)
    finally:
        engine.stop()


@pytest.mark.parametrize("accel", ACCELERATION, ids=["accelerated", "plain"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_answers_do_not_depend_on_the_batch(tiny_model_dir, dtype, accel):
    """In 16-bit dtypes the engine's numbers differ from transformers' own by rounding, so the
    check is the invariance users rely on: each request mixed and staggered == the same request alone."""
    lm16 = load_model(str(tiny_model_dir), dtype=dtype)
    prompts16 = [make_prompt(f"h{i}", p, lm16, seed=i) for i, p in enumerate([1, 4, 9, 20])]
    rng = random.Random(12)
    specs = [
        (prompts16[k % 4], random_ids(rng, 1 + (k * 5) % 17), SamplingParams(max_new_tokens=6 + k % 5))
        for k in range(10)
    ]

    def run(batch: list) -> list[list[int]]:
        return staggered_outputs(make_engine(lm16, accel=accel), batch, join_every=3)

    mixed = run(specs)
    assert mixed == [run([spec])[0] for spec in specs]


def staggered_outputs(
    engine: Engine, specs: list[tuple[SoftPrompt, list[int], SamplingParams]], join_every: int
) -> list[list[int]]:
    """Submit (prompt, input ids, params) requests, stepping the engine after every `join_every`
    (later rows join a running batch); run to idle; the generated ids of each."""
    tracked = [make_request(p, ids, params) for p, ids, params in specs]
    for i, t in enumerate(tracked):
        engine.scheduler.add(t.request)
        if i % join_every == join_every - 1:
            engine.step()
    while not engine.scheduler.idle:
        engine.step()
    return [t.request.output_ids for t in tracked]


def test_real_model_bfloat16_answers_do_not_depend_on_the_batch(default_model_dir):
    """The real model in bfloat16, where one rounding apart flips greedy tokens within a few steps:
    each of 12 requests over 4 tasks, staggered into one batch, == the same request alone. Holds
    because every per-row computation is the same whatever shares the batch (the panel kernel's
    linears bit for bit, per-row attention and norms)."""
    lm16 = load_model(str(default_model_dir), dtype="bfloat16")
    table = lm16.model.get_input_embeddings().weight.detach()
    g = torch.Generator().manual_seed(3)
    prompts16 = [
        SoftPrompt(
            name=f"b{i}",
            kind=PromptKind.PROMPT_TUNING,
            embeddings=table[
                torch.randint(100, 40_000, (p,), generator=g)
            ].clone(),  # vocabulary rows: a realistic scale
            content_hash=f"b{i}",
            source=Path(f"b{i}"),
        )
        for i, p in enumerate([20, 8, 20, 1])
    ]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    specs = [
        (prompts16[k % 4], torch.randint(100, 40_000, (4 + (k * 7) % 20,), generator=g).tolist(), params)
        for k in range(12)
    ]

    def run(batch: list) -> list[list[int]]:
        return staggered_outputs(make_engine(lm16), batch, join_every=4)

    mixed = run(specs)
    assert all(len(out) == 12 for out in mixed)
    assert mixed == [run([spec])[0] for spec in specs]


def test_engine_submit_after_stop_raises(lm):
    engine = start_engine(lm)
    engine.stop()
    assert not engine.alive
    with pytest.raises(RuntimeError):
        engine.submit(make_request(make_prompt("x", 1, lm, 0), [1], SamplingParams()).request)


def test_rows_from_torch_generator_do_not_leak_state(lm, prompts):
    """Sampling never touches torch's global RNG: a user's torch.manual_seed stays in their hands."""
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    engine = start_engine(lm)
    try:
        t = make_request(prompts[0], [5, 6, 7], SamplingParams(max_new_tokens=5, do_sample=True, seed=1))
        engine.submit(t.request)
        assert t.result.generated_tokens >= 1
    finally:
        engine.stop()
    assert torch.equal(torch.rand(1), before)


def test_deadline_ends_a_running_row_and_a_waiting_one(lm, prompts):
    """A passed deadline ends the request with TIMEOUT and its text so far; the others go on.

    The deadlines are set from the running request's own tokens, so no wall-clock budget decides
    the outcome: the running row's deadline passes at its 3rd token, the queued one's at the 2nd."""
    rng = random.Random(9)
    engine = start_engine(lm, max_batch_size=1)
    try:
        running = make_request(
            prompts[0], random_ids(rng, 4), SamplingParams(max_new_tokens=500), stream=True
        )
        waiting = make_request(prompts[1], random_ids(rng, 4), SamplingParams(max_new_tokens=5))
        after = make_request(prompts[2], random_ids(rng, 4), SamplingParams(max_new_tokens=3))

        def expire(event, _orig=running.sink):
            _orig(event)
            produced = len(running.request.output_ids)
            if produced == 2:
                waiting.request.deadline = (
                    time.monotonic()
                )  # still queued behind `running` (one row at a time)
            if produced == 3:
                running.request.deadline = time.monotonic()

        running.request.sink = expire
        for t in (running, waiting, after):
            engine.submit(t.request)
        assert running.result.finish_reason is FinishReason.TIMEOUT
        assert 3 <= running.result.generated_tokens <= 4  # dropped before the next step
        assert running.result.generated_text == lm.tokenizer.decode(
            running.request.output_ids, skip_special_tokens=True
        )
        assert waiting.result.finish_reason is FinishReason.TIMEOUT and waiting.result.generated_tokens == 0
        assert after.request.output_ids == reference_greedy(
            lm, prompts[2].embeddings, after.request.input_ids, 3
        )
        assert engine.scheduler.held_tokens == 0
    finally:
        engine.stop()


def test_drain_refuses_new_requests_while_accepted_ones_still_run(lm, prompts):
    """The refusal happens at the scheduler while the engine is alive and busy, not because it stopped."""
    rng = random.Random(10)
    engine = start_engine(lm, max_batch_size=2)
    started, gate = threading.Event(), threading.Event()
    accepted = [
        make_request(prompts[k], random_ids(rng, 3), SamplingParams(max_new_tokens=6)) for k in range(4)
    ]

    def hold(event, _orig=accepted[0].sink):  # the engine thread waits here until the refusal is checked
        _orig(event)
        if not started.is_set():
            started.set()
            gate.wait(60)

    accepted[0].request.sink = hold
    for t in accepted:
        engine.submit(t.request)
    assert started.wait(60)
    drained: list[bool] = []
    drainer = threading.Thread(target=lambda: drained.append(engine.drain(grace=60)))
    drainer.start()
    try:
        assert wait_until(lambda: engine.scheduler.closed, timeout=30)
        assert engine.alive and not all(t.done.is_set() for t in accepted)
        late = make_request(prompts[0], [1], SamplingParams())
        with pytest.raises(ShuttingDown):
            engine.submit(late.request)
    finally:
        gate.set()
        drainer.join(120)
    assert drained == [True]
    for t in accepted:
        assert t.result.finish_reason is FinishReason.LENGTH and t.result.generated_tokens == 6
    assert late.events == []


def test_drain_past_grace_fails_the_rest_clearly(lm, prompts):
    engine = start_engine(lm)
    long = make_request(prompts[0], [5, 6], SamplingParams(max_new_tokens=100_000))
    engine.submit(long.request)
    assert engine.drain(grace=0.2) is False
    assert "shutting down" in long.error.message


def test_preemption_in_a_tiny_pool_keeps_every_answer_exact(lm, prompts):
    """A pool far too small for the load: rows are preempted mid-generation and recomputed later,
    and every request still gets exactly its solo reference tokens."""
    rng = random.Random(7)
    specs = [(prompts[k % 4], random_ids(rng, 2 + k % 5), 30 + 3 * (k % 7)) for k in range(8)]
    block_bytes = Engine(lm, SchedulerConfig(1, 1, 1)).runner.block_bytes
    # 13 usable blocks of 16 tokens: the four prefixes take 5, each row grows to 3 blocks.
    engine = Engine(lm, SchedulerConfig(16, 100_000, 1000), 1 << 30, kv_cache_bytes=14 * block_bytes)
    engine.start()
    try:
        tracked = submit_and_check_solo(engine, lm, specs)
        assert engine.runner.pool.stats.preemptions > 0
        assert any(t.request.preemptions > 0 for t in tracked)
        assert engine.scheduler.held_tokens == 0
    finally:
        engine.stop()


def test_memory_per_row_is_its_own_tokens_only(lm, prompts):
    """Rows of one task hold blocks for their own tokens; the task's prefix is stored once."""
    engine = Engine(lm, SchedulerConfig(16, 100_000, 1000), 1 << 30)
    prompt = prompts[3]  # 20 virtual tokens
    tracked = [make_request(prompt, [5] * 3, SamplingParams(max_new_tokens=8)) for _ in range(6)]
    for t in tracked:
        engine.scheduler.add(t.request)
    engine.step()  # admit, prefill, one decode step
    stats = engine.pool_stats()
    bs = stats["block_size"]
    assert stats["prefix_blocks"] == -(-20 // bs)  # once, not once per row
    assert stats["row_tokens_used"] == 6 * (3 + 1)  # input + the token fed by the first decode step
    assert stats["row_tokens_held"] == 6 * bs  # one block each: no prefix, no worst-case reservation
    assert stats["blocks_used"] == stats["prefix_blocks"] + 6
    while not engine.scheduler.idle:
        engine.step()
    assert [t.request.output_ids for t in tracked] == [
        reference_greedy(lm, prompt.embeddings, [5] * 3, 8)
    ] * 6


def test_requests_sharing_a_token_prefix_reuse_its_blocks_and_stay_exact(lm, prompts):
    """Automatic prefix caching: a later request of the same task that starts with the same 40
    tokens prefills only what follows them; another task with the same tokens reuses nothing."""
    rng = random.Random(11)
    shared = random_ids(rng, 40)
    engine = Engine(lm, SchedulerConfig(16, 100_000, 1000), 1 << 30)
    engine.start()
    try:

        def run(prompt, ids):
            t = make_request(prompt, ids, SamplingParams(max_new_tokens=6))
            engine.submit(t.request)
            assert t.result.generated_tokens > 0
            assert t.request.output_ids == reference_greedy(lm, prompt.embeddings, ids, 6)
            return t

        run(prompts[1], shared + random_ids(rng, 5))
        stats = engine.block_cache.stats
        assert stats.hit_tokens == 0
        run(prompts[1], shared + random_ids(rng, 3))  # 2 full blocks of 16 reused
        assert stats.hit_tokens == 32 and stats.hit_requests == 1
        run(prompts[2], shared + random_ids(rng, 3))  # another task: its keys differ, nothing reused
        assert stats.hit_tokens == 32
        run(prompts[1], shared[:16] + random_ids(rng, 20))  # only the first block is shared
        assert stats.hit_tokens == 48
        run(prompts[1], shared[:16])  # exactly one block: its last token must still be computed
        assert stats.hit_tokens == 48
    finally:
        engine.stop()


@torch.inference_mode()
def step_logits(
    lm: LoadedModel, prompt: torch.Tensor, input_ids: list[int], output_ids: list[int]
) -> torch.Tensor:
    """[n, V]: the solo reference's logits before each of the n generated tokens (one forward pass)."""
    embed = lm.model.get_input_embeddings()
    x = torch.cat([prompt, embed(torch.tensor(input_ids + output_ids[:-1]))])[None]  # [1, P+L+n-1, H]
    return lm.model(inputs_embeds=x).logits[0, prompt.shape[0] + len(input_ids) - 1 :].double()


def outside_filters(
    logits: torch.Tensor, tokens: list[int], temperature: float, top_k: int, top_p: float, tol: float = 1e-4
) -> list[int]:
    """Steps whose token lies outside the top-k and/or the nucleus of that step's tempered distribution."""
    bad = []
    for step, (row, token) in enumerate(zip(logits, tokens)):
        warped = row / temperature  # [V]
        if top_k:
            kth = warped.topk(top_k).values[-1]
            if warped[token] < kth - tol:
                bad.append(step)
                continue
            warped = warped.masked_fill(warped < kth, float("-inf"))
        probs = warped.softmax(-1)
        mass_before = probs[probs > probs[token] + 1e-12].sum()  # mass of the strictly more likely tokens
        if top_p < 1.0 and mass_before >= top_p + tol:
            bad.append(step)
    return bad


def test_sampled_tokens_stay_inside_each_rows_top_k_and_nucleus_in_a_mixed_batch(lm, prompts):
    """Hot temperatures make the filters matter: an unfiltered row at the same temperature leaves its
    top 3 (so the check can fail), while each filtered row's every token lies in its own set."""
    rng = random.Random(11)
    rows = [  # (prompt, temperature, top_k, top_p)
        (prompts[0], 5.0, 3, 1.0),
        (prompts[1], 1.5, 0, 0.3),
        (prompts[2], 3.0, 20, 0.6),
        (prompts[3], 5.0, 0, 1.0),  # the unfiltered control
        (prompts[1], 4.0, 2, 0.9),
    ]
    engine = start_engine(lm)
    try:
        tracked = []
        for k, (prompt, temperature, top_k, top_p) in enumerate(rows):
            params = SamplingParams(
                max_new_tokens=24,
                do_sample=True,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=500 + k,
            )
            tracked.append(make_request(prompt, random_ids(rng, 3 + k), params))
        tracked.append(
            make_request(prompts[2], random_ids(rng, 5), SamplingParams(max_new_tokens=24))
        )  # greedy
        for t in tracked:
            engine.submit(t.request)
        for t in tracked:
            assert t.result.generated_tokens > 0
        assert engine.stats.mixed_task_passes > 0
    finally:
        engine.stop()
    for t, (prompt, temperature, top_k, top_p) in zip(tracked, rows):
        out = t.request.output_ids
        logits = step_logits(lm, prompt.embeddings, t.request.input_ids, out)
        if top_k or top_p < 1.0:
            assert outside_filters(logits, out, temperature, top_k, top_p) == [], (top_k, top_p)
            assert any(tok != int(row.argmax()) for row, tok in zip(logits, out)), "the row never sampled"
        else:
            assert outside_filters(logits, out, temperature, 3, 1.0), "the control never left its top 3"
    greedy = tracked[-1]
    assert greedy.request.output_ids == reference_greedy(
        lm, prompts[2].embeddings, greedy.request.input_ids, 24
    )


@pytest.mark.parametrize("policy", [Policy.FAIR, Policy.FIFO])
def test_a_starved_task_gets_a_row_at_the_next_step_and_every_answer_stays_exact(lm, prompts, policy):
    """A flood holds every row for a long wave; a request of another task arrives. Fair scheduling
    admits it at the next step by preempting the flood's youngest row (FIFO makes it wait out the
    wave), and every answer, the preempted row's included, is its solo reference."""
    rng = random.Random(11)
    engine = Engine(lm, SchedulerConfig(4, 100_000, 100, policy=policy), 1 << 30)
    flood = [
        make_request(prompts[0], random_ids(rng, 4), SamplingParams(max_new_tokens=24)) for _ in range(6)
    ]
    for t in flood:
        engine.scheduler.add(t.request)
    engine.step()
    quiet = make_request(prompts[1], random_ids(rng, 5), SamplingParams(max_new_tokens=5))
    engine.scheduler.add(quiet.request)
    steps = 0
    while quiet.request.first_token_at is None:
        engine.step()
        steps += 1
    assert steps == 1 if policy is Policy.FAIR else steps > 20
    engine.run_until_idle()
    for t in [*flood, quiet]:
        ids, n = t.request.input_ids, t.request.params.max_new_tokens
        assert t.result.finish_reason is FinishReason.LENGTH
        assert t.request.output_ids == reference_greedy(lm, t.request.prompt.embeddings, ids, n)
    assert (flood[3].request.preemptions == 1) is (policy is Policy.FAIR)


@torch.inference_mode()
def reference_penalised(
    lm: LoadedModel, prompt: torch.Tensor, ids: list[int], n: int, params: SamplingParams
) -> list[int]:
    """The solo reference with OpenAI's rules applied by hand to the base model's logits: logit_bias
    added, then logit[j] -= count[j] * frequency + (count[j] > 0) * presence over the generated tokens."""
    embed = lm.model.get_input_embeddings()
    x = torch.cat([prompt, embed(torch.tensor(ids))])[None]
    out: list[int] = []
    for _ in range(n):
        logits = lm.model(inputs_embeds=x).logits[0, -1].double().clone()
        for token, bias in params.logit_bias:
            logits[token] += bias
        for token in set(out):
            logits[token] -= out.count(token) * params.frequency_penalty + params.presence_penalty
        out.append(int(logits.argmax()))
        x = torch.cat([x, embed(torch.tensor([[out[-1]]]))], dim=1)
    return out


def test_penalties_and_logit_bias_match_openais_formula_alone_and_in_a_mixed_batch(lm, prompts):
    rng = random.Random(5)
    # The tiny model never repeats itself greedily, so negative penalties (which reward repeats) are what
    # changes its answers; every variant must change some answer (checked below), or the test could not
    # tell a penalty that is ignored.
    variants = [
        SamplingParams(max_new_tokens=10, frequency_penalty=-1.5),
        SamplingParams(max_new_tokens=10, presence_penalty=-6.0),  # past the API's +-2 (the engine takes any)
        SamplingParams(
            max_new_tokens=10,
            frequency_penalty=1.0,
            presence_penalty=-2.0,
            logit_bias=((17, 30.0), (5, -100.0)),
        ),
        SamplingParams(max_new_tokens=10),
    ]
    specs = [(prompts[k % 4], random_ids(rng, 3 + k), variants[k % 4]) for k in range(8)]
    engine = start_engine(lm)
    try:
        tracked = [make_request(p, ids, params) for p, ids, params in specs]
        for t in tracked:  # all at once: one mixed batch, penalised and plain rows together
            engine.submit(t.request)
        for t, (p, ids, params) in zip(tracked, specs):
            assert t.result.generated_tokens == 10
            assert t.request.output_ids == reference_penalised(lm, p.embeddings, ids, 10, params), params
        changed = {
            params
            for t, (p, ids, params) in zip(tracked, specs)
            if t.request.output_ids != reference_greedy(lm, p.embeddings, ids, 10)
        }
        assert changed == set(variants[:3])  # each penalised variant changed an answer; the plain one none
    finally:
        engine.stop()


def test_logprobs_come_from_the_distribution_each_row_was_chosen_from_alone_or_mixed(lm, prompts):
    """Each token's log-probability and its alternatives: the model's log_softmax for a greedy row, after
    the bias for a biased one, after temperature for a sampled one; the same figures alone and in a batch."""
    rng = random.Random(9)
    specs = [
        (prompts[0], random_ids(rng, 4), SamplingParams(max_new_tokens=5, logprobs=True, top_logprobs=4)),
        (
            prompts[1],
            random_ids(rng, 6),
            SamplingParams(max_new_tokens=5, logprobs=True, top_logprobs=2, logit_bias=((9, 2.5),)),
        ),
        (
            prompts[2],
            random_ids(rng, 3),
            SamplingParams(max_new_tokens=5, logprobs=True, do_sample=True, temperature=0.7, seed=3),
        ),
        (prompts[3], random_ids(rng, 5), SamplingParams(max_new_tokens=5)),
    ]
    engine = start_engine(lm)
    try:
        alone = []
        for p, ids, params in specs:
            t = make_request(p, ids, params)
            engine.submit(t.request)
            alone.append(t.result.logprobs)
        together = [make_request(p, ids, params) for p, ids, params in specs]
        for t in together:
            engine.submit(t.request)
        assert [t.result.logprobs for t in together] == alone
        embed = lm.model.get_input_embeddings()
        for t, (p, ids, params) in zip(together, specs):
            out = t.request.output_ids
            assert len(t.result.logprobs) == (len(out) if params.logprobs else 0)
            for i, entry in enumerate(t.result.logprobs):
                x = torch.cat([p.embeddings, embed(torch.tensor(ids + out[:i]))])[None]
                logits = lm.model(inputs_embeds=x).logits[0, -1].double()
                for token, bias in params.logit_bias:
                    logits[token] += bias
                logp = torch.log_softmax(logits / (params.temperature if params.sampling else 1.0), dim=-1)
                assert entry.token_id == out[i] and entry.logprob == pytest.approx(
                    logp[out[i]].item(), abs=1e-5
                )
                top = logp.topk(params.top_logprobs)
                assert [a for a, _ in entry.top] == top.indices.tolist()
                assert [b for _, b in entry.top] == pytest.approx(top.values.tolist(), abs=1e-5)
    finally:
        engine.stop()
