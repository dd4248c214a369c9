"""The CPU goals of the MoE layer (issue 5), measured side by side with the variants interleaved:
forward + backward, 4096 tokens, top-2, of a transformers Mixtral block (weights from N(0, 0.02))
run by moefast (``MoE.from_hf``), by transformers' "eager" and "grouped_mm" experts, and the
limit (the same FLOPs as dense torch.matmul GEMMs: ``T * k`` rows through the SwiGLU expert's two
GEMMs, forward and backward). ``moefast_nocache`` is moefast with its CPU output cache turned off
for the step (every large output then pays its first-touch page faults, like the other variants'
allocations); ``moefast_onednn`` is moefast with its AVX512-BF16 GEMM switched off (the expert
GEMMs then run as oneDNN matmuls; only bfloat16 differs); running the whole script under ``MALLOC_MMAP_MAX_=0`` (glibc keeps freed memory)
takes page faults out of every variant.

Each round times every variant once, in a rotating order, so that a slow spell of a shared
machine hits all of them alike; the ratios use the median over rounds (and, as a second view,
the fastest round of each variant). ``bench/test_bench_layer_goals.py`` is the same comparison as
pytest-benchmark figures, one variant after another.

    python bench/layer_goals.py --rounds 15 --out bench/results/layer-goals-interleaved.json
    python bench/layer_goals.py --replot bench/results/layer-goals-interleaved-bf16gemm*.json \
        --plot bench/results/layer-goals-bf16gemm.png   # a plot of saved runs, nothing timed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

SHAPES = {"mixtral-like": dict(d=512, h=1024, E=8), "64-small-experts": dict(d=512, h=128, E=64)}
GOALS = {
    "mixtral-like": "limit/moefast >= 0.90 and faster than eager",
    "64-small-experts": "eager/moefast >= 1.5",
}
T, K = 4096, 2


def variants(shape: str, dtype: torch.dtype):
    """name -> callable running one forward + backward and returning the detached output; shared
    with ``bench/test_bench_layer_goals.py``."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    import moefast.integrations.transformers as mh
    from moefast.nn import MoE

    mh.register()
    s = SHAPES[shape]
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

    def run(module):
        # A training step's backward: gradients start unset (optimizer.zero_grad() sets them to
        # None), so none of the variants pays for accumulating into old gradients.
        x.grad = None
        module.zero_grad(set_to_none=True)
        y = module(x)
        y = y[0] if isinstance(y, tuple) else y
        y.backward(torch.ones_like(y))
        return y.detach()

    def hf(impl):
        def f():
            cfg._experts_implementation = impl
            return run(block)

        return f

    a = torch.randn(T * K, s["d"], dtype=dtype, requires_grad=True)
    w1 = torch.randn(s["d"], 2 * s["h"], dtype=dtype, requires_grad=True)
    w2 = torch.randn(s["h"], s["d"], dtype=dtype, requires_grad=True)

    def limit():
        a.grad = w1.grad = w2.grad = None
        y = (a @ w1)[:, : s["h"]] @ w2
        y.backward(torch.ones_like(y))
        return y.detach()

    def without_cache():
        # moefast with its CPU output cache off (csrc/cpu_cache.cpp): every large output is a
        # fresh allocation, paged in on first touch, as for the other variants.
        import moefast

        limit_bytes = moefast._C.cpu_cache_stats()["limit_bytes"]
        moefast._C.cpu_cache_set_limit(0)
        try:
            return run(moe)
        finally:
            moefast._C.cpu_cache_set_limit(limit_bytes)

    def onednn():
        # moefast with its AVX512-BF16 GEMM switched off (csrc/cpu/bf16_gemm_kernel.h): the
        # expert GEMMs are oneDNN matmuls and SwiGLU separate passes (float32 always runs so).
        import moefast

        moefast._C.set_cpu_bf16_gemm(False)
        try:
            return run(moe)
        finally:
            moefast._C.set_cpu_bf16_gemm(True)

    return {
        "moefast": lambda: run(moe),
        "moefast_nocache": without_cache,
        "moefast_onednn": onednn,
        "limit": limit,
        "hf_eager": hf("eager"),
        "hf_grouped_mm": hf("grouped_mm"),
    }


def measure(shape: str, dtype: torch.dtype, rounds: int, warmup: int = 2) -> dict:
    fns = variants(shape, dtype)
    names = list(fns)
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
        print(f"\r  {shape} {dtype}: round {r + 1}/{rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    med = {n: statistics.median(v) for n, v in times.items()}
    best = {n: min(v) for n, v in times.items()}
    return {
        "shape": shape,
        "dtype": str(dtype).replace("torch.", ""),
        **SHAPES[shape],
        "T": T,
        "k": K,
        "rounds": rounds,
        "goal": GOALS[shape],
        "median_s": med,
        "min_s": best,
        "times_s": times,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "limit_over_moefast": med["limit"] / med["moefast"],
        "limit_over_moefast_min": best["limit"] / best["moefast"],
        "limit_over_moefast_nocache": med["limit"] / med["moefast_nocache"],
        "limit_over_moefast_onednn": med["limit"] / med["moefast_onednn"],
        "eager_over_moefast": med["hf_eager"] / med["moefast"],
        "grouped_mm_over_moefast": med["hf_grouped_mm"] / med["moefast"],
    }


PLOT_VARIANTS = ("moefast", "moefast_onednn", "moefast_nocache", "hf_eager", "hf_grouped_mm")


def plot(runs: list[dict], path: str) -> None:
    """One panel per shape: limit / variant (median over rounds) for every variant and dtype,
    one marker per saved run, and the 0.90 goal as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for run in runs for r in run["results"]))
    dtypes = list(dict.fromkeys(r["dtype"] for run in runs for r in run["results"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.2), squeeze=False)
    width = 0.8 / len(PLOT_VARIANTS)
    for ax, shape in zip(axes[0], shapes, strict=True):
        for vi, variant in enumerate(PLOT_VARIANTS):
            xs, ys = [], []
            for di, dt in enumerate(dtypes):
                for run in runs:
                    for r in run["results"]:
                        med = r["median_s"]
                        if r["shape"] == shape and r["dtype"] == dt and variant in med:
                            xs.append(di + (vi - (len(PLOT_VARIANTS) - 1) / 2) * width)
                            ys.append(med["limit"] / med[variant])
            ax.scatter(xs, ys, s=28, label=variant, zorder=3)
        if shape == "mixtral-like":
            ax.axhline(0.9, color="k", ls="--", lw=1, label="goal: 0.90 of the limit")
        else:
            ax.text(
                0.02,
                0.97,
                "goal: moefast 1.5x faster than hf_eager",
                transform=ax.transAxes,
                va="top",
                fontsize=9,
            )
        ax.set_xticks(range(len(dtypes)), dtypes)
        ax.set_ylim(0, max(1.1, ax.get_ylim()[1]))
        ax.set_title(f"{shape}: forward + backward, T 4096, top-2")
        ax.set_ylabel("limit / variant (median time; 1 = dense GEMMs)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower left")
    dev = runs[0]["meta"]
    fig.suptitle(
        f"MoE layer goals, CPU ({dev['device']}, {dev['cpu_count']} threads, torch {dev['torch']}); "
        f"{len(runs)} interleaved run(s), one marker each",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--plot", help="draw limit / variant per shape and dtype into this PNG")
    p.add_argument(
        "--replot", nargs="+", metavar="JSON", help="plot these saved runs; time nothing"
    )
    args = p.parse_args(argv)
    if args.replot:
        if not args.plot:
            p.error("--replot needs --plot PNG")
        runs = []
        for name in args.replot:
            with open(name) as f:
                runs.append(json.load(f))
        plot(runs, args.plot)
        return
    results = []
    print(
        "shape             dtype     moefast   limit/moefast (min)   eager/moefast  "
        "grouped_mm/moefast  limit/moefast without its CPU cache  limit/moefast on oneDNN GEMMs"
    )
    for shape in args.shapes:
        for dt in args.dtypes:
            r = measure(shape, getattr(torch, dt), args.rounds)
            results.append(r)
            print(
                f"{shape:17s} {dt:9s} {r['median_s']['moefast'] * 1e3:6.0f} ms  "
                f"{r['limit_over_moefast']:.3f} ({r['limit_over_moefast_min']:.3f})        "
                f"{r['eager_over_moefast']:6.2f}x        {r['grouped_mm_over_moefast']:6.2f}x"
                f"             {r['limit_over_moefast_nocache']:.3f}"
                f"                        {r['limit_over_moefast_onednn']:.3f}",
                flush=True,
            )
    meta = {
        "device": platform.processor() or platform.machine(),
        "cpu_count": torch.get_num_threads(),
        "torch": torch.__version__,
        "command": "python bench/layer_goals.py " + " ".join(argv or sys.argv[1:]),
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    if args.plot:
        plot([{"meta": meta, "results": results}], args.plot)


if __name__ == "__main__":
    main()
