"""The native CPU kernels (server/engine/csrc/) against the torch computations they replace, and their
building and loading (server/engine/kernels.py). The engine-level reference tests run both ways too
(tests/test_engine.py: accelerated and plain); the linears and norms built on them: tests/test_blocks.py."""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from server.engine import kernels
from server.engine.decoder import _rotate_half


def pool_case(dtype: torch.dtype, heads: int, kv_heads: int, dim: int = 16, seed: int = 0):
    """A pool with rows of different lengths on scattered slots (slot 0..15 reserved, as the engine's)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([3, 17, 1, 40, 9])
    rows, width, slots_total = len(lengths), int(lengths.max()), 256
    kpool = torch.randn(kv_heads, slots_total, dim, generator=g).to(dtype)
    vpool = torch.randn(kv_heads, slots_total, dim, generator=g).to(dtype)
    order = torch.randperm(slots_total - 16, generator=g) + 16
    slots = torch.zeros(rows, width, dtype=torch.int64)  # padding past each length: slot 0
    used = 0
    for b, n in enumerate(lengths.tolist()):
        slots[b, :n] = order[used : used + n]
        used += n
    write = slots[torch.arange(rows), lengths - 1].clone()  # the new token is each row's last key
    q = torch.randn(rows, heads, dim, generator=g).to(dtype)
    k = torch.randn(rows, kv_heads, dim, generator=g).to(dtype)
    v = torch.randn(rows, kv_heads, dim, generator=g).to(dtype)
    return q, k, v, kpool, vpool, write, slots, lengths


def reference_attention(q, k, v, kpool, vpool, write, slots, lengths, scale):
    kpool, vpool = kpool.clone(), vpool.clone()
    kpool[:, write] = k.transpose(0, 1)
    vpool[:, write] = v.transpose(0, 1)
    group = q.shape[1] // k.shape[1]
    out = []
    for b, n in enumerate(lengths.tolist()):
        keys = kpool[:, slots[b, :n]].double().repeat_interleave(group, 0)  # [H, n, D]
        values = vpool[:, slots[b, :n]].double().repeat_interleave(group, 0)
        o = F.scaled_dot_product_attention(q[b][:, None].double(), keys, values, scale=scale)  # [H, 1, D]
        out.append(o.reshape(-1))
    return torch.stack(out), kpool, vpool


@pytest.mark.parametrize(
    ("dtype", "heads", "kv_heads", "tol"),
    [
        (torch.float32, 4, 2, 1e-6),
        (torch.float32, 3, 3, 1e-6),
        (torch.float32, 9, 3, 1e-6),  # SmolLM2's 3 query heads per KV head
        # query heads per KV head past one register group (8: 3+3+2 or 4+4; 5: 3+2 or 4+1)
        (torch.float32, 16, 2, 1e-6),
        (torch.bfloat16, 10, 2, 1e-2),
        (torch.float64, 6, 2, 1e-12),  # float64 is computed in float64, not float32
        (torch.bfloat16, 4, 1, 1e-2),
        (torch.float16, 4, 2, 1e-2),
    ],
)
# head sizes: 8-lane registers holding 8 or 32 lanes of a head (float32, bfloat16), the scalar loops (12)
@pytest.mark.parametrize("dim", [16, 64, 12])
def test_decode_attention_writes_the_new_keys_and_attends_each_row_to_its_own_slots(
    ops, dtype, heads, kv_heads, tol, dim
):
    q, k, v, kpool, vpool, write, slots, lengths = pool_case(dtype, heads, kv_heads, dim)
    expected, kpool_after, vpool_after = reference_attention(
        q, k, v, kpool, vpool, write, slots, lengths, 0.25
    )
    # q, k, v as the decoder passes them: strided views into one fused projection output
    qkv = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)
    hq, hk = q[0].numel(), k[0].numel()
    views = qkv[:, :hq].view_as(q), qkv[:, hq : hq + hk].view_as(k), qkv[:, hq + hk :].view_as(v)
    out = ops.decode_attention(*views, kpool, vpool, write, slots, lengths, 0.25)
    assert out.dtype == dtype and out.shape == (len(lengths), q[0].numel())
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    assert torch.equal(kpool, kpool_after) and torch.equal(
        vpool, vpool_after
    )  # written in place, nothing else touched


def test_decode_attention_refuses_out_of_range_slots(ops):
    q, k, v, kpool, vpool, write, slots, lengths = pool_case(torch.float32, 4, 2)
    slots[1, 0] = kpool.shape[1]
    with pytest.raises(RuntimeError, match="out of range"):
        ops.decode_attention(q, k, v, kpool, vpool, write, slots, lengths, 0.25)


def test_rotary_in_place_equals_rotate_half_on_strided_heads(ops):
    n, heads, kv_heads, d = 7, 4, 2, 16
    qkv = torch.randn(n, (heads + 2 * kv_heads) * d)
    qk = qkv[:, : (heads + kv_heads) * d].view(n, heads + kv_heads, d)  # strided: v follows in each row
    cos, sin = torch.randn(n, d), torch.randn(n, d)
    expected = qk * cos[:, None] + _rotate_half(qk) * sin[:, None]
    v_before = qkv[:, (heads + kv_heads) * d :].clone()
    ops.rotary(qk, cos, sin)
    assert torch.equal(qk, expected)  # no fused multiply-add: the same roundings as the torch ops
    assert torch.equal(qkv[:, (heads + kv_heads) * d :], v_before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotary_and_silu_mul_in_16_bits_equal_the_torch_ops(ops, dtype):
    n, heads = 7, 6
    for d in (16, 20, 64):  # half a head: whole groups of 8 lanes, and a scalar tail
        qk = torch.randn(n, heads, d).to(dtype)
        cos, sin = torch.randn(n, d).to(dtype), torch.randn(n, d).to(dtype)
        qk[0, 0, :2] = torch.tensor([float("nan"), float("inf")])
        qk[0, 1] = torch.tensor([0.0, -0.0]).repeat(
            d // 2
        )  # both halves zero: the sum's sign is the products'
        cos[0], sin[0] = -cos[0].abs(), sin[0].abs()
        expected = qk * cos[:, None] + _rotate_half(qk) * sin[:, None]  # each op rounds to the dtype
        ops.rotary(qk, cos, sin)
        assert torch.equal(qk.nan_to_num(), expected.nan_to_num()) and torch.equal(
            qk.isnan(), expected.isnan()
        )
        numbers = ~expected.isnan()
        assert torch.equal(qk.signbit()[numbers], expected.signbit()[numbers])  # zeros keep torch's sign
    gate, up = (torch.randn(5, 300) * 4).to(dtype), torch.randn(5, 300).to(dtype)
    silu = ops.silu_mul(gate, up)
    assert silu.dtype == dtype
    torch.testing.assert_close(silu.float(), (F.silu(gate) * up).float(), atol=1e-2, rtol=1e-2)
    assert (silu == F.silu(gate) * up).float().mean() > 0.99  # exp may differ from torch's in the last bit


def test_silu_mul(ops):
    gate, up = torch.randn(5, 300) * 4, torch.randn(5, 300)
    torch.testing.assert_close(ops.silu_mul(gate, up), F.silu(gate) * up, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_silu_mul_gives_a_value_the_same_bits_wherever_it_sits(ops, dtype):
    """Whole groups of 8 run in registers, a partial last group through a padded buffer: a value's
    result must not depend on which (a row's length, its offset and the thread split move it)."""
    gate, up = (torch.randn(1, 8 * 600 + 5) * 6).to(dtype), torch.randn(1, 8 * 600 + 5).to(dtype)
    gate[0, ::97], gate[0, 5::101], gate[0, 7::103] = float("nan"), float("inf"), -float("inf")
    whole = ops.silu_mul(gate, up)
    for start in (1, 3, 8 * 599 + 1):
        part = ops.silu_mul(gate[:, start:].contiguous(), up[:, start:].contiguous())
        assert torch.equal(part.isnan(), whole[:, start:].isnan())
        assert torch.equal(part.nan_to_num(), whole[:, start:].nan_to_num())
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # exp may differ from torch's in the last bit
    torch.testing.assert_close(
        whole, F.silu(gate) * up, atol=tol, rtol=tol, equal_nan=True
    )  # inf and nan as torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 5, 6, 13, 40])
def test_panel_linear_matches_a_float32_product(ops, dtype, rows):
    # N = 37 leaves a partial last panel; rows cover one tile, a full tile and partial tiles.
    g = torch.Generator().manual_seed(rows)
    w, b, x = (
        (torch.randn(37, 45, generator=g) * 0.1).to(dtype),
        torch.randn(37, generator=g),
        torch.randn(rows, 45, generator=g),
    )
    panels = ops.pack_panels(w)
    assert panels.shape == (3, 45, 16) and panels.dtype == dtype
    out = ops.panel_linear(x, panels, 37, b)
    assert out.shape == (rows, 37) and out.dtype == torch.float32
    torch.testing.assert_close(
        out, x.double().mm(w.double().t()).add(b.double()).float(), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(ops.panel_linear(x, panels, 37, None) + b, out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 5, 13])
def test_panel_linear_in_16_bits_is_the_float32_result_rounded(ops, dtype, rows):
    """16-bit x in, 16-bit y out (what the decoder feeds a 16-bit model): bit for bit the float32
    product of the same values, rounded as torch's cast rounds."""
    g = torch.Generator().manual_seed(rows)
    w, b = (torch.randn(37, 45, generator=g) * 0.1).to(dtype), torch.randn(37, generator=g)
    x = torch.randn(rows, 45, generator=g).to(dtype)
    panels = ops.pack_panels(w)
    out = ops.panel_linear(x, panels, 37, b)
    assert out.dtype == dtype and out.shape == (rows, 37)
    assert torch.equal(out, ops.panel_linear(x.float(), panels, 37, b).to(dtype))
    with pytest.raises(RuntimeError, match="x must be"):  # 16-bit x only with panels of its own dtype
        ops.panel_linear(x, ops.pack_panels(w.float()), 37, b)


def test_panel_linear_rows_do_not_depend_on_the_other_rows_bit_for_bit(ops):
    w, x = torch.randn(50, 300) * 0.1, torch.randn(40, 300)
    panels = ops.pack_panels(w)
    together = ops.panel_linear(x, panels, 50, None)
    for i in (0, 7, 39):  # in a full tile, in the last partial tile, alone
        assert torch.equal(ops.panel_linear(x[i : i + 1].contiguous(), panels, 50, None)[0], together[i])
    assert torch.equal(ops.panel_linear(x[5:17].contiguous(), panels, 50, None), together[5:17])


def test_panel_linear_packs_any_strides_and_refuses_bad_shapes(ops):
    w = torch.randn(64, 20)  # a transposed view, as gpt2's Conv1D weights: [20, 64] with strides (1, 20)
    x = torch.randn(3, 64)
    torch.testing.assert_close(
        ops.panel_linear(x, ops.pack_panels(w.t()), 20, None), x @ w, atol=1e-5, rtol=1e-5
    )
    panels = ops.pack_panels(w.t())
    with pytest.raises(RuntimeError, match="panels must come from pack_panels"):
        ops.panel_linear(torch.randn(3, 63), panels, 20, None)
    with pytest.raises(RuntimeError, match="panels must come from pack_panels"):
        ops.panel_linear(x, panels, 40, None)  # more outputs than the panels hold
    with pytest.raises(RuntimeError, match="x must be"):
        ops.panel_linear(x.double(), panels, 20, None)
    with pytest.raises(RuntimeError, match="bias"):
        ops.panel_linear(x, panels, 20, torch.randn(21))


def quantize_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel, computed here independently of the kernel: (q [N, K], scale [N])."""
    wf = w.float()
    scale = wf.abs().amax(1) / 127
    scale[scale == 0] = 1
    return (wf / scale[:, None]).round().clamp(-127, 127), scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 5, 13, 40])
def test_int8_panels_compute_the_product_with_the_dequantized_weight(ops, dtype, rows):
    """pack_panels_int8 quantizes per output channel (an all-zero channel included, the weight left
    untouched) and panel_linear over it gives x (q s)^T + b in x's dtype: the float32 chain of x q,
    times s."""
    g = torch.Generator().manual_seed(rows)
    w, b = (torch.randn(37, 45, generator=g) * 0.1).to(dtype), torch.randn(37, generator=g)
    w[3] = 0
    before = w.clone()
    panels, scales = ops.pack_panels_int8(w)
    assert torch.equal(w, before)
    q, scale = quantize_reference(w)
    assert panels.shape == (3, 45, 16) and panels.dtype == torch.int8 and torch.equal(scales, scale)
    assert torch.equal(panels.transpose(1, 2).reshape(48, 45)[:37].float(), q)
    assert not panels.transpose(1, 2).reshape(48, 45)[37:].any()  # the partial panel's padding
    x = torch.randn(rows, 45, generator=g).to(dtype)
    out = ops.panel_linear(x, panels, 37, b, scales)
    assert out.shape == (rows, 37) and out.dtype == dtype
    want = x.double().mm(q.double().t()).mul(scale.double()).add(b.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), want.to(dtype).double(), atol=tol, rtol=tol)
    for i in (0, rows - 1):  # a row alone: the same bits
        assert torch.equal(ops.panel_linear(x[i : i + 1].contiguous(), panels, 37, b, scales)[0], out[i])
    with pytest.raises(RuntimeError, match="scales are given exactly for int8 panels"):
        ops.panel_linear(x, panels, 37, b)
    with pytest.raises(RuntimeError, match="scales must be"):
        ops.panel_linear(x, panels, 37, b, scales[:36].contiguous())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 5, 8, 13, 1027])
def test_greedy_is_torch_argmax_and_flags_rows_that_are_not_finite(ops, dtype, vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randint(-3, 4, (9, vocab), generator=g).to(dtype)  # few distinct values: many ties
    logits[1] = -5.0  # the max in the first lane
    logits[1, -1] = 7.0  # ... and in the tail
    logits[2] = torch.randn(vocab, generator=g).to(dtype)
    bad = {4: float("nan"), 5: float("inf"), 6: -float("inf")}
    for row, value in bad.items():
        logits[row, vocab // 2] = value
    tokens, finite = ops.greedy(logits)
    assert tokens.dtype == torch.int64 and finite.dtype == torch.bool
    assert finite.tolist() == [row not in bad for row in range(9)]
    good = [row for row in range(9) if row not in bad]
    assert tokens[good].tolist() == logits[good].float().argmax(dim=-1).tolist()  # ties: the first index
    with pytest.raises(RuntimeError, match="logits must be"):
        ops.greedy(logits.double())


# ---- building and loading (server/engine/kernels.py) ----------------------------------------------


def test_a_built_library_is_imported_as_it_is_despite_a_stale_torch_lock(ops, tmp_path):
    """A build killed halfway leaves torch's lock file behind; a start must not wait on it forever,
    and a library already built (here: this session's, copied) must load without building again."""
    key = kernels.build_key()
    built = ops.library
    target = tmp_path / "kernels" / key
    target.mkdir(parents=True)
    shutil.copy(built, target / built.name)
    (target / "lock").touch()  # torch's baton from the killed build
    script = (
        "import sys; from pathlib import Path; import torch.utils.cpp_extension as ext\n"
        "ext.load = None  # any attempt to build fails\n"
        "from server.engine import kernels\n"
        "m = kernels.load(Path(sys.argv[1])); "
        "assert m is not None and m.panel_linear_vectorized() in (True, False)\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        check=True,
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )


def test_a_build_clears_a_stale_torch_lock_and_replaces_a_library_that_does_not_load(tmp_path, monkeypatch):
    from torch.utils import cpp_extension

    key = kernels.build_key()
    build_dir = tmp_path / "kernels" / key
    build_dir.mkdir(parents=True)
    (build_dir / "lock").touch()
    (build_dir / f"softmux_cpu_ops_{key}.so").write_bytes(b"cut short")
    seen = {}
    built = types.SimpleNamespace(name="built")

    def fake_build(**kwargs):
        seen["torch_lock"] = (build_dir / "lock").exists()
        seen["library"] = (build_dir / f"softmux_cpu_ops_{key}.so").exists()
        with open(build_dir / "softmux-build.lock") as f:  # held by the builder: another process waits
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return built

    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr(cpp_extension, "load", fake_build)
    loaded = kernels.load(tmp_path)
    assert loaded is not None and loaded._m is built  # the freshly built module, behind the typed wrapper
    assert seen == {"torch_lock": False, "library": False}


def test_the_build_finds_the_ninja_dependency_without_an_activated_venv(monkeypatch, tmp_path):
    """`.venv/bin/softmux serve` runs with the venv's bin/ off PATH (and images have no system ninja):
    the build must still find the `ninja` the package depends on, or the server silently runs torch ops."""
    import ninja  # a dependency of the package (pyproject.toml)

    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH, as in a bare image's shell
    assert shutil.which("ninja") is None
    kernels._put_ninja_on_path()
    assert shutil.which("ninja") == str(Path(ninja.BIN_DIR) / "ninja")


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (  # torch's message as a bare Debian python3 gives it: the compiler's error is lines down
            "Error building extension 'softmux_cpu_ops_1': [1/5] c++ -MMD -O3 -c attention.cpp\n"
            "FAILED: [code=1] attention.o\n"
            "In file included from torch/include/torch/extension.h:10,\n"
            "torch/csrc/python_headers.h:13:10: fatal error: Python.h: No such file or directory\n"
            "compilation terminated.\n",
            "error: Python.h: No such file or directory; "
            "install Python's headers (apt-get install python3-dev)",
        ),
        (
            "Ninja is required to load C++ extensions (pip install ninja to get it)",
            "Ninja is required to load C++ extensions (pip install ninja to get it); pip install ninja",
        ),
        (
            "[1/5] c++ -c x.cpp\n/bin/sh: 1: c++: not found\n",
            "/bin/sh: 1: c++: not found; install a C++ compiler (apt-get install g++)",
        ),
        ("something else\nmore", "something else"),
    ],
)
def test_a_failed_build_says_why_and_what_to_install(output, expected):
    assert kernels.build_failure(RuntimeError(output)) == expected
