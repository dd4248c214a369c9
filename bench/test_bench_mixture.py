"""``mixture`` benchmarks: the gated combine ``out[b] = sum_e softmax(gate[b])[e] * x[e, b]``.

Forward, and forward + backward (gradients for the gate logits and the expert outputs), against
``moefast.reference.mixture`` (softmax + einsum) and a loop over experts; the forward ``limit`` is
``x.sum(0)``, a reduction reading the same bytes.
"""

import pytest
import torch
from bench_baselines import loop_mixture
from bench_cases import DTYPES, MIXTURE_SHAPES, assert_close, expected, group_name, params, randn

import moefast
from moefast import reference

FNS = {"moefast": moefast.mixture, "reference": reference.mixture, "loop": loop_mixture}


def mixture_inputs(s, dtype, requires_grad=False):
    gate = randn(s.B, s.E, dtype=dtype, seed=1).requires_grad_(requires_grad)
    expert_out = randn(s.E, s.B, s.C, dtype=dtype, seed=2).requires_grad_(requires_grad)
    return gate, expert_out


@pytest.mark.parametrize(
    "shape_name,dtype_name,variant",
    params(MIXTURE_SHAPES, DTYPES, variants=("moefast", "reference", "loop", "limit")),
)
def test_mixture_forward(bench, shape_name, dtype_name, variant):
    s, dtype = MIXTURE_SHAPES[shape_name], DTYPES[dtype_name]
    gate, expert_out = mixture_inputs(s, dtype)
    fns = {name: (lambda f=f: f(gate, expert_out)) for name, f in FNS.items()}
    fns["limit"] = lambda: expert_out.sum(dim=0)
    group = group_name("mixture fwd", s.label, dtype_name)
    want = expected(group, fns["moefast"])

    def check(out):
        if variant != "limit":
            assert_close(out, want, dtype)

    bench(
        fns[variant],
        group=group,
        variant=variant,
        check=check,
        info=dict(op="mixture", phase="forward", dtype=dtype_name, **s.info),
    )


@pytest.mark.parametrize(
    "shape_name,dtype_name,variant",
    params(MIXTURE_SHAPES, DTYPES, variants=("moefast", "reference", "loop")),
)
def test_mixture_forward_backward(bench, shape_name, dtype_name, variant):
    s, dtype = MIXTURE_SHAPES[shape_name], DTYPES[dtype_name]
    gate, expert_out = mixture_inputs(s, dtype, requires_grad=True)
    grad = randn(s.B, s.C, dtype=dtype, seed=3)

    def step(f):
        out = f(gate, expert_out)
        return (out, *torch.autograd.grad(out, (gate, expert_out), grad))

    group = group_name("mixture fwd+bwd", s.label, dtype_name)
    want = expected(group, lambda: step(FNS["moefast"]))
    bench(
        lambda: step(FNS[variant]),
        group=group,
        variant=variant,
        check=lambda got: assert_close(got, want, dtype, "(out, grad_gate, grad_expert_out)"),
        info=dict(op="mixture", phase="forward+backward", dtype=dtype_name, **s.info),
    )
