"""Puts the sweeps of several ``python -m moefast.hardmoe`` result files side by side.

    python -m moefast.hardmoe.compare kmeans=docs/results/hardmoe_tiles.json \\
        tree=docs/results/hardmoe_tiles_tree.json --plot docs/img/hardmoe_gaters.png

Each argument is ``LABEL=FILE`` (or just ``FILE``, labelled by its gater). Prints one markdown
table (held-out precision@1, precision@2, mAP, validation precision@1, the gater's MACs per
example and the cluster sizes, per number of experts and file) and, with ``--plot``, draws
precision@1 (mean and standard deviation over the seeds) and the gater's MACs per example
against the number of experts, with the trunk's own head as a dashed line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(spec: str) -> tuple[str, dict]:
    """``LABEL=FILE`` or ``FILE`` -> (label, results)."""
    label, sep, path = spec.partition("=")
    if not sep:
        label, path = "", spec
    res = json.loads(Path(path).read_text())
    if "sweep" not in res:
        raise ValueError(f"{path}: not a hard-MoE result file (no 'sweep')")
    return label or res["sweep"][0]["gater"], res


def _pm(r: dict, key: str) -> str:
    std = r.get(f"{key}_std")
    return f"{r[key]:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def table(runs: list[tuple[str, dict]]) -> str:
    lines = [
        "| experts | gater | precision@1 | precision@2 | mAP | val precision@1 | gater MACs/example "
        "| cluster sizes (rows) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    sizes = sorted({r["num_experts"] for _, res in runs for r in res["sweep"]})
    for E in sizes:
        for label, res in runs:
            r = next((r for r in res["sweep"] if r["num_experts"] == E), None)
            if r is None:
                continue
            clusters = ""
            if "train_cluster_min" in r:
                clusters = f"{r['train_cluster_min']:,}–{r['train_cluster_max']:,}"
            lines.append(
                f"| {E} | {label} | {_pm(r, 'precision_at_1')} | {_pm(r, 'precision_at_k')} | "
                f"{_pm(r, 'mAP')} | {_pm(r, 'val_precision_at_1')} | "
                f"{r['gater_macs_per_example']:,} | {clusters} |"
            )
    return "\n".join(lines)


def plot(runs: list[tuple[str, dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (label, res) in enumerate(runs):
        sweep = sorted(res["sweep"], key=lambda r: r["num_experts"])
        E = [r["num_experts"] for r in sweep]
        p1 = [r["precision_at_1"] for r in sweep]
        err = [r.get("precision_at_1_std", 0.0) for r in sweep]
        ax.errorbar(E, p1, yerr=err, marker="o", capsize=3, color=f"C{i}", label=label)
        ax2.plot(E, [r["gater_macs_per_example"] for r in sweep], "s-", color=f"C{i}", label=label)
    base = runs[0][1].get("baseline", {}).get("precision_at_1")
    if base is not None:
        ax.axhline(base, ls="--", color="gray", label="trunk's own head")
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xlabel("experts E")
        a.legend(fontsize=8)
    ax.set_ylabel("held-out precision@1 (mean ± std over seeds)")
    ax2.set_ylabel("gater MACs per example")
    ax2.set_ylim(bottom=0)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m moefast.hardmoe.compare", description=__doc__)
    p.add_argument("results", nargs="+", help="LABEL=FILE or FILE")
    p.add_argument("--plot", help="write the comparison plot (PNG, needs matplotlib) here")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    runs = [load(s) for s in a.results]
    print(table(runs))
    if a.plot:
        plot(runs, a.plot)


if __name__ == "__main__":
    main()
