"""What splitting a GEMM among experts costs on its own: the six GEMMs of a SwiGLU expert MLP's
forward + backward (``x @ W1``, ``act @ W2`` and the four gradients), once on all ``T * k`` rows
with one weight (the layer goals' limit) and once as ``E`` equal row blocks, each with its own
weight (what any grouped GEMM does), timed interleaved, per GEMM and in total. Writes into
preallocated outputs, so neither variant pays for allocation.

    python bench/split_gemm.py [--dtype bfloat16] [--rows 8192] [--d 512] [--h 1024] [--experts 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv=None) -> dict[str, dict[str, float]]:
    """Prints the table; returns GEMM name -> {"split": ms, "dense": ms} (medians)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--h", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rounds", type=int, default=21)
    a = p.parse_args(argv)
    dt, N, d, H, E = getattr(torch, a.dtype), a.rows, a.d, a.h, a.experts
    torch.manual_seed(0)
    x, g = torch.randn(N, d, dtype=dt), torch.randn(N, d, dtype=dt)
    h, act = torch.randn(N, 2 * H, dtype=dt), torch.randn(N, H, dtype=dt)
    w1, w2 = torch.randn(E, d, 2 * H, dtype=dt), torch.randn(E, H, d, dtype=dt)
    o_h, o_y, o_da, o_gx = (torch.empty(N, c, dtype=dt) for c in (2 * H, d, H, d))
    gw1, gw2 = torch.empty(E, d, 2 * H, dtype=dt), torch.empty(E, H, d, dtype=dt)
    n = N // E
    # name -> fn(rows, expert) writing that GEMM's output for those rows with that expert's weight
    gemms = {
        "x @ W1": lambda s, e: torch.mm(x[s], w1[e], out=o_h[s]),
        "act @ W2": lambda s, e: torch.mm(act[s], w2[e], out=o_y[s]),
        "dact = g @ W2^T": lambda s, e: torch.mm(g[s], w2[e].t(), out=o_da[s]),
        "dW2 = act^T @ g": lambda s, e: torch.mm(act[s].t(), g[s], out=gw2[e]),
        "dx = dh @ W1^T": lambda s, e: torch.mm(h[s], w1[e].t(), out=o_gx[s]),
        "dW1 = x^T @ dh": lambda s, e: torch.mm(x[s].t(), h[s], out=gw1[e]),
    }

    print(f"{a.dtype}, {N} rows, d {d}, h {H}, {E} experts, {torch.get_num_threads()} threads")
    print(f"{'GEMM':18s} {'split ms':>9s} {'dense ms':>9s} {'dense/split':>12s}")
    tot = {"split": 0.0, "dense": 0.0}
    out = {}
    for name, f in gemms.items():

        def split(f=f):
            for e in range(E):
                f(slice(e * n, (e + 1) * n), e)

        def dense(f=f):
            f(slice(0, N), 0)

        times = {"split": [], "dense": []}
        for fn in (split, dense, split, dense):  # warm-up
            fn()
        for r in range(a.rounds):
            pair = (("split", split), ("dense", dense))
            for key, fn in pair if r % 2 == 0 else pair[::-1]:
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        out[name] = med
        for k in tot:
            tot[k] += med[k]
        print(
            f"{name:18s} {med['split']:9.2f} {med['dense']:9.2f} {med['dense'] / med['split']:12.3f}"
        )
    print(
        f"{'all six':18s} {tot['split']:9.2f} {tot['dense']:9.2f} {tot['dense'] / tot['split']:12.3f}"
    )
    return out


if __name__ == "__main__":
    main()
