"""Adaptive fusion of pretrained representations, end to end.

    python -m moefast.fusion [--quick] [--datasets fashion-mnist mnist] [--seeds 3]
                             [--out results.json] [--markdown tables.md] [--plot gate.png]

Extracts (and caches) the features of every frozen backbone on every data set, runs the
motivation study, trains the baselines and the adaptive fusion on the same splits, prints the
tables, and writes the results JSON (``best_single``, ``uniform_average``, ``concatenation``,
``adaptive_fusion``, ... per data set and averaged over data sets).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

from . import data as dd
from .experiment import run_dataset
from .report import markdown, plot_gate

SUMMARY_KEYS = (
    "best_single",
    "concatenation",
    "uniform_average",
    "uniform_average_logit",
    "static_weights",
    "static_weights_logit",
    "adaptive_fusion",
    "adaptive_fusion_logit",
    "label_embedding_best_single",
    "label_embedding_uniform",
    "label_embedding_adaptive",
    "oracle_any_single",
)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m moefast.fusion", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small run, under 5 minutes on 2 cores")
    p.add_argument("--datasets", nargs="+", default=None, choices=dd.DATASETS)
    p.add_argument("--n", type=int, default=None, help="images per data set (random subset)")
    p.add_argument("--seeds", type=int, default=None, help="splits / initialisations")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--effnet-size", type=int, default=None, help="EfficientNet input pixels")
    p.add_argument("--cache-dir", default=None, help="feature cache (~/.cache/moefast/fusion)")
    p.add_argument("--no-label-embedding", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--out", default=None, help="write the results JSON here")
    p.add_argument("--markdown", default=None, help="write the markdown tables here")
    p.add_argument("--plot", default=None, help="write the gate-weights-by-class plot here")
    args = p.parse_args(argv)

    quick = args.quick
    n = args.n if args.n is not None else (1000 if quick else 4000)
    seeds = args.seeds if args.seeds is not None else (1 if quick else 3)
    epochs = args.epochs if args.epochs is not None else (15 if quick else 30)
    size = args.effnet_size if args.effnet_size is not None else (32 if quick else 64)
    if args.threads:
        torch.set_num_threads(args.threads)
    datasets = args.datasets
    if datasets is None:
        datasets = [d for d in ("fashion-mnist", "mnist") if dd.available(d)]
        if len(datasets) < 2:
            datasets.append("digits")
    t0 = time.time()
    results = {
        "command": "python -m moefast.fusion " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {
            "quick": quick,
            "images_per_dataset": n,
            "seeds": seeds,
            "epochs": epochs,
            "effnet_size": size,
            "split": "stratified 60/20/20 train/val/test per seed",
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "datasets": {},
    }
    for d in datasets:
        print(f"== {d}", flush=True)
        results["datasets"][d] = run_dataset(
            d,
            n,
            seeds,
            epochs,
            size,
            cache=args.cache_dir,
            use_label_embedding=not args.no_label_embedding,
        )
        m = results["datasets"][d]["methods"]
        for k in ("best_single", "uniform_average", "concatenation", "adaptive_fusion"):
            print(f"  {k:>16}: {100 * m[k]['accuracy']:.2f}%", flush=True)
    for k in SUMMARY_KEYS:
        per = {
            d: r["methods"][k]["accuracy"]
            for d, r in results["datasets"].items()
            if k in r["methods"]
        }
        if per:
            results[k] = {"accuracy": float(np.mean(list(per.values()))), "per_dataset": per}
    results["seconds"] = round(time.time() - t0, 1)
    md = markdown(results)
    print(md)
    print(f"total {results['seconds']} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)
    if args.plot:
        plot_gate(results, args.plot)
    return results


if __name__ == "__main__":
    main()
