"""permute, grouped_mm, unpermute, mixture and the whole pipeline, forward and backward, against
moefast.reference, in every dtype; edge cases; non-contiguous inputs.

Every test here runs with poisoned kernel outputs (see conftest.py), so equality with the reference
also proves that every output element (zero rows and empty experts' gradients included) is written.
"""

from __future__ import annotations

import pytest
import torch
from moefast_testing import (
    FLOAT_DTYPES,
    assert_close,
    distinct_logits,
    dtype_id,
    grads,
    leaf,
    moefast_pipeline,
    offs_from_counts,
    randn,
    random_ids,
    reference_pipeline,
)

import moefast
from moefast import reference as ref

_ops = torch.ops.moefast

dtypes = pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)


def test_poison_is_on_during_tests():
    assert moefast._C.poison_outputs()


@pytest.mark.no_poison
def test_poison_off_with_marker():
    assert not moefast._C.poison_outputs()


def test_poison_shows_unwritten_elements(gen):
    """The switch works: rows a kernel does not write come out as NaN.

    A hand-made position that is not a permutation (two slots on one row) leaves rows 2 and 3 of
    permute's output unwritten.
    """
    position = torch.tensor([[0, 0], [1, 1]], dtype=torch.int32)
    try:
        out = _ops.permute(randn(2, 3, gen=gen), position, None)
    except ValueError:
        pytest.skip("permute now refuses a position that is not a permutation")
    assert not bool(out[:2].isnan().any())
    assert bool(out[2:].isnan().all())


# ----------------------------------------------------------------------------- permute


@dtypes
@pytest.mark.parametrize("T, k, E, d", [(13, 2, 5, 6), (9, 1, 3, 17), (6, 3, 3, 4)])
def test_permute_matches_reference(T, k, E, d, dtype, gen):
    routing = moefast.routing_from_ids(random_ids(T, k, E, gen=gen), E)
    x = randn(T, d, gen=gen, dtype=dtype, requires_grad=True)
    out = moefast.permute(x, routing)
    x_ref = leaf(x)
    out_ref = ref.permute(x_ref, routing.position)
    assert out.shape == (T * k, d) and out.dtype == dtype
    assert torch.equal(out, out_ref)  # a pure copy
    # Rows are grouped by expert: row r holds token order[r] // k.
    assert torch.equal(out, x.detach()[routing.order.long() // k])
    g_out = randn(T * k, d, gen=gen, dtype=dtype)
    (gx,) = grads(out, [x], g_out)
    (gx_ref,) = grads(out_ref, [x_ref], g_out)
    assert_close(gx, gx_ref, grad=True)


@dtypes
def test_permute_raw_op_with_weights(dtype, gen):
    """torch.ops.moefast.permute's fused scaling: out[position[t, j]] = w[t, j] * x[t]."""
    T, k, E, d = 11, 2, 4, 5
    routing = moefast.routing_from_ids(random_ids(T, k, E, gen=gen), E)
    x = randn(T, d, gen=gen, dtype=dtype, requires_grad=True)
    w = randn(T, k, gen=gen, dtype=dtype, requires_grad=True)
    out = _ops.permute(x, routing.position, w)
    x_ref, w_ref = leaf(x), leaf(w)
    out_ref = ref.permute(x_ref, routing.position, w_ref)
    assert_close(out, out_ref)
    g_out = randn(T * k, d, gen=gen, dtype=dtype)
    gx, gw = grads(out, [x, w], g_out)
    gx_ref, gw_ref = grads(out_ref, [x_ref, w_ref], g_out)
    assert gw.dtype == dtype
    assert_close(gx, gx_ref, grad=True)
    assert_close(gw, gw_ref, grad=True)


# ----------------------------------------------------------------------------- unpermute


@dtypes
@pytest.mark.parametrize("mode, k", [("softmax_topk", 2), ("topk_softmax", 3), ("dense", 4)])
def test_unpermute_with_routing_weights(mode, k, dtype, gen):
    """Gradients flow to y and, through routing.weights, to the router logits."""
    T, E, d = 10, 4, 6
    logits = distinct_logits(T, E, gen=gen, dtype=dtype, requires_grad=True)
    routing = moefast.route(logits, k, mode=mode, normalize=True)
    y = randn(T * k, d, gen=gen, dtype=dtype, requires_grad=True)
    out = moefast.unpermute(y, routing)

    logits_ref, y_ref = leaf(logits), leaf(y)
    w_ref, _ = ref.route(logits_ref, k, mode=mode, normalize=True)
    out_ref = ref.unpermute(y_ref, routing.position, w_ref)
    assert out.shape == (T, d) and out.dtype == dtype
    assert_close(out, out_ref)

    g_out = randn(T, d, gen=gen, dtype=dtype)
    gy, gl = grads(out, [y, logits], g_out)
    gy_ref, gl_ref = grads(out_ref, [y_ref, logits_ref], g_out)
    assert_close(gy, gy_ref, grad=True)
    assert_close(gl, gl_ref, grad=True)
    assert torch.count_nonzero(gl) > 0


@dtypes
@pytest.mark.parametrize("w_dtype", ["same", "float32"])
def test_unpermute_with_explicit_weights(w_dtype, dtype, gen):
    T, k, E, d = 12, 2, 5, 7
    routing = moefast.routing_from_ids(random_ids(T, k, E, gen=gen), E)
    wd = dtype if w_dtype == "same" else torch.float32
    w = randn(T, k, gen=gen, dtype=wd, requires_grad=True)
    y = randn(T * k, d, gen=gen, dtype=dtype, requires_grad=True)
    out = moefast.unpermute(y, routing, w)
    y_ref, w_ref = leaf(y), leaf(w)
    out_ref = ref.unpermute(y_ref, routing.position, w_ref)
    assert out.dtype == dtype
    assert_close(out, out_ref)
    g_out = randn(T, d, gen=gen, dtype=dtype)
    gy, gw = grads(out, [y, w], g_out)
    gy_ref, gw_ref = grads(out_ref, [y_ref, w_ref], g_out)
    assert gw.dtype == wd
    assert_close(gy, gy_ref, grad=True)
    assert_close(gw, gw_ref, dtype, grad=True)


def test_unpermute_default_weights_of_routing_from_ids(gen):
    """routing_from_ids weights default to 1/k: unpermute(permute(x)) == x."""
    T, k, E, d = 9, 3, 4, 5
    routing = moefast.routing_from_ids(random_ids(T, k, E, gen=gen), E)
    x = randn(T, d, gen=gen)
    assert_close(moefast.unpermute(moefast.permute(x, routing), routing), x)


@dtypes
def test_unpermute_raw_op_without_weights(dtype, gen):
    T, k, E, d = 8, 2, 3, 5
    routing = moefast.routing_from_ids(random_ids(T, k, E, gen=gen), E)
    y = randn(T * k, d, gen=gen, dtype=dtype, requires_grad=True)
    out = _ops.unpermute(y, routing.position, None)
    y_ref = leaf(y)
    out_ref = ref.unpermute(y_ref, routing.position)
    assert_close(out, out_ref)
    g_out = randn(T, d, gen=gen, dtype=dtype)
    assert_close(grads(out, [y], g_out)[0], grads(out_ref, [y_ref], g_out)[0], grad=True)


@dtypes
def test_unpermute_weight_grad_raw_op(dtype, gen):
    T, k, E, d = 9, 2, 4, 6
    routing = moefast.routing_from_ids(random_ids(T, k, E, gen=gen), E)
    g_out = randn(T, d, gen=gen, dtype=dtype)
    y = randn(T * k, d, gen=gen, dtype=dtype)
    gw = _ops.unpermute_weight_grad(g_out, y, routing.position)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert gw.dtype == acc and gw.shape == (T, k)
    rows = y.to(acc)[routing.position.reshape(-1).long()].view(T, k, d)
    expected = (rows * g_out.to(acc).unsqueeze(1)).sum(-1)
    assert_close(gw, expected, dtype=acc if dtype in (torch.float32, torch.float64) else dtype)


# ----------------------------------------------------------------------------- grouped_mm


@dtypes
@pytest.mark.parametrize(
    "counts, N",
    [([3, 0, 5, 2], 12), ([4, 4, 4], 12), ([0, 0, 7], 7), ([6], 9), ([0, 0], 3)],
    ids=["empty-expert+tail", "even", "leading-empty", "one-expert+tail", "no-rows-used"],
)
def test_grouped_mm_matches_reference(counts, N, dtype, gen):
    E, K, M = len(counts), 5, 4
    offs = offs_from_counts(counts)
    a = randn(N, K, gen=gen, dtype=dtype, requires_grad=True)
    b = randn(E, K, M, gen=gen, dtype=dtype, requires_grad=True)
    out = moefast.grouped_mm(a, b, offs)
    a_ref, b_ref = leaf(a), leaf(b)
    out_ref = ref.grouped_mm(a_ref, b_ref, offs)
    assert out.shape == (N, M) and out.dtype == dtype
    assert_close(out, out_ref)
    used = int(offs[-1])
    assert torch.count_nonzero(out[used:]) == 0  # rows past offs[-1] are zeros

    g_out = randn(N, M, gen=gen, dtype=dtype)
    ga, gb = grads(out, [a, b], g_out)
    ga_ref, gb_ref = grads(out_ref, [a_ref, b_ref], g_out)
    assert ga.dtype == dtype and gb.dtype == dtype
    assert_close(ga, ga_ref, grad=True)
    assert_close(gb, gb_ref, grad=True)
    assert torch.count_nonzero(ga[used:]) == 0  # rows past offs[-1] get zero gradient
    for e, c in enumerate(counts):
        if c == 0:  # an expert with no rows gets a zero weight gradient (not NaN, not garbage)
            assert torch.count_nonzero(gb[e]) == 0
        else:
            assert torch.count_nonzero(gb[e]) > 0


@dtypes
@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "silu", "swiglu"])
def test_grouped_mm_act_matches_reference(activation, dtype, gen):
    """The activation applied to grouped_mm's output (swiglu: silu(gate) * up of the halves),
    forward and backward, with the bias, an empty expert and an unused tail."""
    counts, N, K, M = [3, 0, 5, 2], 12, 5, 6
    E = len(counts)
    offs = offs_from_counts(counts)
    a = randn(N, K, gen=gen, dtype=dtype, requires_grad=True)
    b = randn(E, K, M, gen=gen, dtype=dtype, requires_grad=True)
    bias = randn(E, M, gen=gen, dtype=dtype, requires_grad=True)
    out = moefast.grouped_mm_act(a, b, offs, bias, activation)
    a_ref, b_ref, bias_ref = leaf(a), leaf(b), leaf(bias)
    out_ref = ref.grouped_mm_act(a_ref, b_ref, offs, bias_ref, activation)
    cols = M // 2 if activation == "swiglu" else M
    assert out.shape == (N, cols) and out.dtype == dtype
    assert_close(out, out_ref)
    assert torch.count_nonzero(out[int(offs[-1]) :]) == 0  # act(0) = 0 past offs[-1]
    g_out = randn(N, cols, gen=gen, dtype=dtype)
    got = grads(out, [a, b, bias], g_out)
    want = grads(out_ref, [a_ref, b_ref, bias_ref], g_out)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, grad=True)
    assert torch.count_nonzero(got[1][1]) == 0  # the empty expert's weight gradient


@dtypes
def test_grouped_mm_weight_grad_raw_op(dtype, gen):
    counts, N, K, M = [2, 0, 3, 0], 7, 3, 4
    offs = offs_from_counts(counts)
    a = randn(N, K, gen=gen, dtype=dtype)
    g_out = randn(N, M, gen=gen, dtype=dtype)
    gb = _ops.grouped_mm_weight_grad(a, g_out, offs)
    assert gb.shape == (len(counts), K, M) and gb.dtype == dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    begin = 0
    for e, end in enumerate(offs.tolist()):
        expected = a[begin:end].to(acc).T @ g_out[begin:end].to(acc)
        assert_close(gb[e], expected.to(dtype))
        begin = end


def test_grouped_mm_large_groups_sequential_path(gen):
    """Groups big enough for the one-expert-at-a-time path (threaded BLAS)."""
    counts, K, M = [300, 0, 212], 64, 48
    N = sum(counts) + 5
    offs = offs_from_counts(counts)
    a = randn(N, K, gen=gen, requires_grad=True)
    b = randn(3, K, M, gen=gen, requires_grad=True)
    out = moefast.grouped_mm(a, b, offs)
    a_ref, b_ref = leaf(a), leaf(b)
    out_ref = ref.grouped_mm(a_ref, b_ref, offs)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-4)
    g_out = randn(N, M, gen=gen)
    ga, gb = grads(out, [a, b], g_out)
    ga_ref, gb_ref = grads(out_ref, [a_ref, b_ref], g_out)
    torch.testing.assert_close(ga, ga_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gb, gb_ref, rtol=1e-5, atol=1e-4)
    assert torch.count_nonzero(gb[1]) == 0


@dtypes
@pytest.mark.parametrize("counts, N", [([3, 0, 5, 2], 12), ([0, 4], 4)], ids=["tail", "no-tail"])
def test_grouped_mm_bias_matches_reference(counts, N, dtype, gen):
    """bias[e] is added to the rows of group e only: not to rows past offs[-1]."""
    E, K, M = len(counts), 4, 3
    offs = offs_from_counts(counts)
    a = randn(N, K, gen=gen, dtype=dtype, requires_grad=True)
    b = randn(E, K, M, gen=gen, dtype=dtype, requires_grad=True)
    bias = randn(E, M, gen=gen, dtype=dtype, requires_grad=True)
    out = moefast.grouped_mm(a, b, offs, bias)
    a_ref, b_ref, bias_ref = leaf(a), leaf(b), leaf(bias)
    out_ref = ref.grouped_mm(a_ref, b_ref, offs, bias_ref)
    assert out.dtype == dtype
    assert_close(out, out_ref)
    used = int(offs[-1])
    assert torch.count_nonzero(out[used:]) == 0
    g_out = randn(N, M, gen=gen, dtype=dtype)
    ga, gb, gbias = grads(out, [a, b, bias], g_out)
    ga_ref, gb_ref, gbias_ref = grads(out_ref, [a_ref, b_ref, bias_ref], g_out)
    assert_close(ga, ga_ref, grad=True)
    assert_close(gb, gb_ref, grad=True)
    assert_close(gbias, gbias_ref, grad=True)
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.count_nonzero(gbias[e]) == 0 and torch.count_nonzero(gb[e]) == 0


@dtypes
def test_grouped_bias_grad_raw_op(dtype, gen):
    counts, N, M = [2, 0, 4, 0], 8, 3
    offs = offs_from_counts(counts)
    g_out = randn(N, M, gen=gen, dtype=dtype)
    gbias = torch.ops.moefast.grouped_bias_grad(g_out, offs)
    assert gbias.shape == (len(counts), M) and gbias.dtype == dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    begin = 0
    for e, end in enumerate(offs.tolist()):
        assert_close(gbias[e], g_out[begin:end].to(acc).sum(0).to(dtype))
        begin = end


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_grouped_mm_autocast(dtype, gen):
    """Under torch.autocast, grouped_mm runs in the autocast dtype, like torch.matmul."""
    offs = offs_from_counts([3, 0, 4])
    a = randn(9, 5, gen=gen, requires_grad=True)
    b = randn(3, 5, 4, gen=gen, requires_grad=True)
    bias = randn(3, 4, gen=gen, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        out = moefast.grouped_mm(a, b, offs, bias)
        mixed = moefast.grouped_mm(a, b.to(dtype), offs)  # mixed dtypes are cast, not refused
    assert out.dtype == dtype and mixed.dtype == dtype
    assert_close(out, ref.grouped_mm(a.to(dtype), b.to(dtype), offs, bias.to(dtype)))
    assert_close(mixed, ref.grouped_mm(a.to(dtype), b.to(dtype), offs))
    ga, gb, gbias = grads(out, [a, b, bias], randn(9, 4, gen=gen, dtype=dtype))
    assert ga.dtype == gb.dtype == gbias.dtype == torch.float32
    assert torch.count_nonzero(ga[7:]) == 0 and torch.count_nonzero(gb[1]) == 0


# ----------------------------------------------------------------------------- swiglu


@dtypes
@pytest.mark.parametrize(
    "shape",
    [(7, 2 * 13), (3, 5, 2 * 8), (2 * 1,), (300, 2 * 67), (4, 2 * 1024)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_swiglu_matches_reference(shape, dtype, gen):
    """Widths that are and are not multiples of the 8-lane vector loop; leading shapes of any rank;
    gates large enough (scale 4) to reach both tails of the sigmoid."""
    h = randn(*shape, gen=gen, dtype=dtype, scale=4.0, requires_grad=True)
    out = moefast.swiglu(h)
    h_ref = leaf(h)
    out_ref = ref.swiglu(h_ref)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    assert_close(out, out_ref)
    g = randn(*out.shape, gen=gen, dtype=dtype)
    (gh,) = grads(out, [h], g)
    (gh_ref,) = grads(out_ref, [h_ref], g)
    assert_close(gh, gh_ref, grad=True)


@dtypes
def test_swiglu_backward_raw_op(dtype, gen):
    h = randn(9, 2 * 11, gen=gen, dtype=dtype, scale=3.0)
    g = randn(9, 11, gen=gen, dtype=dtype)
    h_ref = leaf(h)
    (expected,) = grads(ref.swiglu(h_ref), [h_ref], g)
    got = _ops.swiglu_backward(g, h)
    assert got.shape == h.shape and got.dtype == dtype
    assert_close(got, expected, grad=True)


def test_swiglu_extreme_gates():
    """Saturated sigmoid on both sides, zero, and non-finite values behave like torch's silu."""
    gate = torch.tensor([-200.0, -90.0, -88.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 88.0, 90.0, 200.0])
    gate = torch.cat([gate, torch.tensor([float("nan"), float("inf"), 3.0, -3.0, 1.0])])
    up = torch.linspace(-2.0, 2.0, gate.numel())
    for dtype in (torch.float32, torch.bfloat16):
        h = torch.cat([gate, up]).to(dtype).repeat(3, 1).requires_grad_(True)
        out = moefast.swiglu(h)
        h_ref = leaf(h)
        out_ref = ref.swiglu(h_ref)
        assert_close(out, out_ref)
        g = torch.ones_like(out)
        (gh,) = grads(out, [h], g)
        (gh_ref,) = grads(out_ref, [h_ref], g)
        finite = torch.isfinite(gh_ref)
        assert_close(gh[finite], gh_ref[finite], grad=True)
        assert torch.isnan(gh[:, gate.numel() - 5]).all()  # a NaN gate poisons its gradients


def test_swiglu_zero_rows_and_zero_width(gen):
    for shape in [(0, 8), (5, 0), (0, 0), (2, 0, 6)]:
        h = randn(*shape, gen=gen, requires_grad=True)
        out = moefast.swiglu(h)
        assert out.shape == (*shape[:-1], shape[-1] // 2)
        out.sum().backward()
        assert h.grad.shape == h.shape and not h.grad.isnan().any()


@pytest.mark.parametrize("how", ["transposed", "strided", "expanded"])
def test_swiglu_non_contiguous(how, gen):
    base = randn(12, 2 * 9, gen=gen, scale=2.0)
    if how == "transposed":
        h = randn(2 * 9, 12, gen=gen, scale=2.0).t()
    elif how == "strided":
        h = randn(12, 2 * 18, gen=gen, scale=2.0)[:, ::2]
    else:
        h = base[:1].expand(12, -1)
    assert not h.is_contiguous()
    h = h.requires_grad_(True) if h.is_leaf else h.detach().requires_grad_(True)
    out = moefast.swiglu(h)
    h_ref = leaf(h)
    out_ref = ref.swiglu(h_ref)
    assert_close(out, out_ref)
    g = randn(*out.shape, gen=gen)
    (gh,) = grads(out, [h], g)
    (gh_ref,) = grads(out_ref, [h_ref], g)
    assert_close(gh, gh_ref, grad=True)


def test_swiglu_larger_parallel(gen):
    """Enough rows for the kernel to split them over threads, forward and backward."""
    h = randn(4000, 2 * 40, gen=gen, scale=3.0, requires_grad=True)
    out = moefast.swiglu(h)
    h_ref = leaf(h)
    out_ref = ref.swiglu(h_ref)
    assert_close(out, out_ref)
    g = randn(*out.shape, gen=gen)
    assert_close(grads(out, [h], g)[0], grads(out_ref, [h_ref], g)[0], grad=True)


# ----------------------------------------------------------------------------- grouped_swiglu_mlp


def _mlp_inputs(counts, N, d, H, dtype, gen, bias=True):
    E = len(counts)
    x = randn(N, d, gen=gen, dtype=dtype, requires_grad=True)
    # Weights scaled by 1/sqrt(fan-in), as nn.Linear initialises them, so that every stage stays
    # O(1) and the dtype tolerances mean the same at any width.
    w1 = randn(E, d, 2 * H, gen=gen, dtype=dtype, scale=d**-0.5, requires_grad=True)
    w2 = randn(E, H, d, gen=gen, dtype=dtype, scale=H**-0.5, requires_grad=True)
    b1 = randn(E, 2 * H, gen=gen, dtype=dtype, requires_grad=True) if bias else None
    b2 = randn(E, d, gen=gen, dtype=dtype, requires_grad=True) if bias else None
    return x, w1, b1, w2, b2, offs_from_counts(counts)


def _check_mlp_against_reference(x, w1, b1, w2, b2, offs, gen):
    out = moefast.grouped_swiglu_mlp(x, w1, b1, w2, b2, offs)
    inputs = [t for t in (x, w1, b1, w2, b2) if t is not None]
    leaves = [leaf(t) for t in inputs]
    it = iter(leaves)
    refs = [next(it) if t is not None else None for t in (x, w1, b1, w2, b2)]
    out_ref = ref.grouped_swiglu_mlp(*refs, offs)
    assert out.shape == out_ref.shape and out.dtype == x.dtype
    assert_close(out, out_ref)
    used = int(offs[-1]) if offs.numel() else 0
    assert torch.count_nonzero(out[used:]) == 0  # rows past offs[-1] are zeros
    g = randn(*out.shape, gen=gen, dtype=x.dtype)
    got = grads(out, inputs, g)
    want = grads(out_ref, leaves, g)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert_close(a, b, grad=True)
    return got


@dtypes
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize(
    "counts, N",
    [([3, 0, 5, 2], 12), ([0, 9, 0], 9), ([0, 0], 3), ([0, 0, 0], 0), ([4, 4, 4], 12)],
    ids=["empty-expert+tail", "all-on-one", "no-rows-used", "zero-tokens", "even"],
)
def test_grouped_swiglu_mlp_matches_reference(counts, N, bias, dtype, gen):
    """Forward and every gradient against grouped_mm -> swiglu -> grouped_mm in plain PyTorch,
    with poisoned outputs: an expert with no rows, all rows on one expert, rows past offs[-1],
    zero tokens."""
    args = _mlp_inputs(counts, N, 5, 3, dtype, gen, bias=bias)
    got = _check_mlp_against_reference(*args, gen)
    gw1, gw2 = got[1], got[3 if bias else 2]
    for e, c in enumerate(counts):
        if c == 0:  # an expert with no rows gets zero weight gradients, not garbage
            assert torch.count_nonzero(gw1[e]) == 0 and torch.count_nonzero(gw2[e]) == 0
    if N:
        assert torch.count_nonzero(got[0][int(args[-1][-1]) :]) == 0  # tail rows: zero grad


def test_grouped_swiglu_mlp_equals_composition_on_cpu(gen):
    """The fused CPU op and the composition of the public ops give the same forward bits (same
    BLAS calls and SwiGLU rows) and the same gradients up to rounding."""
    for dtype in (torch.float32, torch.bfloat16):
        x, w1, b1, w2, b2, offs = _mlp_inputs([40, 0, 70, 13], 130, 24, 16, dtype, gen)
        fused = moefast.grouped_swiglu_mlp(x, w1, b1, w2, b2, offs)
        comp = moefast.grouped_mm(moefast.swiglu(moefast.grouped_mm(x, w1, offs, b1)), w2, offs, b2)
        assert torch.equal(fused, comp)
        g = randn(*fused.shape, gen=gen, dtype=dtype)
        got = grads(fused, [x, w1, b1, w2, b2], g)
        want = grads(comp, [x, w1, b1, w2, b2], g)
        for a, b in zip(got, want, strict=True):
            assert_close(a, b, grad=True)


@pytest.mark.parametrize("how", ["x-transposed", "weights-transposed", "grad-strided"])
def test_grouped_swiglu_mlp_non_contiguous(how, gen):
    counts, N, d, H = [5, 0, 6], 13, 7, 4
    x, w1, b1, w2, b2, offs = _mlp_inputs(counts, N, d, H, torch.float32, gen)
    if how == "x-transposed":
        x = randn(d, N, gen=gen).t().requires_grad_(True)
    elif how == "weights-transposed":
        w1 = randn(3, 2 * H, d, gen=gen).transpose(1, 2).requires_grad_(True)
        w2 = randn(3, d, H, gen=gen).transpose(1, 2).requires_grad_(True)
    out = moefast.grouped_swiglu_mlp(x, w1, b1, w2, b2, offs)
    leaves = [leaf(t) for t in (x, w1, b1, w2, b2)]
    out_ref = ref.grouped_swiglu_mlp(*leaves, offs)
    assert_close(out, out_ref)
    g = randn(N, 2 * d, gen=gen)[:, ::2] if how == "grad-strided" else randn(N, d, gen=gen)
    assert not g.is_contiguous() or how != "grad-strided"
    for a, b in zip(grads(out, [x, w1, b1, w2, b2], g), grads(out_ref, leaves, g), strict=True):
        assert_close(a, b, grad=True)


def test_grouped_swiglu_mlp_group_paths_and_scratch_reuse(gen):
    """Small groups run in parallel over experts (a scratch block per expert in flight), large
    ones one after the other; calls of growing and shrinking sizes and of another dtype reuse
    scratch blocks from the CPU output cache without stale values leaking into a result."""
    cases = [
        ([300, 0, 212, 90], 64, 48, torch.float32),  # sequential path
        ([3, 1, 0, 2, 5, 4, 1, 2], 6, 4, torch.float32),  # parallel path
        ([500, 20], 16, 8, torch.bfloat16),  # another dtype, bigger scratch
        ([2, 2], 4, 3, torch.float32),  # smaller again
    ]
    for counts, d, H, dtype in cases:
        N = sum(counts) + 3
        _check_mlp_against_reference(*_mlp_inputs(counts, N, d, H, dtype, gen), gen)


@dtypes
def test_grouped_swiglu_mlp_backward_raw_op(dtype, gen):
    """The raw backward op: grad_x only when asked for, bias gradients only with bias."""
    counts, d, H = [2, 0, 3], 4, 3
    x, w1, b1, w2, b2, offs = _mlp_inputs(counts, 6, d, H, dtype, gen)
    with torch.no_grad():
        _, h, act = _ops.grouped_swiglu_mlp(x, w1, b1, w2, b2, offs)
        assert_close(h, ref.grouped_mm(x, w1, offs, b1))
        assert_close(act, ref.swiglu(h))
        g = randn(6, d, gen=gen, dtype=dtype)
        full = _ops.grouped_swiglu_mlp_backward(g, x, w1, w2, offs, h, act, True, True)
        lean = _ops.grouped_swiglu_mlp_backward(g, x, w1, w2, offs, h, act, False, False)
    assert [tuple(t.shape) for t in full] == [(6, d), (3, d, 2 * H), (3, H, d), (3, 2 * H), (3, d)]
    assert [tuple(t.shape) for t in lean] == [(0, d), (3, d, 2 * H), (3, H, d), (0, 2 * H), (0, d)]
    assert torch.equal(full[1], lean[1]) and torch.equal(full[2], lean[2])
    assert_close(full[4], _group_sums(g, offs), grad=True)  # b2's gradient: row sums


def _group_sums(t, offs):
    begin, rows = 0, []
    for end in offs.tolist():
        rows.append(t[begin:end].double().sum(0))
        begin = end
    return torch.stack(rows).to(t.dtype)


# ----------------------------------------------------------------------------- mixture


@dtypes
@pytest.mark.parametrize("B, E, C", [(7, 4, 5), (3, 1, 6), (5, 9, 1)])
def test_mixture_matches_reference(B, E, C, dtype, gen):
    gate = randn(B, E, gen=gen, dtype=dtype, scale=2.0, requires_grad=True)
    expert_out = randn(E, B, C, gen=gen, dtype=dtype, requires_grad=True)
    out = moefast.mixture(gate, expert_out)
    gate_ref, eo_ref = leaf(gate), leaf(expert_out)
    out_ref = ref.mixture(gate_ref, eo_ref)
    assert out.shape == (B, C) and out.dtype == dtype
    assert_close(out, out_ref)
    g_out = randn(B, C, gen=gen, dtype=dtype)
    gg, ge = grads(out, [gate, expert_out], g_out)
    gg_ref, ge_ref = grads(out_ref, [gate_ref, eo_ref], g_out)
    assert_close(gg, gg_ref, grad=True)
    assert_close(ge, ge_ref, grad=True)


def test_mixture_larger_parallel(gen):
    """Enough rows for the fused kernel to split them over threads."""
    B, E, C = 3000, 4, 8
    gate = randn(B, E, gen=gen, scale=2.0, requires_grad=True)
    eo = randn(E, B, C, gen=gen, requires_grad=True)
    out = moefast.mixture(gate, eo)
    gate_ref, eo_ref = leaf(gate), leaf(eo)
    out_ref = ref.mixture(gate_ref, eo_ref)
    assert_close(out, out_ref)
    g = randn(B, C, gen=gen)
    for got, exp in zip(
        grads(out, [gate, eo], g), grads(out_ref, [gate_ref, eo_ref], g), strict=True
    ):
        assert_close(got, exp, grad=True)


# ----------------------------------------------------------------------------- pipeline


PIPELINE_MODES = [
    ("softmax_topk", False, 2),
    ("softmax_topk", True, 2),
    ("topk_softmax", False, 2),
    ("hard", False, 1),
    ("dense", False, 4),
]


def _check_pipeline(T, E, k, d, h, mode, normalize, dtype, gen, logits=None):
    x = randn(T, d, gen=gen, dtype=dtype, requires_grad=True)
    if logits is None:
        logits = distinct_logits(T, E, gen=gen, dtype=dtype, requires_grad=True)
    b = randn(E, d, h, gen=gen, dtype=dtype, scale=0.5, requires_grad=True)
    out, routing = moefast_pipeline(x, logits, b, k, mode, normalize)
    loss = moefast.load_balancing_loss(logits, routing)
    x_ref, logits_ref, b_ref = leaf(x), leaf(logits), leaf(b)
    out_ref, ids_ref = reference_pipeline(x_ref, logits_ref, b_ref, k, mode, normalize)
    loss_ref = ref.load_balancing_loss(logits_ref, ids_ref)
    assert torch.equal(routing.expert_ids, ids_ref)
    assert out.shape == (T, h) and out.dtype == dtype
    assert_close(out, out_ref)
    assert_close(loss, loss_ref, dtype)
    g_out = randn(T, h, gen=gen, dtype=dtype)
    g_loss = torch.tensor(0.7, dtype=loss.dtype)
    got = grads((out, loss), [x, logits, b], (g_out, g_loss))
    expected = grads((out_ref, loss_ref), [x_ref, logits_ref, b_ref], (g_out, g_loss))
    for name, g, g_ref in zip(("x", "logits", "b"), got, expected, strict=True):
        assert_close(g, g_ref, grad=True, msg=lambda m, name=name: f"grad of {name}: {m}")
    return routing, got


@dtypes
@pytest.mark.parametrize("mode, normalize, k", PIPELINE_MODES, ids=lambda v: str(v))
def test_pipeline_matches_reference(mode, normalize, k, dtype, gen):
    _check_pipeline(T=14, E=4, k=k, d=8, h=6, mode=mode, normalize=normalize, dtype=dtype, gen=gen)


@pytest.mark.no_poison
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_pipeline_matches_reference_without_poison(dtype, gen):
    _check_pipeline(14, 4, 2, 8, 6, "softmax_topk", True, dtype, gen)


def test_pipeline_larger_parallel(gen):
    """Enough tokens for the kernels to split work over threads."""
    _check_pipeline(2000, 8, 2, 32, 16, "softmax_topk", False, torch.float32, gen)


# ----------------------------------------------------------------------------- edge cases


def test_pipeline_expert_with_no_tokens(gen):
    T, E, k = 12, 5, 2
    logits = distinct_logits(T, E, gen=gen)
    logits[:, 1] -= 50.0
    logits.requires_grad_(True)
    routing, (_gx, _gl, gb) = _check_pipeline(
        T, E, k, 4, 3, "softmax_topk", False, torch.float32, gen, logits=logits
    )
    assert routing.counts[1] == 0
    assert torch.count_nonzero(gb[1]) == 0
    assert all(torch.count_nonzero(gb[e]) > 0 for e in (0, 2, 3, 4))


def test_pipeline_all_tokens_on_one_expert(gen):
    T, E = 10, 4
    logits = randn(T, E, gen=gen, scale=0.1)
    logits[:, 2] += 20.0
    logits.requires_grad_(True)
    routing, (_gx, _gl, gb) = _check_pipeline(
        T, E, 1, 5, 3, "softmax_topk", False, torch.float32, gen, logits=logits
    )
    assert routing.counts.tolist() == [0, 0, T, 0]
    assert [int(torch.count_nonzero(gb[e])) > 0 for e in range(E)] == [False, False, True, False]


@pytest.mark.parametrize("mode", ["softmax_topk", "topk_softmax", "dense"])
def test_pipeline_k_equals_E(mode, gen):
    routing, _ = _check_pipeline(9, 3, 3, 4, 5, mode, False, torch.float32, gen)
    assert routing.counts.tolist() == [9, 9, 9]


@pytest.mark.parametrize("mode", ["softmax_topk", "hard", "dense"])
def test_pipeline_single_expert(mode, gen):
    routing, (_gx, gl, _gb) = _check_pipeline(8, 1, 1, 4, 3, mode, False, torch.float32, gen)
    assert routing.offs.tolist() == [8]
    # With one expert the weight is always 1: only the balance loss's softmax (constant) is left.
    assert torch.count_nonzero(gl) == 0


@dtypes
def test_zero_tokens(dtype, gen):
    """T = 0 through every op, forward and backward: empty outputs of the right shape."""
    E, k, d, h = 4, 2, 5, 3
    logits = torch.empty(0, E, dtype=dtype, requires_grad=True)
    x = torch.empty(0, d, dtype=dtype, requires_grad=True)
    b = randn(E, d, h, gen=gen, dtype=dtype, requires_grad=True)
    routing = moefast.route(logits, k)
    assert routing.expert_ids.shape == (0, k) and routing.weights.shape == (0, k)
    assert routing.counts.tolist() == [0] * E and routing.offs.tolist() == [0] * E
    assert routing.position.shape == (0, k) and routing.order.shape == (0,)
    xp = moefast.permute(x, routing)
    assert xp.shape == (0, d)
    y = moefast.grouped_mm(xp, b, routing.offs)
    assert y.shape == (0, h)
    out = moefast.unpermute(y, routing)
    assert out.shape == (0, h) and out.dtype == dtype
    gx, gl, gb = grads(out, [x, logits, b], torch.empty(0, h, dtype=dtype))
    assert gx.shape == (0, d) and gl.shape == (0, E)
    assert gb.shape == (E, d, h) and torch.count_nonzero(gb) == 0

    gate = torch.empty(0, E, dtype=dtype, requires_grad=True)
    expert_out = torch.empty(E, 0, h, dtype=dtype, requires_grad=True)
    mix = moefast.mixture(gate, expert_out)
    assert mix.shape == (0, h) and mix.dtype == dtype
    gg, ge = grads(mix, [gate, expert_out], torch.empty(0, h, dtype=dtype))
    assert gg.shape == (0, E) and ge.shape == (E, 0, h)

    for mode, kk in [("topk_softmax", 2), ("hard", 1), ("dense", E)]:
        r = moefast.route(logits, kk, mode=mode)
        assert r.weights.shape == (0, kk) and r.counts.tolist() == [0] * E


def test_grouped_mm_zero_rows_many_experts(gen):
    a = torch.empty(0, 3, requires_grad=True)
    b = randn(5, 3, 2, gen=gen, requires_grad=True)
    out = moefast.grouped_mm(a, b, torch.zeros(5, dtype=torch.int32))
    assert out.shape == (0, 2)
    ga, gb = grads(out, [a, b], torch.empty(0, 2))
    assert ga.shape == (0, 3)
    assert torch.equal(gb, torch.zeros(5, 3, 2))


# ----------------------------------------------------------------------------- non-contiguous


def _strided(t: torch.Tensor, how: str) -> torch.Tensor:
    """A non-contiguous view with the values of ``t`` (2-D: transposed or every other column)."""
    if how == "transposed":
        v = t.detach().T.contiguous().T
    else:
        wide = torch.empty(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
        wide[:, ::2] = t.detach()
        wide[:, 1::2] = float("nan")
        v = wide[:, ::2]
    assert not v.is_contiguous() and torch.equal(v, t.detach())
    return v.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("how", ["transposed", "strided"])
@pytest.mark.parametrize("mode, k", [("softmax_topk", 2), ("topk_softmax", 2), ("dense", 5)])
def test_route_non_contiguous_logits(mode, k, how, gen):
    logits = distinct_logits(9, 5, gen=gen, requires_grad=True)
    logits_nc = _strided(logits, how)
    r = moefast.route(logits, k, mode=mode, normalize=True)
    r_nc = moefast.route(logits_nc, k, mode=mode, normalize=True)
    for field in r._fields:
        assert torch.equal(getattr(r, field), getattr(r_nc, field)), field
    g_w = randn(9, k, gen=gen)
    g_w_nc = _strided(g_w, how)  # a non-contiguous incoming gradient, too
    assert torch.equal(
        grads(r.weights, [logits], g_w)[0], grads(r_nc.weights, [logits_nc], g_w_nc)[0]
    )


@pytest.mark.parametrize("how", ["transposed", "strided"])
def test_permute_unpermute_non_contiguous(how, gen):
    T, k, E, d = 10, 2, 4, 6
    routing = moefast.routing_from_ids(random_ids(T, k, E, gen=gen), E)
    x = randn(T, d, gen=gen, requires_grad=True)
    x_nc = _strided(x, how)
    g_p = randn(T * k, d, gen=gen)
    out, out_nc = moefast.permute(x, routing), moefast.permute(x_nc, routing)
    assert torch.equal(out, out_nc)
    assert torch.equal(grads(out, [x], g_p)[0], grads(out_nc, [x_nc], _strided(g_p, how))[0])

    y = randn(T * k, d, gen=gen, requires_grad=True)
    w = randn(T, k, gen=gen, requires_grad=True)
    y_nc, w_nc = _strided(y, how), _strided(w, how)
    u, u_nc = moefast.unpermute(y, routing, w), moefast.unpermute(y_nc, routing, w_nc)
    assert torch.equal(u, u_nc)
    g_u = randn(T, d, gen=gen)
    gy, gw = grads(u, [y, w], g_u)
    gy_nc, gw_nc = grads(u_nc, [y_nc, w_nc], _strided(g_u, how))
    assert torch.equal(gy, gy_nc)
    assert torch.equal(gw, gw_nc)


@pytest.mark.parametrize("which", ["a", "b", "both", "grad_out"])
def test_grouped_mm_non_contiguous(which, gen):
    counts, N, K, M = [3, 0, 4], 9, 5, 6
    offs = offs_from_counts(counts)
    a = randn(N, K, gen=gen, requires_grad=True)
    b = randn(3, K, M, gen=gen, requires_grad=True)
    a_nc, b_nc = a, b
    if which in ("a", "both"):
        a_nc = _strided(a, "transposed")
    if which in ("b", "both"):
        b_nc = b.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
        assert not b_nc.is_contiguous() and torch.equal(b_nc, b)
    out, out_nc = moefast.grouped_mm(a, b, offs), moefast.grouped_mm(a_nc, b_nc, offs)
    assert_close(out_nc, out)
    assert_close(out_nc, ref.grouped_mm(a.detach(), b.detach(), offs))
    g = randn(N, M, gen=gen)
    g_nc = _strided(g, "strided") if which == "grad_out" else g
    ga, gb = grads(out, [a, b], g)
    ga_nc, gb_nc = grads(out_nc, [a_nc, b_nc], g_nc)
    assert_close(ga_nc, ga)
    assert_close(gb_nc, gb)
    assert torch.count_nonzero(out_nc[7:]) == 0 and torch.count_nonzero(gb_nc[1]) == 0


def test_grouped_mm_b_as_transposed_weight(gen):
    """b given as the transpose of an [E, M, K] tensor (as nn.Linear stores weights)."""
    offs = offs_from_counts([2, 5, 1])
    a = randn(8, 4, gen=gen)
    w = randn(3, 6, 4, gen=gen)  # [E, M, K]
    out = moefast.grouped_mm(a, w.transpose(1, 2), offs)
    assert_close(out, ref.grouped_mm(a, w.transpose(1, 2).contiguous(), offs))


@pytest.mark.parametrize("which", ["gate", "expert_out", "both", "grad_out"])
def test_mixture_non_contiguous(which, gen):
    B, E, C = 6, 3, 5
    gate = randn(B, E, gen=gen, requires_grad=True)
    eo = randn(E, B, C, gen=gen, requires_grad=True)
    gate_nc, eo_nc = gate, eo
    if which in ("gate", "both"):
        gate_nc = _strided(gate, "transposed")
    if which in ("expert_out", "both"):
        eo_nc = eo.detach().permute(1, 0, 2).contiguous().permute(1, 0, 2).requires_grad_(True)
        assert not eo_nc.is_contiguous() and torch.equal(eo_nc, eo)
    out, out_nc = moefast.mixture(gate, eo), moefast.mixture(gate_nc, eo_nc)
    assert torch.equal(out, out_nc)
    g = randn(B, C, gen=gen)
    g_nc = _strided(g, "transposed") if which == "grad_out" else g
    gg, ge = grads(out, [gate, eo], g)
    gg_nc, ge_nc = grads(out_nc, [gate_nc, eo_nc], g_nc)
    assert torch.equal(gg, gg_nc)
    assert torch.equal(ge, ge_nc)


def test_pipeline_non_contiguous_inputs(gen):
    T, E, k, d, h = 11, 4, 2, 6, 5
    x = randn(T, d, gen=gen, requires_grad=True)
    logits = distinct_logits(T, E, gen=gen, requires_grad=True)
    b = randn(E, d, h, gen=gen, requires_grad=True)
    x_nc, logits_nc = _strided(x, "transposed"), _strided(logits, "strided")
    b_nc = b.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    out, _ = moefast_pipeline(x, logits, b, k)
    out_nc, _ = moefast_pipeline(x_nc, logits_nc, b_nc, k)
    assert_close(out_nc, out)
    g = randn(T, h, gen=gen)
    for g1, g2 in zip(
        grads(out, [x, logits, b], g), grads(out_nc, [x_nc, logits_nc, b_nc], g), strict=True
    ):
        assert_close(g2, g1)


def test_routing_from_non_contiguous_ids(gen):
    ids = random_ids(13, 3, 5, gen=gen)
    ids_nc = ids.T.contiguous().T
    assert not ids_nc.is_contiguous()
    r, r_nc = moefast.routing_from_ids(ids, 5), moefast.routing_from_ids(ids_nc, 5)
    for field in r._fields:
        assert torch.equal(getattr(r, field), getattr(r_nc, field)), field


def test_meta_device_shapes():
    """On the meta device (shape inference, deferred init) every op returns the right shapes."""
    T, E, k, d, h = 6, 4, 2, 5, 3
    meta = torch.device("meta")
    routing = moefast.route(torch.empty(T, E, device=meta), k)
    assert routing.expert_ids.shape == (T, k) and routing.offs.shape == (E,)
    assert routing.expert_ids.device == meta
    xp = moefast.permute(torch.empty(T, d, device=meta), routing)
    assert xp.shape == (T * k, d) and xp.device == meta
    y = moefast.grouped_mm(xp, torch.empty(E, d, h, device=meta), routing.offs)
    assert y.shape == (T * k, h) and y.device == meta
    out = moefast.unpermute(y, routing)
    assert out.shape == (T, h) and out.device == meta
    mix = moefast.mixture(torch.empty(T, E, device=meta), torch.empty(E, T, h, device=meta))
    assert mix.shape == (T, h) and mix.device == meta


def test_backward_ops_non_contiguous_inputs(gen):
    """The raw backward ops give the same results on strided views as on contiguous copies."""

    def t(*shape):  # a transposed (non-contiguous) view of fresh values
        v = randn(*reversed(shape), gen=gen).T
        assert not v.is_contiguous()
        return v

    def same(fn, *args):
        expected = fn(*[x.contiguous() if isinstance(x, torch.Tensor) else x for x in args])
        got = fn(*args)
        for g, e in zip(
            got if isinstance(got, tuple) else (got,),
            expected if isinstance(expected, tuple) else (expected,),
            strict=True,
        ):
            assert_close(g, e)

    offs = torch.tensor([3, 99, 3, 99, 8, 99], dtype=torch.int32)[::2]  # strided offs [3, 3, 8]
    same(_ops.grouped_mm, t(10, 4), randn(3, 4, 5, gen=gen), offs)
    same(_ops.grouped_mm, t(10, 4), randn(3, 4, 5, gen=gen), offs, t(3, 5))
    same(_ops.grouped_mm_weight_grad, t(10, 4), t(10, 5), offs)
    same(_ops.grouped_bias_grad, t(10, 5), offs)
    routing = moefast.routing_from_ids(random_ids(6, 2, 3, gen=gen), 3)
    position = routing.position.T.contiguous().T
    same(_ops.unpermute_weight_grad, t(6, 4), t(12, 4), position)
    same(_ops.unpermute, t(12, 4), position, t(6, 2))
    same(_ops.permute, t(6, 4), position, t(6, 2))
    same(
        _ops.mixture_backward,
        t(6, 2),
        t(6, 3),
        randn(3, 6, 2, gen=gen).transpose(0, 1).contiguous().transpose(0, 1),
    )
    logits = distinct_logits(6, 4, gen=gen).T.contiguous().T
    _w, ids = _ops.router(logits, 2, "softmax_topk", True)
    ids_nc = torch.stack([ids[:, 0], ids[:, 0], ids[:, 1]], 1)[:, ::2]
    same(_ops.router_backward, t(6, 2), logits, ids_nc, "softmax_topk", True)
    same(_ops.router_backward, t(6, 2), logits, ids_nc, "topk_softmax", False)
