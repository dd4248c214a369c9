"""Markdown tables and the gate-weights plot from a results dictionary (see ``experiment``)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

METHOD_ROWS = (
    ("best_single", "best single representation (picked on validation)"),
    ("concatenation", "feature concatenation"),
    ("uniform_average", "uniform average of the experts, prob"),
    ("uniform_average_logit", "uniform average of the experts, logit"),
    ("static_weights", "learned input-independent weights, prob"),
    ("static_weights_logit", "learned input-independent weights, logit"),
    ("adaptive_fusion", "**adaptive fusion (thumbnail gate), prob**"),
    ("adaptive_fusion_logit", "adaptive fusion (thumbnail gate), logit"),
    ("label_embedding_best_single", "label embedding: best single"),
    ("label_embedding_uniform", "label embedding: uniform average"),
    ("label_embedding_adaptive", "label embedding: adaptive fusion"),
    ("oracle_any_single", "oracle: at least one single expert right (bound)"),
)


def _pct(entry) -> str:
    if entry is None:
        return "–"
    return f"{100 * entry['accuracy']:.2f} ± {100 * entry['std']:.2f}"


def accuracy_table(results: dict) -> str:
    ds = list(results["datasets"])
    lines = ["| method | " + " | ".join(ds) + " |", "|---|" + "---:|" * len(ds)]
    singles = []
    for d in ds:
        for k in results["datasets"][d]["methods"]:
            if k.startswith("single:") and k not in singles:
                singles.append(k)
    rows = [(k, f"single: {k.split(':', 1)[1]}") for k in singles] + list(METHOD_ROWS)
    for key, label in rows:
        cells = [_pct(results["datasets"][d]["methods"].get(key)) for d in ds]
        if all(c == "–" for c in cells):
            continue
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def agreement_table(res: dict) -> str:
    st = res["study"]
    names = [e["name"] for e in res["experts"]]
    lines = [
        "| pair | agree | at least one right |",
        "|---|---:|---:|",
    ]
    for k, v in st["agreement"].items():
        lines.append(
            f"| {k.replace(' | ', ' vs ')} | {100 * v:.2f} | {100 * st['either_right'][k]:.2f} |"
        )
    lines.append(
        f"| all {len(names)} experts | – | {100 * st['any_right']:.2f} (all right: "
        f"{100 * st['all_right']:.2f}) |"
    )
    return "\n".join(lines)


CLAIM_PAIRS = (
    ("adaptive_fusion", "best_single"),
    ("adaptive_fusion", "uniform_average"),
    ("adaptive_fusion", "uniform_average_logit"),
    ("adaptive_fusion", "static_weights"),
    ("adaptive_fusion", "concatenation"),
    ("adaptive_fusion_logit", "best_single"),
    ("adaptive_fusion_logit", "uniform_average_logit"),
    ("adaptive_fusion_logit", "uniform_average"),
    ("adaptive_fusion_logit", "static_weights_logit"),
)


def paired_difference(a: list[float], b: list[float]) -> dict:
    """Seed-paired comparison of two methods' test accuracies (both runs share each seed's split):
    the mean difference ``a - b`` and its standard error, wins and ties, and the two-sided p-value
    of an exact sign-flip (paired permutation) test of "no difference". With ``n`` seeds the
    smallest possible p-value is ``2 / 2**n``; exact over all ``2**n`` sign patterns up to 16
    seeds, over 2**16 random ones beyond."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} vs {len(b)} seeds")
    d = [x - y for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean = sum(d) / n if n else 0.0
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else float("nan")
    observed = abs(sum(d))
    if n <= 16:
        signs = itertools.product((1.0, -1.0), repeat=n)
        total = 2**n
    else:
        import random

        rng = random.Random(0)
        total = 2**16
        signs = ([rng.choice((1.0, -1.0)) for _ in range(n)] for _ in range(total))
    extreme = sum(
        abs(sum(s * x for s, x in zip(sg, d, strict=True))) >= observed - 1e-12 for sg in signs
    )
    return {
        "n": n,
        "mean_diff": mean,
        "se": se,
        "wins": sum(x > 0 for x in d),
        "ties": sum(x == 0 for x in d),
        "p_sign_flip": extreme / total,
    }


def claims(results: dict) -> list[str]:
    """Adaptive fusion (probabilities, then logits) against the baselines, per data set: mean
    test accuracy, on how many seeds it is strictly higher (ties count as not higher), and the
    seed-paired difference with its standard error and sign-flip p-value."""
    out = []
    for d, res in results["datasets"].items():
        m = res["methods"]
        for key, base in CLAIM_PAIRS:
            if key not in m or base not in m:
                continue
            a, b = m[key], m[base]
            pd = paired_difference(a["per_seed"], b["per_seed"])
            verdict = "beats" if a["accuracy"] > b["accuracy"] else "does NOT beat"
            out.append(
                f"{d}: {key} {100 * a['accuracy']:.2f} vs {base} {100 * b['accuracy']:.2f}: "
                f"{verdict} (higher on {pd['wins']}/{pd['n']} seeds, tied on {pd['ties']}; "
                f"paired difference {100 * pd['mean_diff']:+.2f} ± {100 * pd['se']:.2f} points, "
                f"sign-flip p = {pd['p_sign_flip']:.3g})"
            )
    return out


def selection_table(results: dict) -> str:
    """The epoch (and loss temperature) validation chose for each learned mixture, per seed
    (epoch 0 = the uniform mixture)."""
    ds = list(results["datasets"])
    lines = ["| mixture | " + " | ".join(ds) + " |", "|---|" + "---:|" * len(ds)]
    for key, label in METHOD_ROWS:
        cells = []
        for d in ds:
            e = results["datasets"][d]["methods"].get(key, {})
            if "epoch_per_seed" not in e:
                cells.append("")
                continue
            ts = e.get("loss_temperature_per_seed", [None] * len(e["epoch_per_seed"]))
            cells.append(
                ", ".join(
                    f"{x}" if t is None else f"{x} (T={t:g})"
                    for x, t in zip(e["epoch_per_seed"], ts, strict=True)
                )
            )
        if key.startswith("uniform") or not any(cells):
            continue
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    parts = ["### Held-out accuracy (%), mean ± std over seeds", "", accuracy_table(results), ""]
    for d, res in results["datasets"].items():
        parts += [f"### Motivation study: {d} (test split, mean over seeds)", ""]
        parts += [
            "| expert | pretrained on | accuracy |",
            "|---|---|---:|",
        ]
        for e in res["experts"]:
            acc = res["study"]["accuracy"][e["name"]]
            parts.append(f"| {e['name']} | {e['source']} | {100 * acc:.2f} |")
        parts += ["", agreement_table(res), ""]
    parts += [
        "### Epoch (loss temperature T) chosen on validation, per seed (epoch 0 = kept the uniform mixture)",
        "",
        selection_table(results),
        "",
    ]
    parts += ["### Claims", ""] + [f"- {c}" for c in claims(results)]
    return "\n".join(parts) + "\n"


def plot_gate(results: dict, path: str | Path, mix: str = "prob") -> None:
    """Mean gate weight of each expert by true class, one panel per data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ds = [d for d in results["datasets"] if mix in results["datasets"][d]["gate_by_class"]]
    fig, axes = plt.subplots(1, len(ds), figsize=(6 * len(ds), 4.2), squeeze=False)
    for ax, d in zip(axes[0], ds, strict=True):
        res = results["datasets"][d]
        w = np.array(res["gate_by_class"][mix])  # [C, E]
        names = [e["name"] for e in res["experts"]]
        bottom = np.zeros(w.shape[0])
        for e, n in enumerate(names):
            ax.bar(range(w.shape[0]), w[:, e], bottom=bottom, label=n)
            bottom += w[:, e]
        ax.set_xticks(range(w.shape[0]))
        ax.set_xticklabels(res["class_names"], rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("mean gate weight (test split)")
        ax.set_title(f"{d}: gate weights by class ({mix} mixing)")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
