"""Hard mixtures of experts (Gross, Ranzato, Szlam, CVPR 2017) on moefast's grouped kernels.

A trunk CNN's features are clustered; each example goes to exactly one expert; every expert is
trained only on its cluster, independently of the others (in parallel under ``torchrun``), and
all experts share one frozen decoder taken from the trunk's head. At inference
:class:`HardMoE` routes with :func:`moefast.routing_from_ids` through permute -> grouped expert
layers -> unpermute in one batched pass. ``python -m moefast.hardmoe`` runs the whole study.
"""

from .metrics import evaluate, mean_average_precision, precision_at_k
from .model import (
    GATERS,
    ClusterGater,
    GroupedExperts,
    HardMoE,
    ModuleExperts,
    TileFeatureBank,
    Trunk,
    balanced_assignment,
)
from .train import (
    assemble_experts,
    missing_experts,
    owned_experts,
    planned_steps,
    train_experts_worker,
    train_one_expert,
    train_trunk,
    write_prep,
)

__all__ = [
    "GATERS",
    "ClusterGater",
    "GroupedExperts",
    "HardMoE",
    "ModuleExperts",
    "TileFeatureBank",
    "Trunk",
    "assemble_experts",
    "balanced_assignment",
    "evaluate",
    "mean_average_precision",
    "missing_experts",
    "owned_experts",
    "planned_steps",
    "precision_at_k",
    "train_experts_worker",
    "train_one_expert",
    "train_trunk",
    "write_prep",
]
