"""``swiglu`` benchmarks: ``silu(gate) * up`` of a ``[gate | up]`` expert product, the activation
between the two GEMMs of a SwiGLU expert.

Variants, one group per (phase, shape, dtype):

- ``moefast``: :func:`moefast.swiglu` (one pass forward, one pass backward writing both halves of
  the gradient in place of the ``[gate | up]`` layout);
- ``torch``: what a model writes, ``gate, up = h.chunk(2, -1); F.silu(gate) * up`` in the input
  dtype, with autograd (its backward ends with a ``cat`` of the two half gradients);
- ``reference``: :func:`moefast.reference.swiglu` (the same in float32 for 16-bit inputs);
- ``limit`` (forward only): ``gate + up``, an elementwise op that reads and writes the same
  bytes as the forward.

Shapes: the rows of a 4096-token top-2 batch through a Mixtral-like expert (H = 1024) and
through narrow experts (H = 128).
"""

import pytest
import torch
import torch.nn.functional as F
from bench_cases import DTYPES, assert_close, expected, group_name, params, randn

import moefast
from moefast import reference

SHAPES = {"rows8192-H1024": (8192, 1024), "rows8192-H128": (8192, 128)}


def torch_swiglu(h):
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


FNS = {"moefast": moefast.swiglu, "torch": torch_swiglu, "reference": reference.swiglu}


@pytest.mark.parametrize(
    "shape_name,dtype_name,variant",
    params(SHAPES, DTYPES, variants=("moefast", "torch", "reference", "limit")),
)
def test_swiglu_forward(bench, shape_name, dtype_name, variant):
    (N, H), dtype = SHAPES[shape_name], DTYPES[dtype_name]
    h = randn(N, 2 * H, dtype=dtype, scale=3.0, seed=1)
    fns = {name: (lambda f=f: f(h)) for name, f in FNS.items()}
    fns["limit"] = lambda: torch.add(h[:, :H], h[:, H:])
    group = group_name("swiglu fwd", shape_name, dtype_name)
    want = expected(group, fns["moefast"])

    def check(out):
        if variant != "limit":
            assert_close(out, want, dtype)

    bench(
        fns[variant],
        group=group,
        variant=variant,
        check=check,
        info=dict(op="swiglu", phase="forward", dtype=dtype_name, rows=N, H=H),
    )


@pytest.mark.parametrize(
    "shape_name,dtype_name,variant",
    params(SHAPES, DTYPES, variants=("moefast", "torch", "reference")),
)
def test_swiglu_forward_backward(bench, shape_name, dtype_name, variant):
    (N, H), dtype = SHAPES[shape_name], DTYPES[dtype_name]
    h = randn(N, 2 * H, dtype=dtype, scale=3.0, seed=1).requires_grad_(True)
    grad = randn(N, H, dtype=dtype, seed=2)

    def step(f):
        out = f(h)
        return (out, *torch.autograd.grad(out, (h,), grad))

    group = group_name("swiglu fwd+bwd", shape_name, dtype_name)
    want = expected(group, lambda: step(FNS["moefast"]))
    bench(
        lambda: step(FNS[variant]),
        group=group,
        variant=variant,
        check=lambda got: assert_close(got, want, dtype, "(out, grad_h)"),
        info=dict(op="swiglu", phase="forward+backward", dtype=dtype_name, rows=N, H=H),
    )
