"""Drop-in ``torch.nn`` layers built on the moefast ops."""

from .expert_parallel import ExpertParallelMoE
from .fusion import AdaptiveFusion, LabelEmbeddingHead, ThumbnailGate
from .moe import ACTIVATIONS, GroupedLinear, MoE

__all__ = [
    "ACTIVATIONS",
    "AdaptiveFusion",
    "ExpertParallelMoE",
    "GroupedLinear",
    "LabelEmbeddingHead",
    "MoE",
    "ThumbnailGate",
]
