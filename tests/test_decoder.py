"""server/engine/decoder.py over the model families users bring: tiny random llama, qwen2, mistral,
gemma and gpt2 configs, each served in mixed staggered batches against the solo reference (the
transformers model itself on cat(soft_prompt, embed(ids))); unsupported models refused at start."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from server.engine.decoder import Decoder, PoolAttention, UnsupportedModel
from server.engine.engine import Engine
from server.engine.request import SamplingParams
from server.engine.runner import Acceleration
from server.engine.scheduler import SchedulerConfig
from server.models import LoadedModel, load_model
from tests.support import make_prompt, make_request, reference_greedy

LLAMA_LIKE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=512,
)
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(LLAMA_LIKE, num_key_value_heads=2, attention_bias=True),
    "qwen2": dict(LLAMA_LIKE, num_key_value_heads=2, use_sliding_window=False),
    "mistral": dict(LLAMA_LIKE, num_key_value_heads=1, sliding_window=None, head_dim=16),
    "gemma": dict(LLAMA_LIKE, num_key_value_heads=1, head_dim=32, hidden_activation="gelu_pytorch_tanh"),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=512),
    # Llama 3.1's features at a tiny size: GQA 4:1, head_dim 128 (wider than hidden / heads), an untied
    # head, and its rope scaling (llama3: low and high frequency bands rescaled differently).
    "llama3.1": dict(
        LLAMA_LIKE,
        family="llama",
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
    ),
    # Qwen2.5's: q/k/v bias, GQA 7:1 (14 heads over 2, as in 0.5B), a large rope theta.
    "qwen2.5": dict(
        LLAMA_LIKE,
        family="qwen2",
        hidden_size=112,
        num_attention_heads=14,
        num_key_value_heads=2,
        rope_theta=1e6,
        use_sliding_window=False,
    ),
}


def build(folder: Path, tokenizer_dir: Path, model_type: str, **params: Any) -> LoadedModel:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    params = dict(params)
    model_type = params.pop("family", model_type)  # a variant of a family names its family
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        initializer_range=0.3,
        tie_word_embeddings=params.pop("tie_word_embeddings", True),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **params,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_model(str(folder), dtype="float64")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_mixed_staggered_batch_matches_solo_reference(family, tmp_path, default_model_dir):
    lm = build(tmp_path / family, default_model_dir, family, **FAMILIES[family])
    prompts = [make_prompt(f"{family}{i}", p, lm, seed=i) for i, p in enumerate([3, 7, 20])]
    rng = random.Random(1)
    specs = [
        (prompts[k % 3], [rng.randrange(40_000) for _ in range(1 + (k * 7) % 19)], 5 + k % 6)
        for k in range(9)
    ]
    engine = Engine(lm, SchedulerConfig(16, 100_000, 100), 1 << 30)
    engine.start()
    try:
        tracked = [make_request(p, ids, SamplingParams(max_new_tokens=n)) for p, ids, n in specs]
        for t in tracked[:5]:
            engine.submit(t.request)
        assert tracked[0].done.wait(60)  # the rest join a running batch
        for t in tracked[5:]:
            engine.submit(t.request)
        for t, (p, ids, n) in zip(tracked, specs):
            assert t.result.generated_tokens > 0
            assert t.request.output_ids == reference_greedy(lm, p.embeddings, ids, n), (
                f"{family}: {p.name} L={len(ids)}"
            )
        assert engine.stats.mixed_task_passes > 0
    finally:
        engine.stop()


def test_unsupported_family_is_refused_with_the_reason(tmp_path, default_model_dir):
    lm = build(
        tmp_path / "opt",
        default_model_dir,
        "opt",
        hidden_size=64,
        num_hidden_layers=1,
        ffn_dim=128,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=128,
    )
    with pytest.raises(UnsupportedModel, match="'opt' is not supported.*llama"):
        Engine(lm, SchedulerConfig(4, 1000, 10))


def test_dynamic_rope_scaling_is_refused_with_the_reason(tmp_path, default_model_dir):
    """Dynamic scaling makes a row's frequencies depend on the longest row of its batch."""
    lm = build(
        tmp_path / "dyn",
        default_model_dir,
        "llama",
        **dict(FAMILIES["llama"], rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    )
    with pytest.raises(UnsupportedModel, match="dynamic rope scaling"):
        Engine(lm, SchedulerConfig(4, 1000, 10))


def test_sliding_window_shorter_than_the_context_is_refused(tmp_path, default_model_dir):
    lm = build(
        tmp_path / "mistral", default_model_dir, "mistral", **dict(FAMILIES["mistral"], sliding_window=64)
    )
    with pytest.raises(UnsupportedModel, match="sliding-window attention \\(64 tokens\\)"):
        Engine(lm, SchedulerConfig(4, 1000, 10), max_context=1000)
    Engine(
        lm, SchedulerConfig(4, 1000, 10), max_context=64
    )  # every admitted sequence fits the window: served


def two_row_passes(decoder: Decoder, ops: Any, dtype: torch.dtype) -> list[torch.Tensor]:
    """A prefill pass (rows of 5 and 3 tokens, every token a query row of the native kernel) and a
    decode pass (one token each) over a fresh pool -> [prefill logits, decode logits, keys, values]."""
    k = torch.zeros(
        decoder.num_layers, decoder.num_kv_heads, 64, decoder.head_dim, dtype=dtype
    )  # slots 0-15 reserved
    v = torch.zeros_like(k)
    row_slots = [list(range(16, 26)), list(range(40, 50))]
    g = torch.Generator().manual_seed(0)
    prompt = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 3)]
    passes = [[(prompt[0], 0), (prompt[1], 0)], [([7], 5), ([11], 3)]]  # per row: (tokens, first position)
    out = []
    for rows in passes:
        tokens, positions, write, slots, lengths, last = [], [], [], [], [], []
        for b, (ids, first) in enumerate(rows):
            for j, token in enumerate(ids):
                p = first + j
                tokens.append(token)
                positions.append(p)
                write.append(row_slots[b][p])
                slots.append(row_slots[b][: p + 1])  # it sees its row's tokens up to itself
                lengths.append(p + 1)
            last.append(len(tokens) - 1)
        width = max(lengths)
        slots_t = torch.tensor([s + [0] * (width - len(s)) for s in slots])
        attend = PoolAttention(ops, k, v, torch.tensor(write), slots_t, torch.tensor(lengths))
        with torch.inference_mode():
            embeds = decoder.embed_tokens(torch.tensor(tokens)).to(dtype)
            out.append(decoder.forward(embeds, torch.tensor(positions), attend, torch.tensor(last)))
    return out + [k, v]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "llama3.1", "qwen2.5"])
def test_native_layer_stack_equals_the_python_loop_bit_for_bit(
    family, dtype, ops, tmp_path, default_model_dir
):
    """Decoder.stack (csrc/layers.cpp) runs the same kernels as the Python loop in the same order:
    the same logits and the same keys and values written, bit for bit (q/k/v bias: llama; GQA: all)."""
    build(tmp_path / family, default_model_dir, family, **FAMILIES[family])
    lm = load_model(str(tmp_path / family), dtype=str(dtype).removeprefix("torch."))
    stacked = Decoder(lm.model, pack=True, ops=ops)
    looped = Decoder(lm.model, pack=True, ops=ops, native_layers=False)
    assert stacked.stack is not None and looped.stack is None
    for got, want in zip(two_row_passes(stacked, ops, dtype), two_row_passes(looped, ops, dtype)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["gemma", "gpt2"])
def test_native_layer_stack_is_not_used_where_a_kernel_does_not_apply(
    family, ops, tmp_path, default_model_dir
):
    """gemma's MLP is not SiLU-gated, gpt2 has no rotary and LayerNorm:
    their layers stay in the Python loop."""
    build(tmp_path / family, default_model_dir, family, **FAMILIES[family])
    lm = load_model(str(tmp_path / family), dtype="float32")
    assert Decoder(lm.model, pack=True, ops=ops).stack is None


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct tensors a model's parameters hold (a tied table counted once)."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters() if p.numel()}
    return sum(seen.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "llama3.1"])
def test_one_copy_of_the_weights_gives_the_same_tokens_and_releases_the_models_own(
    family, dtype, ops, tmp_path, default_model_dir
):
    """With one_copy the panels are the only copy of every linear weight (and of a tied embedding
    table): the transformers modules' weights are released, prefill runs on the panels too, and a
    mixed staggered batch gives exactly the tokens of the two-copy layout."""
    build(tmp_path / family, default_model_dir, family, **FAMILIES[family])
    runs, kept = [], []
    for one_copy in (False, True):
        lm = load_model(str(tmp_path / family), dtype=dtype)
        before = weight_bytes(lm.model)
        prompts = [make_prompt(f"{family}{i}", p, lm, seed=i) for i, p in enumerate([3, 7, 20])]
        engine = Engine(lm, SchedulerConfig(16, 100_000, 100), 1 << 30, accel=Acceleration(one_copy=one_copy))
        engine.start()
        try:
            rng = random.Random(2)
            tracked = [
                make_request(
                    prompts[k % 3],
                    [rng.randrange(40_000) for _ in range(1 + (k * 11) % 150)],
                    SamplingParams(max_new_tokens=6),
                )
                for k in range(8)
            ]
            for t in tracked:
                engine.submit(t.request)
            runs.append([t.result and t.request.output_ids for t in tracked])
        finally:
            engine.stop()
        kept.append(weight_bytes(lm.model) / before)
        decoder = engine.runner.decoder
        if one_copy:
            assert all(
                lin.weight is None
                for layer in decoder.layers
                for lin in (layer.qkv, layer.o, layer.up, layer.down)
            )
            tied = FAMILIES[family].get("tie_word_embeddings", True)
            assert (
                decoder.embed_panels == tied and decoder.lm_head.weight is None
            )  # tied: the table lives in the head's panels
    assert runs[0] == runs[1]
    untied = not FAMILIES[family].get("tie_word_embeddings", True)
    assert kept[0] == 1.0 and kept[1] < (
        0.6 if untied else 0.1
    )  # left: norms, biases, positions (gpt2), an untied table


def dequantize_linears_in_place(model: torch.nn.Module) -> int:
    """Replace each decoder layer's linear weight by its symmetric per-output-channel int8
    dequantization (q * scale, computed here independently of the kernels): the model that a
    quantized engine must reproduce. The head and the embedding table are left as they are."""
    count = 0
    for name, module in model.named_modules():
        if (
            ".layers." not in name
            and ".h." not in name
            or not hasattr(module, "weight")
            or module.weight.dim() != 2
        ):
            continue
        if "norm" in name or "ln_" in name:
            continue
        with torch.no_grad():
            w = module.weight
            transposed = type(module).__name__ == "Conv1D"  # gpt2 stores [in, out]
            wt = (w.t() if transposed else w).float()
            scale = wt.abs().amax(1, keepdim=True) / 127
            scale[scale == 0] = 1
            deq = (wt / scale).round().clamp(-127, 127) * scale
            w.copy_(deq.t() if transposed else deq)
        count += 1
    return count


def int8_answers_match_the_dequantized_model(folder: Path, family: str, accel: Acceleration) -> Engine:
    """An engine with `accel` (int8) over a fresh load of `folder`: every answer of a mixed staggered batch
    equals, token for token, the greedy answer of the transformers model holding the dequantized weights
    (float64, solo, no cache). Returns the stopped engine."""
    lm = load_model(str(folder), dtype="float32")
    reference = load_model(str(folder), dtype="float32")
    layers = FAMILIES[family].get("num_hidden_layers", FAMILIES[family].get("n_layer"))
    assert dequantize_linears_in_place(reference.model) == layers * (4 if family == "gpt2" else 7)
    device = torch.device("cpu")
    reference = LoadedModel(reference.model.double(), reference.tokenizer, device, torch.float64, family)
    prompts = [make_prompt(f"{family}{i}", p, lm, seed=i) for i, p in enumerate([3, 7, 20])]
    engine = Engine(lm, SchedulerConfig(16, 100_000, 100), 1 << 30, accel=accel)
    engine.start()
    try:
        rng = random.Random(3)
        specs = [
            (prompts[k % 3], [rng.randrange(40_000) for _ in range(1 + (k * 11) % 60)], 4 + k % 5)
            for k in range(8)
        ]
        tracked = [make_request(p, ids, SamplingParams(max_new_tokens=n)) for p, ids, n in specs]
        for t in tracked:
            engine.submit(t.request)
        for t, (p, ids, n) in zip(tracked, specs):
            assert t.done.wait(60) and t.result.generated_tokens > 0
            want = reference_greedy(reference, p.embeddings.double(), ids, n)
            assert t.request.output_ids == want, f"{family}: {p.name} L={len(ids)}"
    finally:
        engine.stop()
    return engine


@pytest.mark.parametrize("family", ["llama", "qwen2.5", "llama3.1", "gpt2"])
def test_int8_engine_matches_the_model_with_dequantized_weights(family, ops, tmp_path, default_model_dir):
    """quantize="int8": every decoder linear quantized into int8 panels (its only copy, the module's
    weight released), pinned to the dequantized model in mixed batches (the check fails unquantized)."""
    build(tmp_path / family, default_model_dir, family, **FAMILIES[family])
    engine = int8_answers_match_the_dequantized_model(
        tmp_path / family, family, Acceleration(quantize="int8")
    )
    decoder = engine.runner.decoder
    lins = [
        lin
        for layer in decoder.layers
        for lin in (layer.qkv, layer.o, layer.up, layer.gate, layer.down)
        if lin
    ]
    assert all(
        lin.panels is not None and lin.panels.dtype == torch.int8 and lin.weight is None for lin in lins
    )
    head = decoder.lm_head.panels
    assert head is not None and head.dtype == torch.float32  # the head is not quantized
    assert (decoder.stack is not None) == (family != "gpt2")  # the native layer stack reads int8 panels too


def test_int8_without_the_native_kernels_runs_torchs_kernel_and_matches_the_dequantized_model(
    tmp_path, default_model_dir
):
    """Where the panel kernel does not serve (a GPU, no native kernels): ATen's _weight_int8pack_mm over
    int8 [out, in] weights (blocks.quantize_int8), pinned to the dequantized model the same way."""
    build(tmp_path / "llama", default_model_dir, "llama", **FAMILIES["llama"])
    accel = Acceleration(quantize="int8", native_kernels=False)
    engine = int8_answers_match_the_dequantized_model(tmp_path / "llama", "llama", accel)
    lin = engine.runner.decoder.layers[0].up
    assert lin.int8 is not None and lin.int8[0].dtype == torch.int8
    assert lin.weight is None and lin.panels is None
