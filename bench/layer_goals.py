"""The CPU goals of the MoE layer, measured side by side in one run (forward + backward, 4096
tokens, top-2): moefast's MoE (converted from a transformers Mixtral block with MoE.from_hf),
the limit (the same FLOPs as plain dense GEMMs), and transformers' "eager" and "grouped_mm"
experts on the same block. Median of 5 after 2 warm-ups, perf_counter.

    python bench/layer_goals.py
"""

import time

import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

import moefast.integrations.transformers as mh
from moefast.nn import MoE

mh.register()


def timeit(f, n=5):
    f()
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2]


def case(d, h, E, k, dt, T=4096):
    torch.manual_seed(0)
    cfg = MixtralConfig(
        hidden_size=d, intermediate_size=h, num_local_experts=E, num_experts_per_tok=k
    )
    cfg._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(cfg).to(dt)
    x = torch.randn(1, T, d, dtype=dt, requires_grad=True)

    def hf():
        y = block(x)
        y = y[0] if isinstance(y, tuple) else y
        y.backward(torch.ones_like(y))

    moe = MoE.from_hf(block).to(dt)

    def ours():
        y = moe(x)
        y.backward(torch.ones_like(y))

    A = torch.randn(T * k, d, dtype=dt, requires_grad=True)
    W1 = torch.randn(d, 2 * h, dtype=dt, requires_grad=True)
    W2 = torch.randn(h, d, dtype=dt, requires_grad=True)

    def lim():
        y = (A @ W1)[:, :h] @ W2
        y.backward(torch.ones_like(y))

    t_l = timeit(lim)
    t_o = timeit(ours)
    t_h = timeit(hf)
    cfg._experts_implementation = "grouped_mm"
    t_g = timeit(hf)
    print(
        f"d={d} h={h} E={E} k={k} {dt}: moefast {t_o * 1e3:.0f} ms, limit {t_l * 1e3:.0f} ms -> {t_l / t_o:.2f} of limit; hf eager {t_h * 1e3:.0f} ms ({t_l / t_h:.2f} of limit, moefast {t_h / t_o:.2f}x faster); hf grouped_mm {t_g * 1e3:.0f} ms ({t_l / t_g:.2f})",
        flush=True,
    )


for dt in (torch.float32, torch.bfloat16):
    case(512, 1024, 8, 2, dt)
    case(512, 128, 64, 2, dt)
