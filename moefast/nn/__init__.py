"""Drop-in ``torch.nn`` layers built on the moefast ops."""

from .expert_parallel import ExpertParallelMoE
from .moe import ACTIVATIONS, GroupedLinear, MoE

__all__ = ["ACTIVATIONS", "ExpertParallelMoE", "GroupedLinear", "MoE"]
