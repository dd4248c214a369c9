"""Dispatch benchmarks: ``permute`` (tokens to expert-grouped rows) and weighted ``unpermute``.

Baselines: ``moefast.reference``, a per-expert loop (boolean mask + indexing / ``index_add_``), and
as the ``limit`` a single torch op that moves the same bytes: ``index_select`` with a sorted index
for permute (``T * k`` rows out of ``T``), and a sum over the ``k`` rows of each token, read in
order, for unpermute.
"""

import pytest
import torch
from bench_baselines import loop_permute, loop_unpermute
from bench_cases import (
    DTYPES,
    ROUTINGS,
    SHAPES,
    assert_close,
    dispatch_data,
    expected,
    group_name,
    params,
)

import moefast
from moefast import reference

DISPATCH_VARIANTS = ("moefast", "reference", "loop", "limit")


@pytest.mark.parametrize(
    "shape_name,dtype_name,routing,variant",
    params(SHAPES, DTYPES, ROUTINGS, variants=DISPATCH_VARIANTS),
)
def test_permute(bench, shape_name, dtype_name, routing, variant):
    data = dispatch_data(shape_name, dtype_name, routing)
    s, r, x = data.shape, data.routing, data.x
    sorted_index = torch.arange(s.T * s.k) // s.k
    fns = {
        "moefast": lambda: moefast.permute(x, r),
        "reference": lambda: reference.permute(x, r.position),
        "loop": lambda: loop_permute(x, r.expert_ids, s.E),
        "limit": lambda: x.index_select(0, sorted_index),
    }
    group = group_name("permute", f"T{s.T} d{s.d} E{s.E} k{s.k}", dtype_name, routing)
    want = expected(group, fns["moefast"])

    def check(out):
        if variant != "limit":
            assert torch.equal(out, want)

    bench(
        fns[variant],
        group=group,
        variant=variant,
        check=check,
        info=dict(op="permute", dtype=dtype_name, routing=routing, **s.info),
    )


@pytest.mark.parametrize(
    "shape_name,dtype_name,routing,variant",
    params(SHAPES, DTYPES, ROUTINGS, variants=DISPATCH_VARIANTS),
)
def test_unpermute(bench, shape_name, dtype_name, routing, variant):
    data = dispatch_data(shape_name, dtype_name, routing)
    s, r, y = data.shape, data.routing, data.y
    fns = {
        "moefast": lambda: moefast.unpermute(y, r),
        "reference": lambda: reference.unpermute(y, r.position, r.weights),
        "loop": lambda: loop_unpermute(y, r.expert_ids, r.weights, s.E),
        "limit": lambda: y.view(s.T, s.k, s.d).sum(dim=1),
    }
    group = group_name("unpermute", f"T{s.T} d{s.d} E{s.E} k{s.k}", dtype_name, routing)
    want = expected(group, fns["moefast"])

    def check(out):
        if variant != "limit":
            assert_close(out, want, y.dtype)

    bench(
        fns[variant],
        group=group,
        variant=variant,
        check=check,
        info=dict(op="unpermute", dtype=dtype_name, routing=routing, **s.info),
    )
