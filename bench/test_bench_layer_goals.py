"""The CPU goals of the MoE layer as pytest-benchmark figures, measured side by side in one run:
forward + backward, 4096 tokens, top-2, float32 and bfloat16, on a transformers Mixtral block
(random weights) converted with ``MoE.from_hf`` and run by moefast, against

- ``limit``: the same FLOPs as plain dense GEMMs (``T * k`` rows through the SwiGLU expert's two
  GEMMs with torch.matmul, forward + backward);
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

from moefast.nn import MoE  # noqa: E402

SHAPES = {"mixtral-like": dict(d=512, h=1024, E=8), "64-small-experts": dict(d=512, h=128, E=64)}
T, K = 4096, 2
VARIANTS = ("moefast", "hf_eager", "hf_grouped_mm", "limit")


@functools.lru_cache(maxsize=2)
def _block(shape: str, dtype_name: str):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    import moefast.integrations.transformers as mh

    mh.register()
    s, dtype = SHAPES[shape], getattr(torch, dtype_name)
    torch.manual_seed(0)
    cfg = MixtralConfig(
        hidden_size=s["d"],
        intermediate_size=s["h"],
        num_local_experts=s["E"],
        num_experts_per_tok=K,
    )
    cfg._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():  # a bare block is not initialised (the model's _init_weights does that)
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    block = block.to(dtype)
    moe = MoE.from_hf(block).to(dtype)
    x = torch.randn(1, T, s["d"], dtype=dtype, requires_grad=True)
    return cfg, block, moe, x


def _fwd_bwd(module, x):
    # A training step's backward: gradients start unset (optimizer.zero_grad() sets them to None).
    x.grad = None
    module.zero_grad(set_to_none=True)
    y = module(x)
    y = y[0] if isinstance(y, tuple) else y
    y.backward(torch.ones_like(y))
    return y.detach()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_layer_goals(bench, shape, dtype_name, variant):
    cfg, block, moe, x = _block(shape, dtype_name)
    s, dtype = SHAPES[shape], getattr(torch, dtype_name)
    if variant == "moefast":
        target = functools.partial(_fwd_bwd, moe, x)
    elif variant.startswith("hf_"):
        impl = variant[len("hf_") :]

        def target():
            cfg._experts_implementation = impl
            return _fwd_bwd(block, x)
    else:
        a = torch.randn(T * K, s["d"], dtype=dtype, requires_grad=True)
        w1 = torch.randn(s["d"], 2 * s["h"], dtype=dtype, requires_grad=True)
        w2 = torch.randn(s["h"], s["d"], dtype=dtype, requires_grad=True)

        def target():
            a.grad = w1.grad = w2.grad = None
            y = (a @ w1)[:, : s["h"]] @ w2
            y.backward(torch.ones_like(y))
            return y.detach()

    def check(y):
        assert torch.isfinite(y.float()).all()

    bench(
        target,
        group=f"layer goals {shape} {dtype_name} T{T} k{K}",
        variant=variant,
        info={"shape": shape, "dtype": dtype_name, "T": T, "k": K, **s},
        check=check,
    )
