"""Multilabel ranking metrics: precision@k and mean average precision (macro over labels)."""

from __future__ import annotations

import torch
from torch import Tensor


def precision_at_k(scores: Tensor, targets: Tensor, k: int) -> float:
    """Mean over examples of (true labels among the ``k`` top-scored labels) / ``k``."""
    if scores.shape != targets.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and targets {tuple(targets.shape)} differ")
    top = scores.topk(k, dim=1).indices
    return float(targets.gather(1, top).gt(0).float().sum(1).div(k).mean())


def average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """Average precision of each label (column) over the examples, ``[L]``; NaN for a label with
    no positive example."""
    order = scores.argsort(dim=0, descending=True)
    rel = targets.gt(0).float().gather(0, order)
    hits = rel.cumsum(0)
    ranks = torch.arange(1, rel.shape[0] + 1, dtype=torch.float32).unsqueeze(1)
    npos = rel.sum(0)
    ap = (hits / ranks * rel).sum(0) / npos
    return torch.where(npos > 0, ap, torch.full_like(ap, float("nan")))


def mean_average_precision(scores: Tensor, targets: Tensor) -> float:
    """Macro mean of :func:`average_precision` over the labels that have a positive example."""
    ap = average_precision(scores.float(), targets)
    return float(ap[~ap.isnan()].mean())


def evaluate(scores: Tensor, targets: Tensor, k: int = 2) -> dict[str, float]:
    """``precision_at_1``, ``precision_at_k`` (with ``k``) and ``mAP``."""
    return {
        "precision_at_1": precision_at_k(scores, targets, 1),
        "precision_at_k": precision_at_k(scores, targets, k),
        "k": k,
        "mAP": mean_average_precision(scores, targets),
    }
