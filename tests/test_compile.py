"""torch.compile(fullgraph=True) of moefast code gives the eager outputs and gradients.

Most tests use the "aot_eager" backend (traces through the fake kernels and AOTAutograd, fast to
compile); one test uses the default "inductor" backend, which takes tens of seconds on a CPU.
"""

from __future__ import annotations

import pytest
import torch
from moefast_testing import assert_close, distinct_logits, grads, leaf, randn, random_ids

import moefast

T, E, K, D, H = 12, 4, 2, 6, 5

# torch's own compile machinery still calls torch.jit.script_method internally.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")


def pipeline(x, logits, b, bias=None, mode="softmax_topk", k=K):
    routing = moefast.route(logits, k, mode=mode, normalize=True)
    xp = moefast.permute(x, routing)
    y = moefast.grouped_mm(xp, b, routing.offs, bias)
    out = moefast.unpermute(y, routing)
    return out, moefast.load_balancing_loss(logits, routing) + 0.1 * moefast.z_loss(logits)


def _inputs(gen, t=T, dtype=torch.float32):
    x = randn(t, D, gen=gen, dtype=dtype, requires_grad=True)
    logits = distinct_logits(t, E, gen=gen, dtype=dtype, requires_grad=True)
    b = randn(E, D, H, gen=gen, dtype=dtype, scale=0.5, requires_grad=True)
    return x, logits, b


def _compare(fn, compiled, inputs, gen, *, dtype=torch.float32):
    """Outputs and gradients of ``compiled`` match those of ``fn`` (run eagerly)."""
    eager_inputs = [leaf(t) for t in inputs]
    out_c = compiled(*inputs)
    out_e = fn(*eager_inputs)
    assert len(out_c) == len(out_e)
    for c, e in zip(out_c, out_e, strict=True):
        assert_close(c, e, dtype)
    g_out = [randn(*o.shape, gen=gen, dtype=o.dtype) for o in out_e]
    for gc, ge in zip(grads(out_c, inputs, g_out), grads(out_e, eager_inputs, g_out), strict=True):
        assert_close(gc, ge, dtype, grad=True)


@pytest.mark.parametrize(
    "mode, k", [("softmax_topk", 2), ("topk_softmax", 2), ("hard", 1), ("dense", E)]
)
def test_compile_pipeline_aot_eager(mode, k, gen):
    def fn(x, logits, b):
        return pipeline(x, logits, b, mode=mode, k=k)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    _compare(fn, compiled, _inputs(gen), gen)


def test_compile_pipeline_bias_aot_eager(gen):
    compiled = torch.compile(pipeline, fullgraph=True, backend="aot_eager")
    inputs = (*_inputs(gen), randn(E, H, gen=gen, requires_grad=True))
    _compare(pipeline, compiled, inputs, gen)


def test_compile_pipeline_dynamic_shapes(gen):
    """One compiled graph with a symbolic token count serves different T."""
    torch._dynamo.reset()

    def fn(x, logits, b):
        return pipeline(x, logits, b)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    for t in (9, 17, 30):
        _compare(fn, compiled, _inputs(gen, t), gen)


@pytest.mark.slow
def test_compile_pipeline_inductor(gen):
    """The default backend (inductor) generates C++ for the glue around the custom ops."""
    torch._dynamo.reset()

    def fn(x, logits, b):
        return pipeline(x, logits, b)

    compiled = torch.compile(fn, fullgraph=True)
    _compare(fn, compiled, _inputs(gen), gen)


def test_compile_mixture(gen):
    def fn(gate, eo):
        return (torch.tanh(moefast.mixture(gate, eo)),)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    gate = randn(7, E, gen=gen, requires_grad=True)
    eo = randn(E, 7, H, gen=gen, requires_grad=True)
    _compare(fn, compiled, (gate, eo), gen)


def test_compile_unpermute_explicit_weights(gen):
    """Weight gradients of unpermute (and of the raw permute's weights) under AOTAutograd."""
    routing = moefast.routing_from_ids(random_ids(T, K, E, gen=gen), E)

    def fn(x, y, w):
        p = torch.ops.moefast.permute(x, routing.position, w)
        return (moefast.unpermute(y, routing, w), p)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x = randn(T, D, gen=gen, requires_grad=True)
    y = randn(T * K, D, gen=gen, requires_grad=True)
    w = randn(T, K, gen=gen, requires_grad=True)
    _compare(fn, compiled, (x, y, w), gen)


def test_compile_returns_routing(gen):
    """A Routing made inside a compiled function comes out as a Routing with the eager values."""

    def fn(logits, ids):
        return moefast.route(logits, K), moefast.routing_from_ids(ids, E)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    logits = distinct_logits(T, E, gen=gen)
    ids = random_ids(T, 3, E, gen=gen)
    for got, expected in zip(compiled(logits, ids), fn(logits, ids), strict=True):
        assert isinstance(got, moefast.Routing)
        assert got._fields == expected._fields
        for field in expected._fields:
            g, e = getattr(got, field), getattr(expected, field)
            assert g.dtype == e.dtype, field
            assert_close(g, e, msg=field)


def test_compile_routing_as_input(gen):
    """A Routing passed into a compiled function (a pytree of tensors) works as in eager."""
    routing = moefast.route(distinct_logits(T, E, gen=gen), K)

    def fn(x, routing):
        return (moefast.unpermute(moefast.permute(x, routing) * 2.0, routing),)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x = randn(T, D, gen=gen, requires_grad=True)
    _compare(lambda x_: fn(x_, routing), lambda x_: compiled(x_, routing), (x,), gen)


def test_compile_apply_capacity(gen):
    def fn(x, logits, b):
        routing = moefast.apply_capacity(moefast.route(logits, K), 4)
        y = moefast.grouped_mm(moefast.permute(x, routing), b, routing.offs)
        return (moefast.unpermute(y, routing),)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    _compare(fn, compiled, _inputs(gen), gen)
