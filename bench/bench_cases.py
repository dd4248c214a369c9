"""Shapes, inputs and checks shared by the benchmark suites in ``bench/``.

Every suite benchmarks a few *variants* of one op on the same inputs, one pytest-benchmark group per
(op, shape, dtype, routing):

- ``moefast``: the op of this package (``moefast.*`` or ``torch.ops.moefast.*``);
- ``reference``: the plain-PyTorch version in :mod:`moefast.reference`;
- ``loop``: the per-expert Python loop that people write today (:mod:`bench_baselines`);
- ``torch_grouped_mm``: PyTorch's own grouped GEMM, where it runs on this machine;
- ``limit``: a single dense torch op with the same FLOPs (GEMMs) or the same bytes moved
  (memory-bound ops): what the op could hope for on this machine.

Inputs are built once per group (the variants of a group run one after the other) and the
``moefast`` result is kept for the group, so each variant is checked against it once before it is
timed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

import moefast
from moefast.bench.cases import (  # noqa: F401  (shared with python -m moefast.bench)
    DTYPES,
    ROUTINGS,
    ZIPF_EXPONENT,
    MixtureShape,
    MoeShape,
    expert_ids,
    randn,
    zipf_probabilities,
)

VARIANTS_ORDER = ("moefast", "reference", "loop", "torch_grouped_mm", "limit")


# A Mixtral-like layer (few wide experts, top-2) and a fine-grained one (many narrow experts, top-8),
# both sized so that the whole suite runs in a few minutes on a 2-core CPU.
SHAPES = {
    "E8k2": MoeShape("E8k2", T=1024, d=512, h=1024, E=8, k=2),
    "E64k8": MoeShape("E64k8", T=512, d=256, h=128, E=64, k=8),
}


MIXTURE_SHAPES = {
    "E8": MixtureShape("E8", B=2048, E=8, C=512),
    "E64": MixtureShape("E64", B=512, E=64, C=128),
}


def group_name(op: str, label: str, dtype: str, routing: str | None = None) -> str:
    parts = [op, label, dtype] + ([routing] if routing else [])
    return " | ".join(parts)


def params(*axes, variants=VARIANTS_ORDER):
    """The cartesian product of ``axes`` and ``variants``, variants innermost (adjacent in a run)."""
    out = [()]
    for axis in (*axes, variants):
        out = [(*prefix, v) for prefix in out for v in axis]
    return out


# ----------------------------------------------------------------------------- inputs


@dataclass
class DispatchData:
    """Inputs of the dispatch and GEMM benches for one (shape, dtype, routing)."""

    shape: MoeShape
    routing: moefast.Routing
    x: Tensor  # [T, d], tokens
    y: Tensor  # [T * k, d], expert outputs in the permuted order
    a: Tensor  # [T * k, d], permuted tokens (grouped_mm input)
    b: Tensor  # [E, d, h], expert weights
    grad_mm: Tensor  # [T * k, h], gradient of the grouped_mm output


@functools.lru_cache(maxsize=1)
def dispatch_data(shape_name: str, dtype_name: str, routing: str) -> DispatchData:
    s, dtype = SHAPES[shape_name], DTYPES[dtype_name]
    ids = expert_ids(s, routing)
    weights = torch.softmax(randn(s.T, s.k, dtype=torch.float32, seed=1), dim=-1).to(dtype)
    r = moefast.routing_from_ids(ids, s.E, weights)
    x = randn(s.T, s.d, dtype=dtype, seed=2)
    return DispatchData(
        shape=s,
        routing=r,
        x=x,
        y=randn(s.T * s.k, s.d, dtype=dtype, seed=3),
        a=moefast.permute(x, r),
        b=randn(s.E, s.d, s.h, dtype=dtype, scale=s.d**-0.5, seed=4),
        grad_mm=randn(s.T * s.k, s.h, dtype=dtype, seed=5),
    )


# ----------------------------------------------------------------------------- checks

_expected: dict = {}


def expected(key, compute):
    """The ``moefast`` result of the group ``key``, computed once; only the last group is kept."""
    if key not in _expected:
        _expected.clear()
        _expected[key] = compute()
    return _expected[key]


def rel_tol(dtype: torch.dtype) -> float:
    return 3e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4


def assert_close(actual, expected_value, dtype: torch.dtype, what: str = "result") -> None:
    """Relative Frobenius error below a dtype-dependent bound, for tensors or tuples of them."""
    if isinstance(expected_value, (tuple, list)):
        assert len(actual) == len(expected_value), what
        for i, (a, e) in enumerate(zip(actual, expected_value, strict=True)):
            assert_close(a, e, dtype, f"{what}[{i}]")
        return
    assert actual.shape == expected_value.shape, (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected_value.shape)}"
    )
    a, e = actual.detach().double(), expected_value.detach().double()
    err = (a - e).norm() / e.norm().clamp_min(1e-30)
    assert err <= rel_tol(dtype), f"{what}: relative error {err:.3g} > {rel_tol(dtype):g}"
