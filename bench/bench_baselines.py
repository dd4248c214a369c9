"""The baselines moefast is measured against; they live in :mod:`moefast.bench.baselines` (shared
with ``python -m moefast.bench``) and are re-exported here for the pytest-benchmark suites."""

from moefast.bench.baselines import (  # noqa: F401
    dense_moe_limit,
    loop_grouped_mm,
    loop_mixture,
    loop_moe,
    loop_permute,
    loop_route,
    loop_routing_plan,
    loop_unpermute,
    moefast_moe,
    reference_moe,
    torch_grouped_mm,
    torch_grouped_mm_unavailable,
    torch_moe,
)
