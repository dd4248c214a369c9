"""Drop-in ``torch.nn`` layers built on the moefast ops."""

from .moe import ACTIVATIONS, GroupedLinear, MoE

__all__ = ["ACTIVATIONS", "GroupedLinear", "MoE"]
