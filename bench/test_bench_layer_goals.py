"""The CPU goals of the MoE layer as pytest-benchmark figures, measured side by side in one run:
forward + backward, 4096 tokens, top-2, float32 and bfloat16, on a transformers Mixtral block
(random weights) converted with ``MoE.from_hf`` and run by moefast, against

- ``limit``: the same FLOPs as plain dense GEMMs (``T * k`` rows through the SwiGLU expert's two
  GEMMs with torch.matmul, forward + backward);
- ``moefast_nocache`` and ``moefast_onednn``: moefast with its CPU output cache off, and with its
  AVX512-BF16 GEMM switched off (oneDNN matmuls for the expert GEMMs; bfloat16 only differs);
- ``hf_eager`` and ``hf_grouped_mm``: the same block with transformers' "eager" and "grouped_mm"
  experts implementations.

Shapes: Mixtral-like (hidden 512, intermediate 1024, E = 8) and 64 small experts (hidden 512,
intermediate 128). The goals (issue 5): moefast at least 0.90 of the limit and faster than eager on
the first, at least 1.5x faster than eager on the second. Ratios land in the JSON
(``moefast_ratios``); ``python bench/layer_goals.py`` prints the same comparison without pytest.

    python -m pytest bench/test_bench_layer_goals.py --bench-time 3 \\
        --benchmark-json bench/results/layer-goals-cpu.json
"""

from __future__ import annotations

import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")

from layer_goals import SHAPES, K, T, variants  # noqa: E402  (bench/ is on sys.path)

VARIANTS = (
    "moefast",
    "moefast_nocache",
    "moefast_onednn",
    "hf_eager",
    "hf_grouped_mm",
    "limit",
)


@functools.lru_cache(maxsize=1)
def _variants(shape: str, dtype_name: str):
    """The variants of one group, built once (they run one after the other)."""
    return variants(shape, getattr(torch, dtype_name))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_layer_goals(bench, shape, dtype_name, variant):
    s = SHAPES[shape]

    def check(y):
        assert torch.isfinite(y.float()).all()

    bench(
        _variants(shape, dtype_name)[variant],
        group=f"layer goals {shape} {dtype_name} T{T} k{K}",
        variant=variant,
        info={"shape": shape, "dtype": dtype_name, "T": T, "k": K, **s},
        check=check,
    )


def test_split_gemm_script_times_all_six_gemms(capsys):
    import split_gemm

    res = split_gemm.main(
        ["--rows", "64", "--d", "16", "--h", "8", "--experts", "4", "--rounds", "1"]
    )
    assert len(res) == 6
    assert all(v["split"] > 0 and v["dense"] > 0 for v in res.values())
    assert "all six" in capsys.readouterr().out
