"""Router (weights and expert ids from logits) and routing plan (offsets, order) benchmarks.

``route``: the router kernel ``torch.ops.moefast.router`` (what ``moefast.route`` runs before its
plan) against ``moefast.reference.route`` and ``torch.softmax`` + ``torch.topk``.
``routing_plan``: ``moefast.routing_from_ids`` against ``moefast.reference.routing_plan`` and one
``nonzero`` per expert.
"""

import pytest
import torch
from bench_baselines import loop_route, loop_routing_plan
from bench_cases import DTYPES, ROUTINGS, SHAPES, expected, expert_ids, group_name, params, randn

import moefast
from moefast import reference

ROUTE_VARIANTS = ("moefast", "reference", "loop")


@pytest.mark.parametrize(
    "mode,shape_name,dtype_name,variant",
    params(("softmax_topk", "topk_softmax"), SHAPES, DTYPES, variants=ROUTE_VARIANTS),
)
def test_route(bench, mode, shape_name, dtype_name, variant):
    s, dtype = SHAPES[shape_name], DTYPES[dtype_name]
    logits = randn(s.T, s.E, dtype=dtype)
    fns = {
        "moefast": lambda: torch.ops.moefast.router(logits, s.k, mode, False),
        "reference": lambda: reference.route(logits, s.k, mode),
        "loop": lambda: loop_route(logits, s.k, mode),
    }
    group = group_name(f"route {mode}", f"T{s.T} E{s.E} k{s.k}", dtype_name)
    want_w, want_ids = expected(group, fns["moefast"])

    def check(result):
        w, ids = result
        # Equal logits may be picked in another order: compare the logits picked, not the ids.
        assert torch.equal(logits.gather(1, ids.long()), logits.gather(1, want_ids.long()))
        torch.testing.assert_close(w.float(), want_w.float(), rtol=1e-2, atol=1e-5)

    bench(
        fns[variant],
        group=group,
        variant=variant,
        check=check,
        info=dict(op="route", mode=mode, dtype=dtype_name, **s.info),
    )


@pytest.mark.parametrize(
    "shape_name,routing,variant", params(SHAPES, ROUTINGS, variants=ROUTE_VARIANTS)
)
def test_routing_plan(bench, shape_name, routing, variant):
    s = SHAPES[shape_name]
    ids = expert_ids(s, routing)
    weights = torch.full((s.T, s.k), 1.0 / s.k)
    fns = {
        "moefast": lambda: moefast.routing_from_ids(ids, s.E, weights)[2:],
        "reference": lambda: reference.routing_plan(ids, s.E),
        "loop": lambda: loop_routing_plan(ids, s.E),
    }
    group = group_name("routing_plan", f"T{s.T} E{s.E} k{s.k}", "int32", routing)
    offs, counts, position, order = expected(group, fns["moefast"])

    def check(result):
        if variant == "moefast":
            return
        got_counts, got_offs, got_position, got_order = result
        for got, want in ((got_counts, counts), (got_offs, offs), (got_order, order)):
            assert torch.equal(got.to(torch.int32), want)
        assert torch.equal(got_position.to(torch.int32).view(s.T, s.k), position)

    bench(
        fns[variant],
        group=group,
        variant=variant,
        check=check,
        info=dict(op="routing_plan", dtype="int32", routing=routing, **s.info),
    )
