"""Inference cost per example of :class:`HardMoE` as the number of experts grows.

    python -m moefast.hardmoe.infer_bench [--out FILE] [--batch 4000] [--threads 1 2] [--hidden 16]

Random weights, features of the size the study uses (1024 -> hidden -> 64 -> 10 labels; the main
study's hidden width is 16, the earlier runs' 128) and a
uniform assignment (the hash gater, so the timing does not depend on a k-means fit). For each
``E`` it reports the median time per example of the whole MoE forward, of one grouped GEMM of the
first expert layer, and of the same GEMM as one dense matrix product (the ``E = 1`` cost).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from .. import ops
from .model import ClusterGater, GroupedExperts, HardMoE


def _median_us(fn, n: int, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times) / n


@torch.no_grad()
def run(
    batch: int, experts: list[int], threads: list[int], reps: int, hidden: int = 16
) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(batch, 1024)
    rows = []
    for t in threads:
        torch.set_num_threads(t)
        for E in experts:
            moe = HardMoE(
                ClusterGater(E, 1024, method="hash"),
                GroupedExperts(E, (1024, hidden, 64)),
                torch.nn.Linear(64, 10),
            ).eval()
            routing = moe.routing(x)
            xs = ops.permute(x, routing)
            w = moe.experts.layers[0].weight
            offs = routing.offs
            rows.append(
                {
                    "threads": t,
                    "num_experts": E,
                    "moe_us_per_example": _median_us(partial(moe, x), batch, reps),
                    "grouped_mm_us_per_example": _median_us(
                        partial(ops.grouped_mm, xs, w, offs), batch, reps
                    ),
                    "dense_mm_us_per_example": _median_us(
                        partial(torch.matmul, xs, w[0]), batch, reps
                    ),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m moefast.hardmoe.infer_bench")
    p.add_argument("--out")
    p.add_argument("--batch", type=int, default=4000)
    p.add_argument("--experts", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--hidden", type=int, default=8, help="hidden width of the expert layers")
    a = p.parse_args(argv)
    rows = run(a.batch, a.experts, a.threads, a.reps, a.hidden)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        res = {"batch": a.batch, "expert_dims": [1024, a.hidden, 64], "rows": rows}
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
