"""The functional API of moefast: routing, dispatch, grouped GEMM, combine, mixture and losses.

Every function checks its arguments (shapes, dtypes, devices) and raises ``ValueError`` or
``TypeError`` naming the argument at fault, then calls a ``torch.ops.moefast`` custom op. The ops
are registered in C++ (``csrc/ops.cpp``); this module gives them fake kernels, so that
``torch.compile(fullgraph=True)`` traces them, and autograd, registered once per op with
``torch.library.register_autograd``.

Conventions (see DESIGN.md):

- ``T`` tokens, ``E`` experts, ``k`` experts per token; a *slot* is the flat index ``t * k + j``
  of the ``j``-th choice of token ``t``.
- ``offs`` is the int32 vector of cumulative row ends per expert, as in ``torch._grouped_mm``:
  expert ``e`` owns rows ``offs[e-1]:offs[e]`` of the permuted tensor.
- The permuted tensor always has ``T * k`` rows, grouped by expert in ascending expert order and,
  inside one expert, in slot order (the order is stable, whatever the number of threads).
- Softmax runs in float32 for float16/bfloat16 inputs; float64 stays float64.

Nothing here reads a device value on the host, so a pipeline on the GPU never synchronises.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loading the extension registers torch.ops.moefast)

__all__ = [
    "GEMM_ACTIVATIONS",
    "ROUTER_MODES",
    "Routing",
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

try:  # NVTX ranges name every op in an Nsight profile; optional, and free without a profiler.
    import nvtx as _nvtx
except ImportError:  # pragma: no cover
    _nvtx = None

ROUTER_MODES = ("softmax_topk", "topk_softmax", "hard", "dense")
GEMM_ACTIVATIONS = ("none", "relu", "gelu", "silu", "swiglu")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_ops = torch.ops.moefast


class Routing(NamedTuple):
    """Where each token goes and with what weight; made by :func:`route` or :func:`routing_from_ids`.

    A tuple of tensors, so it passes through ``torch.compile`` and can be saved or moved as is.

    Fields:
        expert_ids: ``[T, k]`` int32, the experts picked for each token.
        weights: ``[T, k]``, the combine weight of each pick (differentiable when made by
            :func:`route` from logits that require grad).
        offs: ``[E]`` int32, cumulative row ends per expert in the permuted tensor.
        counts: ``[E]`` int32, rows (token slots) per expert.
        position: ``[T, k]`` int32, the permuted row that holds slot ``(t, j)``.
        order: ``[T * k]`` int32, the slot held by each permuted row (the inverse of
            ``position``); ``order // k`` is the token of each row.
    """

    expert_ids: Tensor
    weights: Tensor
    offs: Tensor
    counts: Tensor
    position: Tensor
    order: Tensor


# ----------------------------------------------------------------------------- argument checks


def _check_tensor(op: str, name: str, t, dim: int, shape: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"moefast.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(
            f"moefast.{op}: {name} must be {dim}-D {shape}, got shape {tuple(t.shape)}"
        )


def _check_float(op: str, name: str, t: Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"moefast.{op}: {name} must be float32, float64, bfloat16 or float16, got {t.dtype}"
        )


def _check_device(op: str, name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.device != b.device:
        raise ValueError(
            f"moefast.{op}: {name_a} and {name_b} must be on the same device, "
            f"got {a.device} and {b.device}"
        )


def _check_routing(op: str, routing) -> None:
    if not isinstance(routing, Routing):
        raise TypeError(
            f"moefast.{op}: routing must be a moefast.Routing (from route or routing_from_ids), "
            f"got {type(routing).__name__}"
        )


def _check_weights(op: str, weights: Tensor, position: Tensor) -> None:
    _check_tensor(op, "weights", weights, 2, "[T, k]")
    _check_float(op, "weights", weights)
    _check_device(op, "weights", weights, "routing", position)
    if weights.shape != position.shape:
        raise ValueError(
            f"moefast.{op}: weights must be [T, k] = {tuple(position.shape)}, "
            f"got {tuple(weights.shape)}"
        )


def _range(name: str):
    """An NVTX range named ``moefast.<name>`` around an op (none while torch.compile traces)."""
    if _nvtx is None or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _nvtx.annotate(f"moefast.{name}", domain="moefast")


def _autocast_enabled(device: torch.device) -> bool:
    # torch.is_autocast_enabled raises for device types without autocast (meta, for one).
    return device.type in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(device.type)


# ----------------------------------------------------------------------------- public API


def route(
    logits: Tensor, k: int, *, mode: str = "softmax_topk", normalize: bool = False
) -> Routing:
    """Routes ``T`` tokens to ``k`` of ``E`` experts each, from router logits ``[T, E]``.

    Modes:
        - ``"softmax_topk"``: softmax over all ``E``, keep the ``k`` largest; with
          ``normalize=True`` the kept weights are divided by their sum.
        - ``"topk_softmax"``: pick the ``k`` largest logits, softmax over those ``k``.
        - ``"hard"``: the arg-max expert with weight 1 and no gradient to the logits; ``k == 1``.
        - ``"dense"``: every expert, in index order, weights softmax over all ``E``; ``k == E``.

    The top-k ranks by logit, larger first; equal logits go to the lower expert index, and NaN
    ranks above every number. Weights come in ``logits.dtype`` (softmax in float32 for 16-bit
    inputs) and are differentiable except in mode ``"hard"``.
    """
    op = "route"
    _check_tensor(op, "logits", logits, 2, "[T, E]")
    _check_float(op, "logits", logits)
    if mode not in ROUTER_MODES:
        raise ValueError(f"moefast.route: mode must be one of {ROUTER_MODES}, got {mode!r}")
    E = logits.shape[1]
    if E < 1:
        raise ValueError(
            f"moefast.route: logits must have at least one expert column, got shape {tuple(logits.shape)}"
        )
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"moefast.route: k must be an int, got {type(k).__name__}")
    if not 1 <= k <= E:
        raise ValueError(f"moefast.route: k must be in [1, E] = [1, {E}], got k={k}")
    if mode == "hard" and k != 1:
        raise ValueError(f"moefast.route: mode 'hard' needs k == 1, got k={k}")
    if mode == "dense" and k != E:
        raise ValueError(f"moefast.route: mode 'dense' needs k == E == {E}, got k={k}")
    with _range("route"):
        weights, expert_ids = _ops.router(logits, k, mode, bool(normalize))
        counts, offs, position, order = _ops.routing_plan(expert_ids, E)
    return Routing(expert_ids, weights, offs, counts, position, order)


def routing_from_ids(
    expert_ids: Tensor, num_experts: int, weights: Tensor | None = None
) -> Routing:
    """A :class:`Routing` for assignments made elsewhere (k-means clusters, hashes, a policy).

    ``expert_ids`` is ``[T, k]`` (or ``[T]``, taken as ``k = 1``) of int32 or int64 ids in
    ``[0, num_experts)``; ``weights`` is ``[T, k]`` and defaults to ``1 / k`` in float32.
    """
    op = "routing_from_ids"
    if isinstance(expert_ids, Tensor) and expert_ids.dim() == 1:
        expert_ids = expert_ids.unsqueeze(1)
    _check_tensor(op, "expert_ids", expert_ids, 2, "[T, k]")
    if expert_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"moefast.routing_from_ids: expert_ids must be int32 or int64, got {expert_ids.dtype}"
        )
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(
            f"moefast.routing_from_ids: num_experts must be a positive int, got {num_experts!r}"
        )
    T, k = expert_ids.shape
    if k < 1:
        raise ValueError("moefast.routing_from_ids: expert_ids needs at least one column (k >= 1)")
    if expert_ids.dtype == torch.int64:
        # Clamp before narrowing, so that an id outside int32 cannot wrap onto a valid expert: it
        # stays out of range and the plan rejects it (CPU) or drops it past offs[-1] (CUDA).
        expert_ids = expert_ids.clamp(-(2**31), 2**31 - 1)
    ids = expert_ids.to(torch.int32).contiguous()
    if weights is None:
        weights = torch.full((T, k), 1.0 / k, dtype=torch.float32, device=ids.device)
    else:
        _check_weights(op, weights, ids)
    with _range("routing_plan"):
        counts, offs, position, order = _ops.routing_plan(ids, num_experts)
    return Routing(ids, weights, offs, counts, position, order)


def apply_capacity(routing: Routing, capacity: int) -> Routing:
    """Limits every expert to ``capacity`` token slots; the slots over the limit are dropped.

    Drop policy: inside one expert, first choices (``j = 0``) of all tokens come before second
    choices, and so on; inside one choice rank, earlier tokens come first. An expert keeps the
    first ``capacity`` slots in that priority order. A dropped slot's weight becomes 0 (the
    remaining weights of its token are not renormalised), so it adds nothing to its token's output,
    and its permuted row moves past ``offs[-1]``, where :func:`grouped_mm` computes nothing. The
    permuted tensor still has ``T * k`` rows; ``counts`` and ``offs`` count the kept rows only.
    Runs on the device with no host synchronisation.
    """
    _check_routing("apply_capacity", routing)
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
        raise ValueError(
            f"moefast.apply_capacity: capacity must be a non-negative int, got {capacity!r}"
        )
    T, k = routing.expert_ids.shape
    E = routing.offs.shape[0]
    n = T * k
    slots = routing.expert_ids.reshape(-1).long()
    # Rank of each slot inside its expert in (choice, token) priority order: the plan of the
    # transposed ids lists the slots of an expert in exactly that order.
    _, _, by_choice, _ = _ops.routing_plan(routing.expert_ids.t().contiguous(), E)
    begin = (routing.offs - routing.counts).long()
    rank = by_choice.t().reshape(-1).long() - begin[slots]
    keep_slot = rank < capacity
    order = routing.order.long()
    keep_row = keep_slot[order].long()
    kept_before = torch.cumsum(keep_row, 0) - keep_row
    rows = torch.arange(n, device=slots.device)
    # Kept rows close up in the same (expert, slot) order; dropped rows follow them.
    new_row = torch.where(keep_row.bool(), kept_before, keep_row.sum() + rows - kept_before)
    position = new_row[routing.position.reshape(-1).long()]
    new_order = torch.empty_like(order).scatter_(0, new_row, order)
    counts = routing.counts.clamp(max=capacity)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    weights = torch.where(keep_slot.view(T, k), routing.weights, 0)
    return Routing(
        routing.expert_ids,
        weights,
        offs,
        counts,
        position.to(torch.int32).view(T, k),
        new_order.to(torch.int32),
    )


def permute(x: Tensor, routing: Routing) -> Tensor:
    """Copies each token's row to its ``k`` slots, grouped by expert: ``[T, d] -> [T * k, d]``.

    Row ``routing.position[t, j]`` of the result is ``x[t]``; rows ``offs[e-1]:offs[e]`` are the
    tokens of expert ``e`` in (token, slot) order.
    """
    op = "permute"
    _check_routing(op, routing)
    _check_tensor(op, "x", x, 2, "[T, d]")
    _check_float(op, "x", x)
    _check_device(op, "x", x, "routing", routing.position)
    if x.shape[0] != routing.position.shape[0]:
        raise ValueError(
            f"moefast.permute: x has {x.shape[0]} rows but the routing has "
            f"T = {routing.position.shape[0]} tokens"
        )
    with _range("permute"):
        return _ops.permute(x, routing.position, None)


def unpermute(y: Tensor, routing: Routing, weights: Tensor | None = None) -> Tensor:
    """Combines expert outputs back into tokens: ``out[t] = sum_j w[t, j] * y[position[t, j]]``.

    ``y`` is ``[T * k, d]`` in the permuted order; ``w`` is ``routing.weights`` unless ``weights``
    is given. The sum runs in float32 for 16-bit ``y``. Gradients flow to ``y`` and to the weights
    (and from ``routing.weights`` on to the router logits).
    """
    op = "unpermute"
    _check_routing(op, routing)
    _check_tensor(op, "y", y, 2, "[T * k, d]")
    _check_float(op, "y", y)
    _check_device(op, "y", y, "routing", routing.position)
    n = routing.position.shape[0] * routing.position.shape[1]
    if y.shape[0] != n:
        raise ValueError(f"moefast.unpermute: y must have T * k = {n} rows, got {y.shape[0]}")
    w = routing.weights if weights is None else weights
    _check_weights(op, w, routing.position)
    with _range("unpermute"):
        return _ops.unpermute(y, routing.position, w)


def _check_grouped_mm(op: str, a: Tensor, b: Tensor, offs: Tensor, bias: Tensor | None) -> None:
    _check_tensor(op, "a", a, 2, "[N, K]")
    _check_tensor(op, "b", b, 3, "[E, K, M]")
    _check_tensor(op, "offs", offs, 1, "[E]")
    _check_float(op, "a", a)
    autocast = _autocast_enabled(a.device)  # casts a, b and bias to one dtype
    if b.dtype != a.dtype and not autocast:
        raise TypeError(f"moefast.{op}: a and b must share a dtype, got {a.dtype} and {b.dtype}")
    if offs.dtype != torch.int32:
        raise TypeError(f"moefast.{op}: offs must be int32, got {offs.dtype}")
    _check_device(op, "a", a, "b", b)
    _check_device(op, "a", a, "offs", offs)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"moefast.{op}: a [N, K] and b [E, K, M] must agree on K, "
            f"got a {tuple(a.shape)} and b {tuple(b.shape)}"
        )
    if offs.shape[0] != b.shape[0]:
        raise ValueError(
            f"moefast.{op}: offs must have one entry per group, E = {b.shape[0]}, "
            f"got {offs.shape[0]}"
        )
    if bias is not None:
        _check_tensor(op, "bias", bias, 2, "[E, M]")
        if bias.shape != (b.shape[0], b.shape[2]):
            raise ValueError(
                f"moefast.{op}: bias must be [E, M] = [{b.shape[0]}, {b.shape[2]}], "
                f"got {tuple(bias.shape)}"
            )
        _check_device(op, "a", a, "bias", bias)
        if bias.dtype != a.dtype and not autocast:
            raise TypeError(
                f"moefast.{op}: bias must have the dtype of a, {a.dtype}, got {bias.dtype}"
            )


def grouped_mm(a: Tensor, b: Tensor, offs: Tensor, bias: Tensor | None = None) -> Tensor:
    """Grouped matrix product, ``torch._grouped_mm``'s 2D x 3D contract.

    ``a [N, K]``, ``b [E, K, M]``, ``offs [E]`` int32 cumulative row ends: rows
    ``offs[e-1]:offs[e]`` of the result are those rows of ``a`` times ``b[e]``; rows past
    ``offs[-1]`` are zero. ``offs`` must be non-decreasing with ``offs[-1] <= N``. An optional
    ``bias [E, M]`` adds ``bias[e]`` to the rows of group ``e`` in the same pass (not to the rows
    past ``offs[-1]``). Differentiable in ``a``, ``b`` and ``bias``; an expert with no rows gets a
    zero gradient. Under ``torch.autocast`` it runs in the autocast dtype, like ``torch.matmul``.
    """
    _check_grouped_mm("grouped_mm", a, b, offs, bias)
    with _range("grouped_mm"):
        return _ops.grouped_mm(a, b, offs, bias)


def grouped_mm_act(
    a: Tensor, b: Tensor, offs: Tensor, bias: Tensor | None = None, activation: str = "silu"
) -> Tensor:
    """:func:`grouped_mm` followed by an activation, fused into the GEMM's epilogue on CUDA.

    ``activation`` is one of :data:`GEMM_ACTIVATIONS`: ``relu``, ``gelu`` (exact, erf), ``silu``,
    ``none``, or ``swiglu``, which reads the ``[gate | up]`` halves of a ``2H``-wide product and
    returns ``silu(gate) * up`` of width ``H``. On CUDA, relu, gelu and silu (and the bias) are
    applied in the epilogue, so the pre-activation never goes to memory; swiglu runs as one more
    pass over the product. Rows past ``offs[-1]`` are ``act(0) = 0``. The backward recomputes
    the pre-activation with one more grouped GEMM instead of keeping it (activation
    checkpointing), so the fused form suits inference and memory-bound training.
    """
    op = "grouped_mm_act"
    if activation not in GEMM_ACTIVATIONS:
        raise ValueError(
            f"moefast.{op}: activation must be one of {GEMM_ACTIVATIONS}, got {activation!r}"
        )
    _check_grouped_mm(op, a, b, offs, bias)
    if activation == "swiglu" and b.shape[2] % 2 != 0:
        raise ValueError(
            f"moefast.{op}: swiglu needs an even number of output columns [gate | up], "
            f"got b {tuple(b.shape)}"
        )
    with _range(op):
        return _ops.grouped_mm_act(a, b, offs, bias, activation)


def swiglu(h: Tensor) -> Tensor:
    """SwiGLU of a ``[gate | up]`` product: ``silu(h[..., :H]) * h[..., H:]``, width ``H``.

    ``h [..., 2H]``, any leading shape, any float dtype; 16-bit inputs compute in float32. One
    pass forward and one backward, which writes the gradients of both halves straight into the
    ``[gate | up]`` layout (no ``chunk``/``cat``); the backward keeps ``h`` and recomputes the
    sigmoid. On x86-64 CPUs the float32 and bfloat16 loops use AVX-512, or else AVX2, chosen at
    run time.
    """
    op = "swiglu"
    if not isinstance(h, Tensor):
        raise TypeError(f"moefast.{op}: h must be a torch.Tensor, got {type(h).__name__}")
    _check_float(op, "h", h)
    if h.dim() < 1 or h.shape[-1] % 2 != 0:
        raise ValueError(
            f"moefast.{op}: the last dimension of h must be even, [gate | up], "
            f"got shape {tuple(h.shape)}"
        )
    with _range(op):
        return _ops.swiglu(h)


def grouped_swiglu_mlp(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    offs: Tensor,
) -> Tensor:
    """The SwiGLU expert MLP on rows grouped by expert:
    ``grouped_mm(swiglu(grouped_mm(x, w1, offs, b1)), w2, offs, b2)``.

    ``x [N, d]``, ``w1 [E, d, 2H]`` (``[gate | up]`` columns), ``b1 [E, 2H]`` or None,
    ``w2 [E, H, d]``, ``b2 [E, d]`` or None, ``offs [E]`` as in :func:`grouped_mm` -> ``[N, d]``.
    On the CPU (outside autocast) one op does it expert by expert: each expert's pre-activation
    becomes its activation while in cache, and the backward keeps each expert's activation and
    pre-activation gradients in a reused scratch buffer instead of two fresh ``[N, H]`` and
    ``[N, 2H]`` tensors per step, running the expert's five GEMMs back to back. The results are
    those of the composition up to rounding (the same GEMMs and SwiGLU loops). On CUDA the op is
    that composition of the CUDA kernels (sync-free), and under autocast the composition of the
    public functions, which cast.
    """
    op = "grouped_swiglu_mlp"
    _check_tensor(op, "x", x, 2, "[N, d]")
    _check_tensor(op, "w1", w1, 3, "[E, d, 2H]")
    _check_tensor(op, "w2", w2, 3, "[E, H, d]")
    _check_tensor(op, "offs", offs, 1, "[E]")
    _check_float(op, "x", x)
    if w1.shape[2] % 2 != 0:
        raise ValueError(
            f"moefast.{op}: w1 needs an even number of output columns [gate | up], "
            f"got w1 {tuple(w1.shape)}"
        )
    E, d, H = w1.shape[0], x.shape[1], w1.shape[2] // 2
    if w1.shape[1] != d:
        raise ValueError(
            f"moefast.{op}: x [N, d] and w1 [E, d, 2H] must agree on d, "
            f"got x {tuple(x.shape)} and w1 {tuple(w1.shape)}"
        )
    if tuple(w2.shape) != (E, H, d):
        raise ValueError(
            f"moefast.{op}: w2 must be [E, H, d] = [{E}, {H}, {d}] for w1 {tuple(w1.shape)}, "
            f"got {tuple(w2.shape)}"
        )
    for name, b, cols in (("b1", b1, 2 * H), ("b2", b2, d)):
        if b is not None:
            _check_tensor(op, name, b, 2, f"[E, {cols}]")
            if tuple(b.shape) != (E, cols):
                raise ValueError(
                    f"moefast.{op}: {name} must be [E, {cols}] = [{E}, {cols}], "
                    f"got {tuple(b.shape)}"
                )
    tensors = [("w1", w1), ("w2", w2), ("offs", offs)]
    tensors += [(n, b) for n, b in (("b1", b1), ("b2", b2)) if b is not None]
    for name, t in tensors:
        _check_device(op, "x", x, name, t)
    if offs.dtype != torch.int32:
        raise TypeError(f"moefast.{op}: offs must be int32, got {offs.dtype}")
    if offs.shape[0] != E:
        raise ValueError(
            f"moefast.{op}: offs must have one entry per expert, E = {E}, got {offs.shape[0]}"
        )
    autocast = _autocast_enabled(x.device)
    same = all(t.dtype == x.dtype for n, t in tensors if n != "offs")
    if not same and not autocast:
        mixed = {n: t.dtype for n, t in tensors if n != "offs" and t.dtype != x.dtype}
        raise TypeError(
            f"moefast.{op}: the weights must have the dtype of x, {x.dtype}; got {mixed}"
        )
    if autocast or x.device.type not in ("cpu", "cuda"):
        return grouped_mm(swiglu(grouped_mm(x, w1, offs, b1)), w2, offs, b2)
    with _range(op):
        return _ops.grouped_swiglu_mlp(x, w1, b1, w2, b2, offs)[0]


def mixture(gate_logits: Tensor, expert_out: Tensor) -> Tensor:
    """Gated mixture ``out[b] = sum_e softmax(gate_logits[b])[e] * expert_out[e, b]``, fused.

    ``gate_logits [B, E]``, ``expert_out [E, B, C]`` -> ``[B, C]``; the adaptive-fusion combine.
    """
    op = "mixture"
    _check_tensor(op, "gate_logits", gate_logits, 2, "[B, E]")
    _check_tensor(op, "expert_out", expert_out, 3, "[E, B, C]")
    _check_float(op, "gate_logits", gate_logits)
    if expert_out.dtype != gate_logits.dtype:
        raise TypeError(
            f"moefast.mixture: gate_logits and expert_out must share a dtype, "
            f"got {gate_logits.dtype} and {expert_out.dtype}"
        )
    _check_device(op, "gate_logits", gate_logits, "expert_out", expert_out)
    B, E = gate_logits.shape
    if E < 1:
        raise ValueError("moefast.mixture: gate_logits needs at least one expert column")
    if expert_out.shape[0] != E or expert_out.shape[1] != B:
        raise ValueError(
            f"moefast.mixture: expert_out must be [E, B, C] with E = {E}, B = {B} from "
            f"gate_logits [B, E], got {tuple(expert_out.shape)}"
        )
    with _range("mixture"):
        return _ops.mixture(gate_logits, expert_out)


def tree_route(x: Tensor, node_w: Tensor, node_b: Tensor, node_child: Tensor, depth: int) -> Tensor:
    """Expert ids ``[B]`` (int32) from a tree of hyperplanes, ``depth`` dot products per row.

    Row ``x[i]`` starts at node 0 and moves to ``node_child[m, 1]`` when
    ``<x[i], node_w[m]> > node_b[m]`` (else ``node_child[m, 0]``); a child ``>= 0`` is the next
    node and a child ``-(e + 1)`` the leaf, expert ``e``. Every path must end in a leaf within
    ``depth`` levels. With no nodes (``n = 0``, ``depth = 0``) every row goes to expert 0. This is
    the routing of :class:`moefast.hardmoe.ClusterGater` with ``method="tree"`` (hierarchical
    k-means: each node is the bisector of two centroids), whose cost grows with ``log E``.

    ``x [B, d]`` floating; ``node_w [n, d]`` and ``node_b [n]`` of x's dtype; ``node_child
    [n, 2]`` int64. The CPU raises when a walk leaves the tree; CUDA, which cannot raise without a
    host synchronisation, writes id ``-1`` for that row (which ``routing_from_ids`` drops).
    """
    op = "tree_route"
    _check_tensor(op, "x", x, 2, "[B, d]")
    _check_float(op, "x", x)
    _check_tensor(op, "node_w", node_w, 2, "[n, d]")
    _check_tensor(op, "node_b", node_b, 1, "[n]")
    _check_tensor(op, "node_child", node_child, 2, "[n, 2]")
    if node_w.dtype != x.dtype or node_b.dtype != x.dtype:
        raise TypeError(
            f"moefast.tree_route: node_w and node_b must have x's dtype {x.dtype}, "
            f"got {node_w.dtype} and {node_b.dtype}"
        )
    if node_child.dtype != torch.int64:
        raise TypeError(f"moefast.tree_route: node_child must be int64, got {node_child.dtype}")
    n = node_w.shape[0]
    if node_w.shape[1] != x.shape[1]:
        raise ValueError(
            f"moefast.tree_route: node_w must be [n, d] with d = {x.shape[1]} (x's width), "
            f"got {tuple(node_w.shape)}"
        )
    if node_b.shape[0] != n or tuple(node_child.shape) != (n, 2):
        raise ValueError(
            f"moefast.tree_route: node_b must be [n] and node_child [n, 2] with n = {n}, "
            f"got {tuple(node_b.shape)} and {tuple(node_child.shape)}"
        )
    if not isinstance(depth, int) or not 0 <= depth <= n or (n > 0 and depth == 0):
        raise ValueError(
            f"moefast.tree_route: depth must be an int in [1, n] = [1, {n}] "
            f"(0 for a tree with no nodes), got {depth!r}"
        )
    for name, t in (("node_w", node_w), ("node_b", node_b), ("node_child", node_child)):
        _check_device(op, "x", x, name, t)
    with _range(op):
        return _ops.tree_route(x, node_w, node_b, node_child, depth)


def load_balancing_loss(logits: Tensor, routing: Routing) -> Tensor:
    """Switch-Transformer load-balancing loss, ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of the ``T * k`` routed slots that went to expert ``e`` (from
    ``routing.counts``, not differentiable) and ``P_e`` the mean router probability of expert
    ``e`` (differentiable). It is 1 when routing and probabilities are uniform, and grows as they
    concentrate on the same experts. Returned in float32 (float64 for float64 logits).
    """
    op = "load_balancing_loss"
    _check_tensor(op, "logits", logits, 2, "[T, E]")
    _check_float(op, "logits", logits)
    _check_routing(op, routing)
    _check_device(op, "logits", logits, "routing", routing.counts)
    T, E = logits.shape
    if routing.counts.shape[0] != E or routing.expert_ids.shape[0] != T:
        raise ValueError(
            f"moefast.load_balancing_loss: routing is for T = {routing.expert_ids.shape[0]} tokens "
            f"and E = {routing.counts.shape[0]} experts, logits are {tuple(logits.shape)}"
        )
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if T == 0:
        return logits.new_zeros((), dtype=acc)
    f = routing.counts.to(acc) / routing.expert_ids.numel()
    p = torch.softmax(logits.to(acc), dim=-1).mean(dim=0)
    return E * torch.dot(f, p)


def z_loss(logits: Tensor) -> Tensor:
    """Router z-loss (ST-MoE): the mean over tokens of ``logsumexp(logits)^2``, in float32."""
    _check_tensor("z_loss", "logits", logits, 2, "[T, E]")
    _check_float("z_loss", "logits", logits)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=acc)
    return torch.logsumexp(logits.to(acc), dim=-1).square().mean()


# ----------------------------------------------------------------------------- fake kernels


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("moefast::router")
def _router_fake(logits, k, mode, normalize):
    T = logits.shape[0]
    return logits.new_empty((T, k)), logits.new_empty((T, k), dtype=torch.int32)


@torch.library.register_fake("moefast::router_backward")
def _router_backward_fake(grad_weights, logits, expert_ids, mode, normalize):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("moefast::routing_plan")
def _routing_plan_fake(expert_ids, num_experts):
    i32 = torch.int32
    return (
        expert_ids.new_empty((num_experts,), dtype=i32),
        expert_ids.new_empty((num_experts,), dtype=i32),
        expert_ids.new_empty(expert_ids.shape, dtype=i32),
        expert_ids.new_empty((expert_ids.numel(),), dtype=i32),
    )


@torch.library.register_fake("moefast::permute")
def _permute_fake(x, position, weights):
    return x.new_empty((position.shape[0] * position.shape[1], x.shape[1]))


@torch.library.register_fake("moefast::unpermute")
def _unpermute_fake(y, position, weights):
    return y.new_empty((position.shape[0], y.shape[1]))


@torch.library.register_fake("moefast::unpermute_weight_grad")
def _unpermute_weight_grad_fake(grad_out, y, position):
    return y.new_empty(position.shape, dtype=_opmath(y.dtype))


@torch.library.register_fake("moefast::grouped_mm")
def _grouped_mm_fake(a, b, offs, bias=None):
    return a.new_empty((a.shape[0], b.shape[2]))


@torch.library.register_fake("moefast::grouped_mm_act")
def _grouped_mm_act_fake(a, b, offs, bias, activation):
    cols = b.shape[2] // 2 if activation == "swiglu" else b.shape[2]
    return a.new_empty((a.shape[0], cols))


@torch.library.register_fake("moefast::grouped_bias_grad")
def _grouped_bias_grad_fake(grad_out, offs):
    return grad_out.new_empty((offs.shape[0], grad_out.shape[1]))


@torch.library.register_fake("moefast::grouped_mm_weight_grad")
def _grouped_mm_weight_grad_fake(a, grad_out, offs):
    return a.new_empty((offs.shape[0], a.shape[1], grad_out.shape[1]))


@torch.library.register_fake("moefast::swiglu")
def _swiglu_fake(h):
    return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))


@torch.library.register_fake("moefast::swiglu_backward")
def _swiglu_backward_fake(grad_out, h):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


@torch.library.register_fake("moefast::grouped_swiglu_mlp")
def _grouped_swiglu_mlp_fake(x, w1, b1, w2, b2, offs):
    n, h2 = x.shape[0], w1.shape[2]
    return x.new_empty((n, x.shape[1])), x.new_empty((n, h2)), x.new_empty((n, h2 // 2))


@torch.library.register_fake("moefast::grouped_swiglu_mlp_backward")
def _grouped_swiglu_mlp_backward_fake(grad_y, x, w1, w2, offs, h, act, input_grad, bias):
    E = w1.shape[0]
    return (
        x.new_empty((x.shape[0] if input_grad else 0, x.shape[1])),
        w1.new_empty(w1.shape),
        w2.new_empty(w2.shape),
        x.new_empty((E if bias else 0, w1.shape[2])),
        x.new_empty((E if bias else 0, x.shape[1])),
    )


@torch.library.register_fake("moefast::tree_route")
def _tree_route_fake(x, node_w, node_b, node_child, depth):
    return x.new_empty((x.shape[0],), dtype=torch.int32)


@torch.library.register_fake("moefast::mixture")
def _mixture_fake(gate_logits, expert_out):
    return expert_out.new_empty((gate_logits.shape[0], expert_out.shape[2]))


@torch.library.register_fake("moefast::mixture_backward")
def _mixture_backward_fake(grad_out, gate_logits, expert_out):
    return gate_logits.new_empty(gate_logits.shape), expert_out.new_empty(expert_out.shape)


# ----------------------------------------------------------------------------- autograd


def _router_setup(ctx, inputs, output):
    logits, _k, mode, normalize = inputs
    _weights, expert_ids = output
    ctx.mode = mode
    ctx.normalize = normalize
    ctx.save_for_backward(logits, expert_ids)


def _router_backward(ctx, grad_weights, _grad_ids):
    if ctx.mode == "hard" or not ctx.needs_input_grad[0]:
        return None, None, None, None
    logits, expert_ids = ctx.saved_tensors
    with _range("route.backward"):
        grad_logits = _ops.router_backward(
            grad_weights, logits, expert_ids, ctx.mode, ctx.normalize
        )
    return grad_logits, None, None, None


torch.library.register_autograd("moefast::router", _router_backward, setup_context=_router_setup)


def _permute_setup(ctx, inputs, output):
    x, position, weights = inputs
    ctx.has_weights = weights is not None
    ctx.weights_dtype = weights.dtype if weights is not None else None
    ctx.save_for_backward(x if ctx.has_weights else None, position, weights)


def _permute_backward(ctx, grad_out):
    with _range("permute.backward"):
        x, position, weights = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _ops.unpermute(grad_out, position, weights)
        if ctx.has_weights and ctx.needs_input_grad[2]:
            grad_w = _ops.unpermute_weight_grad(x, grad_out, position).to(ctx.weights_dtype)
        return grad_x, None, grad_w


torch.library.register_autograd("moefast::permute", _permute_backward, setup_context=_permute_setup)


def _unpermute_setup(ctx, inputs, output):
    y, position, weights = inputs
    ctx.has_weights = weights is not None
    ctx.weights_dtype = weights.dtype if weights is not None else None
    needs_w = ctx.has_weights and weights.requires_grad
    ctx.save_for_backward(y if needs_w else None, position, weights)


def _unpermute_backward(ctx, grad_out):
    with _range("unpermute.backward"):
        y, position, weights = ctx.saved_tensors
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_y = _ops.permute(grad_out, position, weights)
        if ctx.has_weights and ctx.needs_input_grad[2]:
            grad_w = _ops.unpermute_weight_grad(grad_out, y, position).to(ctx.weights_dtype)
        return grad_y, None, grad_w


torch.library.register_autograd(
    "moefast::unpermute", _unpermute_backward, setup_context=_unpermute_setup
)


def _grouped_mm_setup(ctx, inputs, output):
    a, b, offs, _bias = inputs
    ctx.save_for_backward(a, b, offs)


def _grouped_mm_backward(ctx, grad_out):
    with _range("grouped_mm.backward"):
        a, b, offs = ctx.saved_tensors
        grad_a = grad_b = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_a = _ops.grouped_mm(grad_out, b.transpose(1, 2), offs)
        if ctx.needs_input_grad[1]:
            grad_b = _ops.grouped_mm_weight_grad(a, grad_out, offs)
        if len(ctx.needs_input_grad) > 3 and ctx.needs_input_grad[3]:
            grad_bias = _ops.grouped_bias_grad(grad_out, offs)
        return grad_a, grad_b, None, grad_bias


torch.library.register_autograd(
    "moefast::grouped_mm", _grouped_mm_backward, setup_context=_grouped_mm_setup
)


def _activation_grad(pre: Tensor, grad_out: Tensor, activation: str) -> Tensor:
    """The gradient with respect to the pre-activation, in plain tensor ops (no autograd)."""
    acc = _opmath(pre.dtype)
    x, g = pre.to(acc), grad_out.to(acc)
    if activation == "relu":
        out = g * (x > 0).to(acc)
    elif activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(x * 0.7071067811865476))
        pdf = torch.exp(-0.5 * x * x) * 0.3989422804014327
        out = g * (cdf + x * pdf)
    elif activation == "silu":
        s = torch.sigmoid(x)
        out = g * s * (1.0 + x * (1.0 - s))
    elif activation == "swiglu":
        h = x.shape[1] // 2
        gate, up = x[:, :h], x[:, h:]
        s = torch.sigmoid(gate)
        out = torch.cat((g * up * s * (1.0 + gate * (1.0 - s)), g * gate * s), dim=1)
    else:
        out = g
    return out.to(pre.dtype)


def _grouped_mm_act_setup(ctx, inputs, output):
    a, b, offs, bias, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(a, b, offs, bias)


def _grouped_mm_act_backward(ctx, grad_out):
    with _range("grouped_mm_act.backward"):
        a, b, offs, bias = ctx.saved_tensors
        pre = _ops.grouped_mm(a, b, offs, bias)  # recomputed, not stored
        grad_pre = _activation_grad(pre, grad_out, ctx.activation)
        grad_a = grad_b = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_a = _ops.grouped_mm(grad_pre, b.transpose(1, 2), offs)
        if ctx.needs_input_grad[1]:
            grad_b = _ops.grouped_mm_weight_grad(a, grad_pre, offs)
        if ctx.needs_input_grad[3]:
            grad_bias = _ops.grouped_bias_grad(grad_pre, offs)
        return grad_a, grad_b, None, grad_bias, None


torch.library.register_autograd(
    "moefast::grouped_mm_act", _grouped_mm_act_backward, setup_context=_grouped_mm_act_setup
)


def _swiglu_setup(ctx, inputs, output):
    (h,) = inputs
    ctx.save_for_backward(h)


def _swiglu_backward(ctx, grad_out):
    with _range("swiglu.backward"):
        (h,) = ctx.saved_tensors
        return _ops.swiglu_backward(grad_out.to(h.dtype), h)


torch.library.register_autograd("moefast::swiglu", _swiglu_backward, setup_context=_swiglu_setup)


def _grouped_swiglu_mlp_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, offs = inputs
    _, h, act = output
    ctx.mark_non_differentiable(h, act)  # saved for the backward, not results
    ctx.set_materialize_grads(False)
    ctx.bias = (b1 is not None, b2 is not None)
    ctx.save_for_backward(x, w1, w2, offs, h, act)


def _grouped_swiglu_mlp_backward(ctx, grad_y, _grad_h, _grad_act):
    if grad_y is None:
        return None, None, None, None, None, None
    with _range("grouped_swiglu_mlp.backward"):
        x, w1, w2, offs, h, act = ctx.saved_tensors
        has_b1, has_b2 = ctx.bias
        gx, gw1, gw2, gb1, gb2 = _ops.grouped_swiglu_mlp_backward(
            grad_y, x, w1, w2, offs, h, act, ctx.needs_input_grad[0], has_b1 or has_b2
        )
        return (
            gx if ctx.needs_input_grad[0] else None,
            gw1 if ctx.needs_input_grad[1] else None,
            gb1 if has_b1 and ctx.needs_input_grad[2] else None,
            gw2 if ctx.needs_input_grad[3] else None,
            gb2 if has_b2 and ctx.needs_input_grad[4] else None,
            None,
        )


torch.library.register_autograd(
    "moefast::grouped_swiglu_mlp",
    _grouped_swiglu_mlp_backward,
    setup_context=_grouped_swiglu_mlp_setup,
)


def _mixture_setup(ctx, inputs, output):
    gate_logits, expert_out = inputs
    ctx.save_for_backward(gate_logits, expert_out)


def _mixture_backward(ctx, grad_out):
    with _range("mixture.backward"):
        gate_logits, expert_out = ctx.saved_tensors
        grad_gate, grad_expert = _ops.mixture_backward(grad_out, gate_logits, expert_out)
        return (
            grad_gate if ctx.needs_input_grad[0] else None,
            grad_expert if ctx.needs_input_grad[1] else None,
        )


torch.library.register_autograd("moefast::mixture", _mixture_backward, setup_context=_mixture_setup)
