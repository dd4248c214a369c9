"""Inference cost per example of :class:`HardMoE` as the number of experts grows.

    python -m moefast.hardmoe.infer_bench [--out FILE] [--batch 4000] [--threads 1 2]
        [--hidden 8] [--gaters hash kmeans tree] [--no-trunk] [--plot PNG]

Random weights, features of the size the study uses (1024 -> hidden -> 64 -> 10 labels). For
each gater and ``E`` it reports the median time per example of

- ``gater``: the routing decision alone (normalise + nearest centroid for ``kmeans``, one
  hyperplane per tree level for ``tree``, the hash for ``hash``);
- ``moe``: the whole MoE head (gater -> permute -> grouped expert layers -> unpermute -> shared
  decoder);
- ``grouped_mm`` / ``dense_mm``: one grouped GEMM of the first expert layer, and the same rows as
  one dense matrix product (the ``E = 1`` cost);
- ``pipeline``: the trunk (the tile-wise CNN of the main study, on 56x56 composites; timed once
  per thread count) plus the MoE head, i.e. what one image costs from pixels to label scores.

The gaters are fitted on the random features (``kmeans``: scikit-learn k-means on a sample;
``tree``: the 2-means split tree) so that the tree has its real depth; with random features the
``hash`` gater spreads the rows evenly. The multiply-adds per example of each part are reported
next to the times (``*_macs``), counted from the layer shapes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .. import ops
from .model import ClusterGater, GroupedExperts, HardMoE, Trunk

FEATURES = 1024  # the tile trunk's feature size (width 16)


def _median_us(fn, n: int, reps: int) -> float:
    for _ in range(2):  # warm-up: allocator, thread pool, first-touch of the weights
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times) / n


def module_macs(module: nn.Module, x: torch.Tensor, method: str = "forward") -> int:
    """Multiply-adds per example of the convolutions and linear layers ``module`` runs on ``x``."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            k = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            total += out.numel() * k
        elif isinstance(m, nn.Linear):
            total += out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        with torch.no_grad():
            getattr(module, method)(x)
    finally:
        for h in handles:
            h.remove()
    return total // x.shape[0]


@torch.no_grad()
def run(
    batch: int,
    experts: list[int],
    threads: list[int],
    reps: int,
    hidden: int = 8,
    gaters: tuple[str, ...] = ("hash", "kmeans", "tree"),
    trunk: bool = True,
    progress: bool = True,
) -> list[dict]:
    from tqdm.auto import tqdm

    torch.manual_seed(0)
    x = torch.randn(batch, FEATURES)
    net = Trunk(10, width=16, hidden=hidden, embed=64, tiles=True).eval()
    images = torch.rand(min(batch, 1000), 1, 56, 56)
    trunk_macs = module_macs(net, images[:8], "features") if trunk else 0
    fitted = {}
    for g in gaters:
        for E in experts:
            gater = ClusterGater(E, FEATURES, method=g, fit_rows=4000, n_init=1)
            gater.fit(x)
            fitted[g, E] = gater.eval()
    moes = {
        key: HardMoE(gater, GroupedExperts(key[1], (FEATURES, hidden, 64)), nn.Linear(64, 10))
        for key, gater in fitted.items()
    }
    rows = []
    jobs = [(t, g, E) for t in threads for g in gaters for E in experts]
    trunk_us: dict[int, float] = {}
    warmed: set[int] = set()
    for t, g, E in tqdm(jobs, desc="infer bench", unit="config", disable=not progress):
        torch.set_num_threads(t)
        if t not in warmed:
            # a new thread count: one untimed pass over every model first, so that the first
            # configuration timed does not pay for the pool's start-up and the first allocations
            for m in moes.values():
                m(x)
            warmed.add(t)
        if trunk and t not in trunk_us:
            trunk_us[t] = _median_us(partial(net.features, images), images.shape[0], reps)
        gater = fitted[g, E]
        moe = moes[g, E].eval()
        routing = moe.routing(x)
        xs = ops.permute(x, routing)
        w = moe.experts.layers[0].weight
        row = {
            "threads": t,
            "gater": g,
            "num_experts": E,
            "gater_us_per_example": _median_us(partial(gater, x), batch, reps),
            "moe_us_per_example": _median_us(partial(moe, x), batch, reps),
            "grouped_mm_us_per_example": _median_us(
                partial(ops.grouped_mm, xs, w, routing.offs), batch, reps
            ),
            "dense_mm_us_per_example": _median_us(partial(torch.matmul, xs, w[0]), batch, reps),
            "gater_macs": gater.macs_per_example(),
            "expert_macs": GroupedExperts.macs_per_example((FEATURES, hidden, 64)),
            "decoder_macs": 64 * 10,
        }
        if trunk:
            row["trunk_us_per_example"] = trunk_us[t]
            row["pipeline_us_per_example"] = trunk_us[t] + row["moe_us_per_example"]
            row["trunk_macs"] = trunk_macs
        row["total_macs"] = sum(v for k, v in row.items() if k.endswith("_macs"))
        rows.append(row)
        tqdm.write(json.dumps(row))
    return rows


def plot(rows: list[dict], path: str) -> None:
    """Per thread count: the MoE head's and the gater's time per example against ``E`` (left
    axis, one colour per gater) and the MACs per example of gater + experts (right axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = sorted({r["threads"] for r in rows})
    fig, axes = plt.subplots(1, len(threads), figsize=(6.5 * len(threads), 4.2), squeeze=False)
    for ax, t in zip(axes[0], threads, strict=True):
        ax2 = ax.twinx()
        for i, g in enumerate(dict.fromkeys(r["gater"] for r in rows)):
            sel = [r for r in rows if r["threads"] == t and r["gater"] == g]
            E = [r["num_experts"] for r in sel]
            c = f"C{i}"
            ax.plot(
                E, [r["moe_us_per_example"] for r in sel], "o-", color=c, label=f"{g}: MoE head"
            )
            ax.plot(
                E, [r["gater_us_per_example"] for r in sel], "o--", color=c, label=f"{g}: gater"
            )
            macs = [r["gater_macs"] + r["expert_macs"] + r["decoder_macs"] for r in sel]
            ax2.plot(E, macs, "s:", color=c, alpha=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("experts E")
        ax.set_ylabel("µs per example (solid: MoE head, dashed: gater)")
        ax2.set_ylabel("MACs per example, head only (dotted)")
        ax.set_ylim(bottom=0)
        ax2.set_ylim(bottom=0)
        trunk = next((r.get("trunk_us_per_example") for r in rows if r["threads"] == t), None)
        title = f"{t} thread{'s' if t > 1 else ''}"
        if trunk:
            title += f" (trunk alone: {trunk:.0f} µs/example)"
        ax.set_title(title)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m moefast.hardmoe.infer_bench")
    p.add_argument("--out")
    p.add_argument("--batch", type=int, default=4000)
    p.add_argument("--experts", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--hidden", type=int, default=8, help="hidden width of the expert layers")
    p.add_argument(
        "--gaters",
        nargs="+",
        default=["hash", "kmeans", "tree"],
        choices=["hash", "kmeans", "tree"],
    )
    p.add_argument("--no-trunk", action="store_true", help="leave the trunk out of the timing")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--plot", help="write a plot (PNG, needs matplotlib) to this file")
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    rows = run(
        a.batch,
        a.experts,
        a.threads,
        a.reps,
        a.hidden,
        tuple(a.gaters),
        trunk=not a.no_trunk,
        progress=not a.no_progress,
    )
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        res = {
            "command": "python -m moefast.hardmoe.infer_bench " + " ".join(argv),
            "batch": a.batch,
            "expert_dims": [FEATURES, a.hidden, 64],
            "rows": rows,
        }
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    if a.plot:
        plot(rows, a.plot)


if __name__ == "__main__":
    main()
