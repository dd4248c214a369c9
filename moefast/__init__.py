"""moefast: fast mixture-of-experts kernels for PyTorch.

The functional API (see DESIGN.md): :func:`route`, :func:`routing_from_ids`, :class:`Routing`,
:func:`permute`, :func:`grouped_mm`, :func:`unpermute`, :func:`mixture`,
:func:`load_balancing_loss` and :func:`z_loss`, backed by the ``torch.ops.moefast`` custom ops of
the native extension ``moefast._C``. Plain-PyTorch versions of every op are in
:mod:`moefast.reference`.
"""

import torch  # noqa: F401  (loads libtorch, which moefast._C links against)

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(
        "moefast's native extension moefast._C is not built or does not match the installed "
        "torch. Build it with `pip install --no-build-isolation -e .` (or `make test`)."
    ) from exc

from .ops import (
    ROUTER_MODES,
    Routing,
    apply_capacity,
    grouped_mm,
    grouped_mm_act,
    grouped_swiglu_mlp,
    load_balancing_loss,
    mixture,
    permute,
    route,
    routing_from_ids,
    swiglu,
    tree_route,
    unpermute,
    z_loss,
)

__version__ = _C.__version__

__all__ = [
    "ROUTER_MODES",
    "Routing",
    "__version__",
    "apply_capacity",
    "grouped_mm",
    "grouped_mm_act",
    "grouped_swiglu_mlp",
    "load_balancing_loss",
    "mixture",
    "permute",
    "route",
    "routing_from_ids",
    "swiglu",
    "tree_route",
    "unpermute",
    "z_loss",
]
