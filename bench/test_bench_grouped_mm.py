"""Grouped GEMM benchmarks: ``grouped_mm`` forward, and backward (data and weight gradients).

``a [T * k, d]`` (tokens permuted by the routing) times ``b [E, d, h]``, grouped by ``offs``: the
first GEMM of an expert MLP. Baselines: ``moefast.reference.grouped_mm``, one ``torch.matmul`` per
expert (``loop``), PyTorch's ``grouped_mm`` where it runs on CPU (``torch_grouped_mm``), and as the
``limit`` one dense ``torch.matmul`` ``[T * k, d] @ [d, h]`` with the same FLOPs.

The backward benches build the graph untimed (``setup``) and time ``torch.autograd.grad`` of the
output for ``a`` and ``b`` together, with a fixed, contiguous output gradient.
"""

import pytest
import torch
from bench_baselines import loop_grouped_mm, torch_grouped_mm, torch_grouped_mm_unavailable
from bench_cases import (
    DTYPES,
    ROUTINGS,
    SHAPES,
    VARIANTS_ORDER,
    assert_close,
    dispatch_data,
    expected,
    group_name,
    params,
)

import moefast
from moefast import reference


def forward_fns():
    """``variant -> f(a, b, offs)``; the ``limit`` multiplies by ``b[0]`` only."""
    return {
        "moefast": moefast.grouped_mm,
        "reference": reference.grouped_mm,
        "loop": loop_grouped_mm,
        "torch_grouped_mm": torch_grouped_mm,
        "limit": lambda a, b, offs: a @ b[0],
    }


def skip_if_unavailable(variant, dtype):
    if variant == "torch_grouped_mm":
        why = torch_grouped_mm_unavailable(dtype)
        if why:
            pytest.skip(why)


@pytest.mark.parametrize(
    "shape_name,dtype_name,routing,variant",
    params(SHAPES, DTYPES, ROUTINGS, variants=VARIANTS_ORDER),
)
def test_grouped_mm_forward(bench, shape_name, dtype_name, routing, variant):
    skip_if_unavailable(variant, DTYPES[dtype_name])
    data = dispatch_data(shape_name, dtype_name, routing)
    s, a, b, offs = data.shape, data.a, data.b, data.routing.offs
    fns = forward_fns()
    group = group_name("grouped_mm fwd", s.label, dtype_name, routing)
    want = expected(group, lambda: fns["moefast"](a, b, offs))

    def check(out):
        if variant != "limit":
            assert_close(out, want, a.dtype)

    bench(
        lambda: fns[variant](a, b, offs),
        group=group,
        variant=variant,
        check=check,
        info=dict(op="grouped_mm", phase="forward", dtype=dtype_name, routing=routing, **s.info),
    )


@pytest.mark.parametrize(
    "shape_name,dtype_name,routing,variant",
    params(SHAPES, DTYPES, ROUTINGS, variants=VARIANTS_ORDER),
)
def test_grouped_mm_backward(bench, shape_name, dtype_name, routing, variant):
    skip_if_unavailable(variant, DTYPES[dtype_name])
    data = dispatch_data(shape_name, dtype_name, routing)
    s, offs, grad = data.shape, data.routing.offs, data.grad_mm
    fns = forward_fns()

    def setup_for(name):
        def setup():
            a = data.a.detach().requires_grad_()
            b = data.b.detach().requires_grad_()
            return fns[name](a, b, offs), a, b

        return setup

    def backward(out, a, b):
        return torch.autograd.grad(out, (a, b), grad)

    group = group_name("grouped_mm bwd", s.label, dtype_name, routing)
    want = expected(group, lambda: backward(*setup_for("moefast")()))

    def check(grads):
        if variant != "limit":
            assert_close(grads, want, data.a.dtype, "(grad_a, grad_b)")

    bench(
        backward,
        setup=setup_for(variant),
        group=group,
        variant=variant,
        check=check,
        info=dict(op="grouped_mm", phase="backward", dtype=dtype_name, routing=routing, **s.info),
    )
