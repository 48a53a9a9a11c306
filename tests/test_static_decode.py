"""The fixed-shape decode step (server/engine/static_decode.py): buckets, padding that touches nothing
real, answers equal to the eager step's and the solo reference, and a step that compiles whole, once
per bucket (the conditions a CUDA graph capture needs; the capture itself runs on a GPU only)."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from server.engine.engine import Engine
from server.engine.pool import NULL_SLOT
from server.engine.request import SamplingParams
from server.engine.runner import Acceleration
from server.engine.scheduler import SchedulerConfig
from server.engine.static_decode import StaticInputs, bucket, row_buckets, width_buckets
from server.models import LoadedModel, load_model
from tests.support import make_engine, make_prompt, make_request, reference_greedy, submit_and_check_solo
from tests.test_engine import staggered_outputs

PLAIN = Acceleration(prepack_weights=False, native_kernels=False)  # the torch ops a GPU runs
STATIC = {
    "plain": Acceleration(prepack_weights=False, native_kernels=False, static_decode=True),
    "accelerated": Acceleration(static_decode=True),
}


@pytest.fixture(scope="module")
def prompts(lm: LoadedModel):
    return [make_prompt(f"task{i}", p, lm, seed=i) for i, p in enumerate([1, 4, 9, 20])]


def specs_for(prompts, n: int, seed: int) -> list:
    rng = random.Random(seed)
    return [
        (
            prompts[k % len(prompts)],
            [rng.randrange(40_000) for _ in range(1 + (k * 5) % 23)],
            SamplingParams(max_new_tokens=4 + k % 9),
        )
        for k in range(n)
    ]


def test_buckets():
    assert row_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert row_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert row_buckets(3) == [1, 2, 3] and row_buckets(1) == [1]
    assert width_buckets(128 + 1024 + 512) == [64, 128, 256, 512, 1024, 2048]
    assert width_buckets(10) == [64] and width_buckets(None)[-1] == 8192
    sizes = row_buckets(32)
    assert [bucket(sizes, n) for n in (1, 3, 8, 9, 25, 32)] == [1, 4, 8, 16, 32, 32]
    assert bucket(sizes, 33) is None


@pytest.mark.parametrize("accel", list(STATIC.values()), ids=list(STATIC))
def test_static_decode_equals_the_solo_reference_in_staggered_mixed_batches(lm, prompts, accel):
    """Rows join and leave (bucket sizes change under them); each request == its solo reference."""
    specs = specs_for(prompts, 11, seed=3)
    engine = make_engine(lm, accel=accel)
    outputs = staggered_outputs(engine, specs, join_every=3)
    for (prompt, ids, params), out in zip(specs, outputs):
        assert out == reference_greedy(lm, prompt.embeddings, ids, params.max_new_tokens)
    stats = engine.static_decode_stats()
    assert stats is not None and stats["eager_steps"] > 0 and stats["graphs_recorded"] == 0  # no CUDA here


def test_static_and_eager_steps_agree_in_float32(tiny_model_dir, prompts):
    """float32 on the torch ops: padded rows and columns change nothing a real row computes."""
    lm32 = load_model(str(tiny_model_dir), dtype="float32")
    prompts32 = [make_prompt(p.name, p.num_virtual_tokens, lm32, seed=i) for i, p in enumerate(prompts)]
    specs = specs_for(prompts32, 10, seed=5)
    assert staggered_outputs(make_engine(lm32, accel=STATIC["plain"]), specs, 3) == staggered_outputs(
        make_engine(lm32, accel=PLAIN), specs, 3
    )


@torch.inference_mode()
def test_padding_rows_and_columns_write_nothing_but_the_null_slot(lm, prompts):
    """3 rows in a 4-row bucket: the step writes exactly the rows' new slots (and NULL_SLOT), and
    its logits equal the eager step's from the same state (float64: up to summation order)."""
    specs = specs_for(prompts, 3, seed=9)
    engine = make_engine(lm, accel=STATIC["plain"])
    tracked = [make_request(p, ids, SamplingParams(max_new_tokens=5)) for p, ids, _ in specs]
    for t in tracked:
        engine.scheduler.add(t.request)
    engine.step()  # prefill + first decode
    runner, rows = engine.runner, list(engine.scheduler.running)
    assert len(rows) == 3
    engine.scheduler.grow()
    new_slots = {r.kv.new_slots(1)[0] for r in rows if r.kv is not None}
    k0, v0 = runner.k.clone(), runner.v.clone()
    static_logits = runner.decode(rows).clone()
    changed = ((runner.k != k0) | (runner.v != v0)).any(dim=(0, 1, 3)).nonzero().flatten().tolist()  # slots
    assert set(changed) - {NULL_SLOT} == new_slots
    # the same step, eager, from the same state (the runner writes slots; only the scheduler counts them)
    assert {r.kv.new_slots(1)[0] for r in rows if r.kv is not None} == new_slots
    runner.k.copy_(k0)
    runner.v.copy_(v0)
    static, runner.static = runner.static, None
    eager_logits = runner.decode(rows)
    runner.static = static
    assert (static_logits - eager_logits).abs().max().item() < 1e-10  # float64: summation order only


def test_rows_past_the_largest_width_bucket_run_the_eager_step(lm, prompts):
    """Key tables wider than the largest bucket (here 64 columns) fall back to the eager step."""
    engine = Engine(lm, SchedulerConfig(4, 100_000, 100), 1 << 30, max_context=64, accel=STATIC["plain"])
    prompt = prompts[3]  # 20 virtual tokens
    ids = [5, 17, 2000, 31, 9]
    out = staggered_outputs(engine, [(prompt, ids, SamplingParams(max_new_tokens=50))], 1)[0]
    assert out == reference_greedy(lm, prompt.embeddings, ids, 50)
    static = engine.runner.static
    assert static is not None and static.widths == [64]
    assert static.eager_steps == 64 - 20 - len(ids)  # steps whose table fit: up to 64 keys


def test_preemption_with_the_static_step_keeps_every_answer_exact(lm, prompts):
    rng = random.Random(7)
    specs = [
        (prompts[k % 4], [rng.randrange(40_000) for _ in range(2 + k % 5)], 30 + 3 * (k % 7))
        for k in range(8)
    ]
    block_bytes = Engine(lm, SchedulerConfig(1, 1, 1)).runner.block_bytes
    engine = Engine(
        lm,
        SchedulerConfig(16, 100_000, 1000),
        1 << 30,
        kv_cache_bytes=14 * block_bytes,
        accel=STATIC["accelerated"],
    )
    engine.start()
    try:
        submit_and_check_solo(engine, lm, specs)
        assert engine.runner.pool.stats.preemptions > 0
    finally:
        engine.stop()


@pytest.mark.parametrize("accel", list(STATIC.values()), ids=list(STATIC))
def test_seeded_sampling_and_token_block_hits_with_the_static_step(lm, prompts, accel):
    """Seeded samples are the same alone and staggered into a mixed batch, with requests that share
    a 32-token opening taking its blocks from the token block cache; greedy rows == solo reference."""
    rng = random.Random(21)
    shared = [rng.randrange(40_000) for _ in range(32)]
    specs = []
    for k in range(8):
        ids = (
            shared + [rng.randrange(40_000) for _ in range(1 + k)]
            if k % 2
            else [rng.randrange(40_000) for _ in range(3 + k)]
        )
        greedy = SamplingParams(max_new_tokens=8)
        sampled = SamplingParams(
            max_new_tokens=8, do_sample=True, temperature=0.8, top_k=[0, 20][k % 2], seed=500 + k
        )
        params = greedy if k % 3 == 0 else sampled
        specs.append((prompts[k % 2], ids, params))  # two tasks: the shared opening hits within each
    engine = make_engine(lm, accel=accel, prefix_cache_bytes=1 << 30)
    mixed = staggered_outputs(engine, specs, join_every=3)
    assert engine.block_cache is not None and engine.block_cache.stats.hit_tokens > 0
    alone = [staggered_outputs(make_engine(lm, accel=accel), [spec], 1)[0] for spec in specs]
    assert mixed == alone
    for (prompt, ids, params), out in zip(specs, mixed):
        if not params.sampling:
            assert out == reference_greedy(lm, prompt.embeddings, ids, 8)
    static = engine.runner.static
    assert static is not None and static.eager_steps > 0


COMPILED = {**STATIC, "kernels-loop": Acceleration(static_decode=True, native_layers=False)}


@pytest.mark.parametrize("accel", list(COMPILED), ids=list(COMPILED))
def test_the_static_step_compiles_whole_once_per_bucket(tiny_model_dir, prompts, accel):
    """torch.compile(fullgraph=True, dynamic=False) of the step: no graph break (no host sync, no
    data-dependent shape or Python branch on tensor values) and, per bucket, one compile whatever
    the rows hold, step after step: what recording a CUDA graph once per bucket relies on. With the
    native kernels too: their ops carry schemas, so the trace goes through them (softmux:: nodes)."""
    lm32 = load_model(str(tiny_model_dir), dtype="float32")
    prompts32 = [make_prompt(p.name, p.num_virtual_tokens, lm32, seed=i) for i, p in enumerate(prompts)]
    specs = specs_for(prompts32, 9, seed=11)
    expected = staggered_outputs(make_engine(lm32, accel=PLAIN, max_batch_size=4), specs, 3)

    engine = make_engine(lm32, accel=COMPILED[accel], max_batch_size=4)
    static = engine.runner.static
    assert static is not None
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(engine.runner._static_step, backend=backend, fullgraph=True, dynamic=False)
    buckets: list[tuple[int, int]] = []

    def step(inputs: StaticInputs) -> torch.Tensor:
        buckets.append((inputs.rows, inputs.width))
        return compiled(inputs)

    static.step = step
    assert staggered_outputs(engine, specs, 3) == expected
    assert len(buckets) > len(set(buckets)) >= 2  # several buckets, each used many times
    assert len(graphs) == len(set(buckets))
    kernel_ops = {str(n.target) for g in graphs for n in g.graph.nodes if "softmux" in str(n.target)}
    loop = {f"softmux.{op}.default" for op in ("rms_norm", "rotary", "decode_attention", "silu_mul")}
    expected_ops = {  # the stack is one node; greedy is the sampler's, outside the step
        "plain": set(),
        "accelerated": {f"softmux.{op}.default" for op in ("decoder_stack", "rms_norm", "panel_linear")},
        "kernels-loop": loop | {"softmux.panel_linear.default"},
    }[accel]
    assert kernel_ops == expected_ops
    torch._dynamo.reset()


class TracingRecorder:
    """Stands in for CUDA graphs on a CPU, freezing what a capture freezes. Recording traces the step once
    (make_fx, real tensors) into a graph of tensor ops; a replay runs that graph, not the Python step, and
    writes into the output tensor kept at record time, as a graph replay overwrites its captured output.
    The graph holds the tensors the step read (input buffers, weights, the key/value pool) by reference,
    so a replay sees what was written into them since; but any value the step read on the host at record
    time (`.item()`, `.tolist()`, a Python branch or a tensor built from host data) is baked in as it was
    then, the padding of the recording runs. A step that reads anything but the persistent buffers'
    storage, or inputs that do not reach those buffers, then gives wrong answers here as under a graph.
    Not covered: the capture itself (streams, the memory pool, kernels that cannot be captured), which
    only a GPU runs (`test_recorded_graphs_replay_...`, `benchmarks/gpu_run.sh`); a host sync inside the
    step is refused by the compile test's fullgraph=True."""

    def __init__(self) -> None:
        self.recorded = 0

    def record(self, step: Callable[[], torch.Tensor]) -> tuple[Callable[[], object], torch.Tensor]:
        graph = make_fx(step, tracing_mode="real")()
        out = graph()
        self.recorded += 1
        return (lambda: out.copy_(graph())), out


def test_the_stand_in_recorder_freezes_host_reads_like_a_capture():
    """The recorder below can fail: a step reading its input through the buffer sees each new value;
    one that read it on the host replays the value it had at record time."""
    buffer = torch.tensor([1.0, 2.0])
    replay_device, out_device = TracingRecorder().record(lambda: buffer * 2)
    replay_host, out_host = TracingRecorder().record(lambda: torch.tensor(buffer.tolist()) * 2)
    buffer.copy_(torch.tensor([5.0, 7.0]))  # new inputs, written in place as StaticDecode.decode does
    replay_device()
    replay_host()
    assert out_device.tolist() == [10.0, 14.0] and out_host.tolist() == [2.0, 4.0]


@pytest.mark.parametrize("accel", list(STATIC), ids=list(STATIC))
def test_recorded_steps_replay_from_the_fixed_buffers(lm, prompts, accel):
    """Every bucket recorded at start (largest first), every step then a replay of the traced step;
    answers == solo reference. With the native kernels too: make_fx records their ops as graph nodes."""
    engine = make_engine(lm, accel=STATIC[accel], max_batch_size=4, max_context=64)
    static = engine.runner.static
    assert static is not None and static.rows == [1, 2, 4] and static.widths == [64]
    recorder = TracingRecorder()
    static.recorder = recorder
    with torch.inference_mode():  # as the runner records
        static.record_all()
    assert recorder.recorded == 3 and static.recorded == 3
    specs = specs_for(prompts, 9, seed=17)
    outputs = staggered_outputs(engine, specs, join_every=2)
    for (prompt, ids, params), out in zip(specs, outputs):
        assert out == reference_greedy(lm, prompt.embeddings, ids, params.max_new_tokens)
    assert static.replays > 0 and static.eager_steps == 0 and recorder.recorded == 3  # nothing recorded late


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_recorded_graphs_replay_the_eager_static_step_bit_for_bit(tiny_model_dir, prompts):
    """On a GPU: every step replays a graph recorded at start, with the eager static step's answers."""
    lm_gpu = load_model(str(tiny_model_dir), device="cuda", dtype="float32")
    prompts_gpu = [make_prompt(p.name, p.num_virtual_tokens, lm_gpu, seed=i) for i, p in enumerate(prompts)]
    for p in prompts_gpu:
        object.__setattr__(p, "embeddings", p.embeddings.cuda())
    specs = specs_for(prompts_gpu, 10, seed=13)
    graphs = make_engine(lm_gpu, max_batch_size=8)
    static = graphs.runner.static
    assert static is not None and static.recorded == len(static.rows) * len(static.widths)
    eager = make_engine(lm_gpu, max_batch_size=8, accel=Acceleration(cuda_graphs=False, static_decode=True))
    assert staggered_outputs(graphs, specs, 3) == staggered_outputs(eager, specs, 3)
    assert static.replays > 0 and static.eager_steps == 0
