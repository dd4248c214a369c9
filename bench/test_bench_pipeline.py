"""The whole MoE layer, forward + backward: route -> permute -> grouped_mm -> GELU -> grouped_mm
-> unpermute, with gradients for the tokens, the router and both expert weights.

The router runs in float32 (``x.float() @ router_weight``) in every variant, so that all of them
pick the same experts; for ``zipf`` routing a fixed bias ``log p_zipf`` is added to the logits.
Variants: moefast ops; ``moefast.reference`` ops; the Mixtral-style loop over experts
(``loop``); a plain-torch pipeline around PyTorch's grouped GEMM (``torch_grouped_mm``); and as
the ``limit`` the same two GEMMs and GELU done densely on ``T * k`` rows (each token repeated
``k`` times, the ``k`` outputs summed), forward + backward.
"""

import functools

import pytest
import torch
from bench_baselines import (
    dense_moe_limit,
    loop_moe,
    moefast_moe,
    reference_moe,
    torch_grouped_mm_unavailable,
    torch_moe,
)
from bench_cases import (
    DTYPES,
    ROUTINGS,
    SHAPES,
    VARIANTS_ORDER,
    assert_close,
    expected,
    group_name,
    params,
    randn,
    zipf_probabilities,
)

MOE_FNS = {
    "moefast": moefast_moe,
    "reference": reference_moe,
    "loop": loop_moe,
    "torch_grouped_mm": torch_moe,
    "limit": dense_moe_limit,
}


@functools.lru_cache(maxsize=1)
def pipeline_inputs(shape_name, dtype_name, routing):
    s, dtype = SHAPES[shape_name], DTYPES[dtype_name]
    bias = torch.zeros(s.E) if routing == "uniform" else zipf_probabilities(s.E).log()
    return dict(
        x=randn(s.T, s.d, dtype=dtype, seed=1).requires_grad_(),
        router_weight=randn(
            s.d, s.E, dtype=torch.float32, scale=s.d**-0.5, seed=2
        ).requires_grad_(),
        router_bias=bias,
        w1=randn(s.E, s.d, s.h, dtype=dtype, scale=s.d**-0.5, seed=3).requires_grad_(),
        w2=randn(s.E, s.h, s.d, dtype=dtype, scale=s.h**-0.5, seed=4).requires_grad_(),
        grad=randn(s.T, s.d, dtype=dtype, seed=5),
    )


@pytest.mark.parametrize(
    "shape_name,dtype_name,routing,variant",
    params(SHAPES, DTYPES, ROUTINGS, variants=VARIANTS_ORDER),
)
def test_moe_forward_backward(bench, shape_name, dtype_name, routing, variant):
    s, dtype = SHAPES[shape_name], DTYPES[dtype_name]
    if variant == "torch_grouped_mm" and torch_grouped_mm_unavailable(dtype):
        pytest.skip(torch_grouped_mm_unavailable(dtype))
    inp = pipeline_inputs(shape_name, dtype_name, routing)
    params_ = (inp["x"], inp["router_weight"], inp["w1"], inp["w2"])

    def step(f):
        out = f(inp["x"], inp["router_weight"], inp["router_bias"], inp["w1"], inp["w2"], s.k)
        grads = torch.autograd.grad(out, params_, inp["grad"], allow_unused=True)
        return (out, *grads)

    group = group_name("moe layer fwd+bwd", s.label, dtype_name, routing)
    want = expected(group, lambda: step(moefast_moe))

    def check(got):
        if variant != "limit":
            assert_close(got, want, dtype, "(out, grad_x, grad_router, grad_w1, grad_w2)")

    bench(
        lambda: step(MOE_FNS[variant]),
        group=group,
        variant=variant,
        check=check,
        info=dict(
            op="moe_layer", phase="forward+backward", dtype=dtype_name, routing=routing, **s.info
        ),
    )
