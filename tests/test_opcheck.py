"""torch.library.opcheck on every torch.ops.moefast op: schema, fake kernel, autograd registration,
AOT dispatch (what torch.compile relies on).

Float inputs require grad for the ops with autograd (router, permute, unpermute, grouped_mm,
mixture); the backward ops and tree_route (integer output, no autograd) get plain inputs.
"""

from __future__ import annotations

import pytest
import torch
from moefast_testing import (
    distinct_logits,
    dtype_id,
    offs_from_counts,
    randn,
    random_ids,
    random_tree,
)

import moefast

_ops = torch.ops.moefast


def _samples(dtype, gen):
    """(name, op overload, args) for every op, with valid inputs of ``dtype``."""
    T, E, k, d, h = 6, 4, 2, 5, 3

    def rg(t):
        return t.requires_grad_(True)

    logits = distinct_logits(T, E, gen=gen, dtype=dtype)
    routing = moefast.routing_from_ids(random_ids(T, k, E, gen=gen), E)
    pos = routing.position
    offs = offs_from_counts([3, 0, 5, 2])  # an empty expert and 2 rows past offs[-1]
    n = 12
    _w, ids = _ops.router(logits, k, "softmax_topk", False)
    x = randn(T, d, gen=gen, dtype=dtype)
    y = randn(T * k, d, gen=gen, dtype=dtype)
    a = randn(n, d, gen=gen, dtype=dtype)
    b = randn(E, d, h, gen=gen, dtype=dtype)
    gate = randn(T, E, gen=gen, dtype=dtype)
    eo = randn(E, T, h, gen=gen, dtype=dtype)
    # grad_y, x, w1, w2, offs, h, act of grouped_swiglu_mlp_backward (input_grad, bias follow).
    mlp_backward_inputs = (
        randn(n, d, gen=gen, dtype=dtype),
        a,
        randn(E, d, 2 * h, gen=gen, dtype=dtype),
        randn(E, h, d, gen=gen, dtype=dtype),
        offs,
        randn(n, 2 * h, gen=gen, dtype=dtype),
        randn(n, h, gen=gen, dtype=dtype),
    )
    return [
        (
            "router-softmax_topk",
            _ops.router.default,
            (rg(logits.clone()), k, "softmax_topk", False),
        ),
        ("router-normalize", _ops.router.default, (rg(logits.clone()), k, "softmax_topk", True)),
        (
            "router-topk_softmax",
            _ops.router.default,
            (rg(logits.clone()), k, "topk_softmax", False),
        ),
        ("router-hard", _ops.router.default, (rg(logits.clone()), 1, "hard", False)),
        ("router-dense", _ops.router.default, (rg(logits.clone()), E, "dense", False)),
        (
            "router_backward",
            _ops.router_backward.default,
            (randn(T, k, gen=gen, dtype=dtype), logits, ids, "softmax_topk", True),
        ),
        (
            "router_backward-topk_softmax",
            _ops.router_backward.default,
            (randn(T, k, gen=gen, dtype=dtype), logits, ids, "topk_softmax", False),
        ),
        ("routing_plan", _ops.routing_plan.default, (routing.expert_ids, E)),
        ("permute", _ops.permute.default, (rg(x.clone()), pos, None)),
        (
            "permute-weights",
            _ops.permute.default,
            (rg(x.clone()), pos, rg(randn(T, k, gen=gen, dtype=dtype))),
        ),
        ("unpermute", _ops.unpermute.default, (rg(y.clone()), pos, None)),
        (
            "unpermute-weights",
            _ops.unpermute.default,
            (rg(y.clone()), pos, rg(randn(T, k, gen=gen, dtype=dtype))),
        ),
        (
            "unpermute_weight_grad",
            _ops.unpermute_weight_grad.default,
            (randn(T, d, gen=gen, dtype=dtype), y, pos),
        ),
        ("grouped_mm", _ops.grouped_mm.default, (rg(a.clone()), rg(b.clone()), offs)),
        (
            "grouped_mm-bias",
            _ops.grouped_mm.default,
            (rg(a.clone()), rg(b.clone()), offs, rg(randn(E, h, gen=gen, dtype=dtype))),
        ),
        (
            "grouped_mm_act-gelu",
            _ops.grouped_mm_act.default,
            (rg(a.clone()), rg(b.clone()), offs, rg(randn(E, h, gen=gen, dtype=dtype)), "gelu"),
        ),
        (
            "grouped_mm_act-swiglu",
            _ops.grouped_mm_act.default,
            (rg(a.clone()), rg(randn(E, d, 2 * h, gen=gen, dtype=dtype)), offs, None, "swiglu"),
        ),
        (
            "grouped_mm_weight_grad",
            _ops.grouped_mm_weight_grad.default,
            (a, randn(n, h, gen=gen, dtype=dtype), offs),
        ),
        (
            "grouped_bias_grad",
            _ops.grouped_bias_grad.default,
            (randn(n, h, gen=gen, dtype=dtype), offs),
        ),
        ("swiglu", _ops.swiglu.default, (rg(randn(T, 2 * h, gen=gen, dtype=dtype)),)),
        ("swiglu-3d", _ops.swiglu.default, (rg(randn(2, T, 2 * h, gen=gen, dtype=dtype)),)),
        (
            "swiglu_backward",
            _ops.swiglu_backward.default,
            (randn(T, h, gen=gen, dtype=dtype), randn(T, 2 * h, gen=gen, dtype=dtype)),
        ),
        (
            "grouped_swiglu_mlp",
            _ops.grouped_swiglu_mlp.default,
            (
                rg(a.clone()),
                rg(randn(E, d, 2 * h, gen=gen, dtype=dtype)),
                None,
                rg(randn(E, h, d, gen=gen, dtype=dtype)),
                None,
                offs,
            ),
        ),
        (
            "grouped_swiglu_mlp-bias",
            _ops.grouped_swiglu_mlp.default,
            (
                rg(a.clone()),
                rg(randn(E, d, 2 * h, gen=gen, dtype=dtype)),
                rg(randn(E, 2 * h, gen=gen, dtype=dtype)),
                rg(randn(E, h, d, gen=gen, dtype=dtype)),
                rg(randn(E, d, gen=gen, dtype=dtype)),
                offs,
            ),
        ),
        (
            "grouped_swiglu_mlp_backward",
            _ops.grouped_swiglu_mlp_backward.default,
            (*mlp_backward_inputs, True, True),
        ),
        (
            "grouped_swiglu_mlp_backward-weights-only",
            _ops.grouped_swiglu_mlp_backward.default,
            (*mlp_backward_inputs, False, False),
        ),
        ("tree_route", _ops.tree_route.default, (x, *random_tree(E + 3, d, gen=gen, dtype=dtype))),
        ("mixture", _ops.mixture.default, (rg(gate.clone()), rg(eo.clone()))),
        (
            "mixture_backward",
            _ops.mixture_backward.default,
            (randn(T, h, gen=gen, dtype=dtype), gate, eo),
        ),
    ]


_NAMES = [name for name, _, _ in _samples(torch.float32, torch.Generator().manual_seed(0))]


def test_every_op_has_an_opcheck_sample():
    """A new op in torch.ops.moefast must get a sample here."""
    registered = {
        name
        for name in dir(_ops)
        if isinstance(getattr(_ops, name, None), torch._ops.OpOverloadPacket)
    }
    sampled = {
        op._schema.name.split("::")[1] for _, op, _ in _samples(torch.float32, torch.Generator())
    }
    assert registered, "no ops registered under torch.ops.moefast"
    assert registered <= sampled, f"ops without an opcheck sample: {sorted(registered - sampled)}"


# 16-bit inputs where the output dtype rules matter (weights and weight gradients in float32).
_HALF_NAMES = [
    "router-softmax_topk",
    "permute-weights",
    "unpermute-weights",
    "unpermute_weight_grad",
    "grouped_mm-bias",
    "grouped_mm_act-gelu",
    "mixture_backward",
    "swiglu",
    "swiglu_backward",
    "tree_route",
    "grouped_swiglu_mlp-bias",
    "grouped_swiglu_mlp_backward",
]
_CASES = [(n, torch.float32) for n in _NAMES] + [(n, torch.bfloat16) for n in _HALF_NAMES]


@pytest.mark.parametrize("name, dtype", _CASES, ids=[f"{n}-{dtype_id(d)}" for n, d in _CASES])
def test_opcheck(name, dtype, gen):
    samples = {n: (op, args) for n, op, args in _samples(dtype, gen)}
    op, args = samples[name]
    result = torch.library.opcheck(op, args)  # raises on failure
    assert result and all(v == "SUCCESS" for v in result.values()), result
