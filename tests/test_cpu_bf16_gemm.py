"""The bfloat16 SwiGLU expert MLP on the CPU's own AVX512-BF16 GEMM (csrc/cpu/bf16_gemm_kernel.h):
forward and backward against a float64 reference and against the oneDNN path it replaces, over the
shapes its tiling has edges at (rows per expert not a multiple of the 6-row tile, widths not a
multiple of the 64-column block, odd K), the routing edge cases, strided weights (each of the
packer's three ways in), biases, and through the ``moefast.nn.MoE`` layer. Skipped on CPUs without
AVX512-BF16, where the op always takes the oneDNN path. The same for grouped_mm, its data and
weight gradients, and the MoE layer's non-SwiGLU experts, which run on the same kernel."""

from __future__ import annotations

import contextlib

import pytest
import torch
from moefast_testing import offs_from_counts, randn

import moefast
from moefast.nn import MoE

pytestmark = pytest.mark.skipif(
    not moefast._C.cpu_bf16_gemm_available(), reason="this CPU has no AVX512-BF16"
)

BF16 = torch.bfloat16


@contextlib.contextmanager
def bf16_gemm(on: bool):
    previous = moefast._C.cpu_bf16_gemm()
    moefast._C.set_cpu_bf16_gemm(on)
    try:
        yield
    finally:
        moefast._C.set_cpu_bf16_gemm(previous)


def weights(E, d, H, layout, gen):
    """w1 [E, d, 2H] and w2 [E, H, d] in bfloat16, stored as asked: "contiguous", "transposed"
    (each expert's matrix stored the other way round, so the kernel packs from unit row stride) or
    "strided" (every other column of a wider tensor)."""
    if layout == "contiguous":
        w1 = randn(E, d, 2 * H, gen=gen, scale=d**-0.5)
        w2 = randn(E, H, d, gen=gen, scale=H**-0.5)
    elif layout == "transposed":
        w1 = randn(E, 2 * H, d, gen=gen, scale=d**-0.5).transpose(1, 2)
        w2 = randn(E, d, H, gen=gen, scale=H**-0.5).transpose(1, 2)
    else:
        w1 = randn(E, d, 4 * H, gen=gen, scale=d**-0.5)[:, :, ::2]
        w2 = randn(E, H, 2 * d, gen=gen, scale=H**-0.5)[:, :, ::2]
    return w1.to(BF16), w2.to(BF16)


def run_op(x, w1, b1, w2, b2, offs, gy):
    """The op forward and its backward op: (y, h, act, grad_x, grad_w1, grad_w2, grad_b1, grad_b2)."""
    y, h, act = torch.ops.moefast.grouped_swiglu_mlp(x, w1, b1, w2, b2, offs)
    bias = b1 is not None
    g = torch.ops.moefast.grouped_swiglu_mlp_backward(gy, x, w1, w2, offs, h, act, True, bias)
    return (y, h, act, *g)


def reference(x, w1, b1, w2, b2, counts, gy):
    """float64 forward and gradients from the same bfloat16 values (no intermediate rounding)."""
    leaves = [
        t.double().requires_grad_(True) if t is not None else None for t in (x, w1, b1, w2, b2)
    ]
    xd, w1d, b1d, w2d, b2d = leaves
    H = w1.shape[2] // 2
    ys, begin = [], 0
    for e, n in enumerate(counts):
        h = xd[begin : begin + n] @ w1d[e]
        if b1d is not None:
            h = h + b1d[e]
        a = torch.nn.functional.silu(h[:, :H]) * h[:, H:]
        y = a @ w2d[e]
        if b2d is not None:
            y = y + b2d[e]
        ys.append(y)
        begin += n
    y = torch.cat([*ys, xd.new_zeros(x.shape[0] - begin, x.shape[1])])
    y.backward(gy.double())
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def rel(a, b):
    """Frobenius error of a relative to b."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_training_step_agrees(moe, x):
    """One forward + backward of the layer with the kernel and with oneDNN: the output, the input
    gradient and every parameter gradient agree."""
    results = {}
    for on in (True, False):
        xi = x.clone().requires_grad_(True)
        moe.zero_grad(set_to_none=True)
        with bf16_gemm(on):
            y = moe(xi)
            (y.float() ** 2).sum().backward()
        results[on] = [y.detach(), xi.grad, *(p.grad for p in moe.parameters())]
    for a, b in zip(results[True], results[False], strict=True):
        assert a is not None and b is not None
        assert rel(a, b) < 5e-3


def mm_calls(fn):
    """How many aten::mm / aten::addmm calls fn makes on this thread, with the kernel switched on
    and off: {True: n_on, False: n_off}."""
    seen = {}
    for on in (True, False):
        with bf16_gemm(on), torch.profiler.profile() as prof:
            fn()
        seen[on] = sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))
    return seen


CASES = {
    # name: (d, H, counts)
    "tile-edges": (33, 70, [13, 0, 64, 7]),
    "odd-k-tiny": (7, 5, [10, 1, 37]),
    "one-column": (1, 1, [6, 6]),
    "blocks": (128, 192, [200, 131]),
    "all-on-one-expert": (64, 64, [0, 0, 150]),
    "zero-tokens": (16, 8, [0, 0]),
    "unused-tail-rows": (40, 24, [5, 9]),  # rows past offs[-1] give zeros
    # more rows than the kernel's weight gradients take (they fall back to oneDNN for the call)
    "past-the-weight-grad-row-cap": (16, 8, [32769, 5]),
}


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_and_onednn_path(case, bias, layout, gen):
    d, H, counts = CASES[case]
    E = len(counts)
    N = sum(counts) + (3 if case == "unused-tail-rows" else 0)
    x = randn(N, d, gen=gen).to(BF16)
    w1, w2 = weights(E, d, H, layout, gen)
    b1 = randn(E, 2 * H, gen=gen, scale=0.1).to(BF16) if bias else None
    b2 = randn(E, d, gen=gen, scale=0.1).to(BF16) if bias else None
    gy = randn(N, d, gen=gen).to(BF16)
    offs = offs_from_counts(counts)
    with bf16_gemm(True):
        fast = run_op(x, w1, b1, w2, b2, offs, gy)
    with bf16_gemm(False):
        slow = run_op(x, w1, b1, w2, b2, offs, gy)
    names = ["y", "h", "act", "grad_x", "grad_w1", "grad_w2", "grad_b1", "grad_b2"]
    for name, a, b in zip(names, fast, slow, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert not a.isnan().any(), f"{name}: unwritten (poisoned) elements"
        if a.numel() and b.abs().sum() > 0:
            # Same bfloat16 roundings; only the order of the float sums may differ.
            assert rel(a, b) < 4e-3, (name, rel(a, b))
        else:
            assert torch.equal(a, b), name
    if N == 0 or sum(counts) == 0:
        assert fast[0].abs().sum() == 0 and fast[4].abs().sum() == 0
        return
    y_ref, g_ref = reference(x, w1, b1, w2, b2, counts, gy)
    assert rel(fast[0], y_ref) < 2e-2
    for name, a, b in zip(
        ["grad_x", "grad_w1", "grad_b1", "grad_w2", "grad_b2"],
        (fast[3], fast[4], fast[6], fast[5], fast[7]),
        (g_ref[0], g_ref[1], g_ref[2], g_ref[3], g_ref[4]),
        strict=True,
    ):
        if b is None:
            continue
        assert rel(a, b) < 3e-2, (name, rel(a, b))
    # An expert without tokens has zero weight gradients.
    for e, n in enumerate(counts):
        if n == 0:
            assert fast[4][e].abs().sum() == 0 and fast[5][e].abs().sum() == 0


def test_the_switch_selects_the_kernel(gen):
    """With the switch on, no expert GEMM goes through aten::mm (oneDNN); off, they all do. (Groups
    large enough that the experts run one after the other, on the profiled thread.)"""
    d, H, counts = 64, 64, [200, 150]
    x = randn(sum(counts), d, gen=gen).to(BF16)
    w1, w2 = weights(2, d, H, "contiguous", gen)
    gy = randn(sum(counts), d, gen=gen).to(BF16)
    offs = offs_from_counts(counts)
    seen = mm_calls(lambda: run_op(x, w1, None, w2, None, offs, gy))
    assert seen[True] == 0
    assert seen[False] == 2 * 6  # six GEMMs per expert


def test_float32_never_takes_the_kernel(gen):
    """The switch only concerns bfloat16: float32 results do not depend on it."""
    d, H, counts = 24, 40, [9, 15]
    x = randn(sum(counts), d, gen=gen)
    w1 = randn(2, d, 2 * H, gen=gen)
    w2 = randn(2, H, d, gen=gen)
    gy = randn(sum(counts), d, gen=gen)
    offs = offs_from_counts(counts)
    with bf16_gemm(True):
        a = run_op(x, w1, None, w2, None, offs, gy)
    with bf16_gemm(False):
        b = run_op(x, w1, None, w2, None, offs, gy)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


def test_moe_layer_training_step_agrees_with_onednn_path(gen):
    """A bfloat16 Mixtral-style layer (swiglu experts, top-2, 3-D input): output, input gradient
    and every parameter gradient agree between the two paths."""
    torch.manual_seed(0)
    moe = MoE(48, 80, num_experts=5, k=2, activation="swiglu").to(BF16)
    x = randn(3, 37, 48, gen=gen).to(BF16)
    assert_training_step_agrees(moe, x)


# --- grouped_mm (and so grouped_mm_act, nn.GroupedLinear and the non-SwiGLU experts) -------------

GMM_CASES = {
    # name: (K, M, counts)
    "tile-edges": (33, 70, [13, 0, 64, 7]),
    "odd-k-tiny": (7, 5, [10, 1, 37]),
    "blocks": (128, 192, [200, 131]),
    "all-on-one-expert": (64, 64, [0, 0, 150]),
    "zero-tokens": (16, 8, [0, 0]),
    "unused-tail-rows": (40, 24, [5, 9]),
    # small groups: for_each_group runs the experts in parallel, one workspace slot per thread
    "64-small-experts": (48, 40, [3, 0, 5, 1, 7, 2, 0, 4] * 8),
    "past-the-weight-grad-row-cap": (16, 8, [32769, 5]),
}


def gmm_weight(E, K, M, layout, gen):
    """b [E, K, M] in bfloat16, stored as asked (see weights())."""
    if layout == "contiguous":
        b = randn(E, K, M, gen=gen, scale=K**-0.5)
    elif layout == "transposed":
        b = randn(E, M, K, gen=gen, scale=K**-0.5).transpose(1, 2)
    else:
        b = randn(E, K, 2 * M, gen=gen, scale=K**-0.5)[:, :, ::2]
    return b.to(BF16)


def gmm_input(N, K, layout, gen):
    """a [N, K] in bfloat16: contiguous, rows further apart than K ("row-strided", a column slice
    of a wider tensor, which the kernel reads in place) or a column stride of 2 ("col-strided",
    which it copies first)."""
    if layout == "contiguous":
        return randn(N, K, gen=gen).to(BF16)
    if layout == "row-strided":
        return randn(N, K + 9, gen=gen).to(BF16)[:, 3 : 3 + K]
    return randn(N, 2 * K, gen=gen).to(BF16)[:, ::2]


def run_gmm(a, b, bias, offs, gy):
    """grouped_mm's forward, the data gradient (grouped_mm on b transposed, as the autograd formula
    calls it) and the weight gradient."""
    out = torch.ops.moefast.grouped_mm(a, b, offs, bias)
    grad_a = torch.ops.moefast.grouped_mm(gy, b.transpose(1, 2), offs)
    grad_b = torch.ops.moefast.grouped_mm_weight_grad(a, gy, offs)
    return out, grad_a, grad_b


GMM_PARAMS = [
    (case, a_layout, b_layout)
    for case in GMM_CASES
    for a_layout in ("contiguous", "row-strided", "col-strided")
    for b_layout in ("contiguous", "transposed", "strided")
    # one layout is enough for the 32,774-row case
    if case != "past-the-weight-grad-row-cap" or (a_layout, b_layout) == ("contiguous", "strided")
]


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize(("case", "a_layout", "b_layout"), GMM_PARAMS)
def test_grouped_mm_matches_reference_and_onednn_path(case, a_layout, b_layout, bias, gen):
    K, M, counts = GMM_CASES[case]
    E = len(counts)
    N = sum(counts) + (3 if case == "unused-tail-rows" else 0)
    a = gmm_input(N, K, a_layout, gen)
    b = gmm_weight(E, K, M, b_layout, gen)
    bb = randn(E, M, gen=gen, scale=0.1).to(BF16) if bias else None
    gy = randn(N, M, gen=gen).to(BF16)
    offs = offs_from_counts(counts)
    with bf16_gemm(True):
        fast = run_gmm(a, b, bb, offs, gy)
    with bf16_gemm(False):
        slow = run_gmm(a, b, bb, offs, gy)
    for name, u, v in zip(["out", "grad_a", "grad_b"], fast, slow, strict=True):
        assert u.shape == v.shape and u.dtype == v.dtype, name
        assert not u.isnan().any(), f"{name}: unwritten (poisoned) elements"
        if u.numel() and v.abs().sum() > 0:
            assert rel(u, v) < 4e-3, (name, rel(u, v))
        else:
            assert torch.equal(u, v), name
    # float64 reference from the same bfloat16 values.
    used = sum(counts)
    out_ref = torch.zeros(N, M, dtype=torch.float64)
    grad_a_ref = torch.zeros(N, K, dtype=torch.float64)
    grad_b_ref = torch.zeros(E, K, M, dtype=torch.float64)
    begin = 0
    for e, n in enumerate(counts):
        rows = slice(begin, begin + n)
        out_ref[rows] = a[rows].double() @ b[e].double()
        if bias:
            out_ref[rows] += bb[e].double()
        grad_a_ref[rows] = gy[rows].double() @ b[e].double().T
        grad_b_ref[e] = a[rows].double().T @ gy[rows].double()
        begin += n
    if used == 0:
        assert fast[0].abs().sum() == 0 and fast[2].abs().sum() == 0
        return
    assert rel(fast[0], out_ref) < 2e-2
    assert rel(fast[1], grad_a_ref) < 2e-2
    assert rel(fast[2], grad_b_ref) < 2e-2
    assert fast[0][used:].abs().sum() == 0 and fast[1][used:].abs().sum() == 0
    for e, n in enumerate(counts):
        if n == 0:
            assert fast[2][e].abs().sum() == 0


def test_grouped_mm_switch_selects_the_kernel(gen):
    """With the switch on, grouped_mm and its weight gradient call no aten::mm; off, one per expert
    each. (Groups large enough to run one after the other, on the profiled thread.)"""
    K, M, counts = 128, 192, [400, 300, 250]
    a = randn(sum(counts), K, gen=gen).to(BF16)
    b = gmm_weight(3, K, M, "contiguous", gen)
    gy = randn(sum(counts), M, gen=gen).to(BF16)
    offs = offs_from_counts(counts)
    seen = mm_calls(lambda: run_gmm(a, b, None, offs, gy))
    assert seen[True] == 0
    assert seen[False] == 3 * 3  # forward, data and weight gradient per expert


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
def test_moe_layer_non_swiglu_agrees_with_onednn_path(activation, gen):
    """A bfloat16 MoE layer whose experts are two grouped_mm_act calls: output, input gradient and
    every parameter gradient agree between the two paths."""
    torch.manual_seed(1)
    moe = MoE(40, 72, num_experts=6, k=2, activation=activation).to(BF16)
    x = randn(2, 45, 40, gen=gen).to(BF16)
    assert_training_step_agrees(moe, x)
