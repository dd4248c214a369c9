"""torch.autograd.gradcheck, in float64 on tiny inputs, for every differentiable moefast op.

Router logits come from ``distinct_logits`` (values well apart), so gradcheck's finite differences
never cross a top-k boundary (top-k is piecewise constant in the logits).
"""

from __future__ import annotations

import pytest
import torch
from moefast_testing import distinct_logits, offs_from_counts, randn, random_ids

import moefast

f64 = torch.float64
_ops = torch.ops.moefast


def _gradcheck(fn, inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(
    "mode, normalize, k",
    [
        ("softmax_topk", False, 2),
        ("softmax_topk", True, 2),
        ("softmax_topk", True, 1),
        ("softmax_topk", False, 4),
        ("topk_softmax", False, 2),
        ("topk_softmax", False, 4),
        ("dense", False, 4),
    ],
)
def test_gradcheck_route(mode, normalize, k, gen):
    logits = distinct_logits(5, 4, gen=gen, dtype=f64, requires_grad=True)
    _gradcheck(lambda lg: moefast.route(lg, k, mode=mode, normalize=normalize).weights, (logits,))


def test_gradcheck_route_large_k(gen):
    """k > 16: the kernel's partial_sort path."""
    logits = distinct_logits(2, 20, gen=gen, dtype=f64, requires_grad=True)
    _gradcheck(lambda lg: moefast.route(lg, 17, normalize=True).weights, (logits,))


def test_gradcheck_permute(gen):
    routing = moefast.routing_from_ids(random_ids(5, 2, 3, gen=gen), 3)
    x = randn(5, 3, gen=gen, dtype=f64, requires_grad=True)
    _gradcheck(lambda x_: moefast.permute(x_, routing), (x,))


def test_gradcheck_permute_raw_with_weights(gen):
    routing = moefast.routing_from_ids(random_ids(5, 2, 3, gen=gen), 3)
    x = randn(5, 3, gen=gen, dtype=f64, requires_grad=True)
    w = randn(5, 2, gen=gen, dtype=f64, requires_grad=True)
    _gradcheck(lambda x_, w_: _ops.permute(x_, routing.position, w_), (x, w))


def test_gradcheck_unpermute_explicit_weights(gen):
    routing = moefast.routing_from_ids(random_ids(5, 2, 3, gen=gen), 3)
    y = randn(10, 3, gen=gen, dtype=f64, requires_grad=True)
    w = randn(5, 2, gen=gen, dtype=f64, requires_grad=True)
    _gradcheck(lambda y_, w_: moefast.unpermute(y_, routing, w_), (y, w))


@pytest.mark.parametrize("mode, k", [("softmax_topk", 2), ("topk_softmax", 2), ("dense", 3)])
def test_gradcheck_unpermute_through_routing_weights(mode, k, gen):
    """Gradients through routing.weights on to the router logits."""
    logits = distinct_logits(4, 3, gen=gen, dtype=f64, requires_grad=True)
    y = randn(4 * k, 2, gen=gen, dtype=f64, requires_grad=True)

    def fn(lg, y_):
        return moefast.unpermute(y_, moefast.route(lg, k, mode=mode, normalize=True))

    _gradcheck(fn, (logits, y))


def test_gradcheck_unpermute_raw_without_weights(gen):
    routing = moefast.routing_from_ids(random_ids(4, 2, 3, gen=gen), 3)
    y = randn(8, 3, gen=gen, dtype=f64, requires_grad=True)
    _gradcheck(lambda y_: _ops.unpermute(y_, routing.position, None), (y,))


@pytest.mark.parametrize("counts, N", [([2, 0, 3], 7), ([4], 4)])
def test_gradcheck_grouped_mm(counts, N, gen):
    offs = offs_from_counts(counts)
    a = randn(N, 3, gen=gen, dtype=f64, requires_grad=True)
    b = randn(len(counts), 3, 2, gen=gen, dtype=f64, requires_grad=True)
    _gradcheck(lambda a_, b_: moefast.grouped_mm(a_, b_, offs), (a, b))


def test_gradcheck_grouped_mm_bias(gen):
    offs = offs_from_counts([2, 0, 3])
    a = randn(6, 3, gen=gen, dtype=f64, requires_grad=True)
    b = randn(3, 3, 2, gen=gen, dtype=f64, requires_grad=True)
    bias = randn(3, 2, gen=gen, dtype=f64, requires_grad=True)
    _gradcheck(lambda a_, b_, c_: moefast.grouped_mm(a_, b_, offs, c_), (a, b, bias))


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "swiglu"])
def test_gradcheck_grouped_mm_act(activation, gen):
    offs = offs_from_counts([2, 0, 3])
    a = randn(6, 3, gen=gen, dtype=f64, requires_grad=True)
    b = randn(3, 3, 4, gen=gen, dtype=f64, requires_grad=True)
    bias = randn(3, 4, gen=gen, dtype=f64, requires_grad=True)
    _gradcheck(
        lambda a_, b_, c_: moefast.grouped_mm_act(a_, b_, offs, c_, activation), (a, b, bias)
    )


@pytest.mark.parametrize("shape", [(5, 2 * 3), (2, 3, 2 * 9)])
def test_gradcheck_swiglu(shape, gen):
    h = randn(*shape, gen=gen, dtype=f64, requires_grad=True, scale=2.0)
    _gradcheck(moefast.swiglu, (h,))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_gradcheck_grouped_swiglu_mlp(bias, gen):
    """Derivatives of the fused CPU expert MLP against finite differences (an empty expert, a
    tail row)."""
    offs = offs_from_counts([2, 0, 3])
    x = randn(6, 3, gen=gen, dtype=f64, requires_grad=True)
    w1 = randn(3, 3, 4, gen=gen, dtype=f64, requires_grad=True)
    w2 = randn(3, 2, 3, gen=gen, dtype=f64, requires_grad=True)
    if bias:
        b1 = randn(3, 4, gen=gen, dtype=f64, requires_grad=True)
        b2 = randn(3, 3, gen=gen, dtype=f64, requires_grad=True)
        _gradcheck(
            lambda x_, w1_, b1_, w2_, b2_: moefast.grouped_swiglu_mlp(x_, w1_, b1_, w2_, b2_, offs),
            (x, w1, b1, w2, b2),
        )
    else:
        _gradcheck(
            lambda x_, w1_, w2_: moefast.grouped_swiglu_mlp(x_, w1_, None, w2_, None, offs),
            (x, w1, w2),
        )


def test_gradcheck_mixture(gen):
    gate = randn(3, 4, gen=gen, dtype=f64, requires_grad=True)
    eo = randn(4, 3, 2, gen=gen, dtype=f64, requires_grad=True)
    _gradcheck(moefast.mixture, (gate, eo))


@pytest.mark.parametrize(
    "mode, normalize, k",
    [("softmax_topk", True, 2), ("topk_softmax", False, 2), ("dense", False, 3)],
)
def test_gradcheck_pipeline(mode, normalize, k, gen):
    T, E, d, h = 5, 3, 3, 2
    x = randn(T, d, gen=gen, dtype=f64, requires_grad=True)
    logits = distinct_logits(T, E, gen=gen, dtype=f64, requires_grad=True)
    b = randn(E, d, h, gen=gen, dtype=f64, requires_grad=True)

    def fn(x_, lg, b_):
        routing = moefast.route(lg, k, mode=mode, normalize=normalize)
        y = moefast.grouped_mm(moefast.permute(x_, routing), b_, routing.offs)
        return moefast.unpermute(y, routing), moefast.load_balancing_loss(lg, routing)

    _gradcheck(fn, (x, logits, b))


def test_gradcheck_load_balancing_loss(gen):
    logits = distinct_logits(6, 4, gen=gen, dtype=f64, requires_grad=True)
    _gradcheck(lambda lg: moefast.load_balancing_loss(lg, moefast.route(lg, 2)), (logits,))


def test_gradcheck_z_loss(gen):
    logits = randn(5, 4, gen=gen, dtype=f64, scale=2.0, requires_grad=True)
    _gradcheck(moefast.z_loss, (logits,))
