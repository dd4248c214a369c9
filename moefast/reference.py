"""Plain-PyTorch versions of every moefast op: the ground truth of the tests.

Each function here computes what the matching op in :mod:`moefast.ops` computes, with ordinary
differentiable torch operations and no custom kernels, so that autograd gives the reference
gradients too. They favour clarity over speed (``grouped_mm`` loops over experts in Python) and
read values on the host freely; never use them on a hot path.

The conventions are those of ``moefast.ops``: ``expert_ids``, ``offs``, ``counts``, ``position``
and ``order`` are int32; softmax runs in float32 for float16/bfloat16 inputs (float64 stays
float64); top-k ranks by logit, larger first, NaN above every number, ties to the lower index.
"""

from __future__ import annotations

import torch
from torch import Tensor

ROUTER_MODES = ("softmax_topk", "topk_softmax", "hard", "dense")


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate in for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def route(
    logits: Tensor, k: int, mode: str = "softmax_topk", normalize: bool = False
) -> tuple[Tensor, Tensor]:
    """Returns ``(weights [T, k] in logits.dtype, expert_ids [T, k] int32)``."""
    if mode not in ROUTER_MODES:
        raise ValueError(f"mode must be one of {ROUTER_MODES}, got {mode!r}")
    T, E = logits.shape
    acc = logits.to(opmath_dtype(logits.dtype))
    if mode == "dense":
        ids = torch.arange(E, device=logits.device).expand(T, E)
        return torch.softmax(acc, dim=-1).to(logits.dtype), ids.to(torch.int32)
    # A stable descending sort puts equal logits in ascending index order and NaN first.
    ids = torch.sort(acc.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    if mode == "hard":
        weights = torch.ones(T, k, dtype=logits.dtype, device=logits.device)
    elif mode == "softmax_topk":
        weights = torch.softmax(acc, dim=-1).gather(1, ids)
        if normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    else:  # topk_softmax
        weights = torch.softmax(acc.gather(1, ids), dim=-1)
    return weights.to(logits.dtype), ids.to(torch.int32)


def routing_plan(expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(counts [E], offs [E], position [T, k], order [T * k])``, all int32.

    ``order`` lists the flat slots ``t * k + j`` grouped by expert in ascending expert order, and
    in slot order inside one expert (a stable sort); ``position`` is its inverse.
    """
    flat = expert_ids.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        raise ValueError(f"expert_ids must be in [0, {num_experts})")
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    offs = torch.cumsum(counts, 0)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    i32 = torch.int32
    return counts.to(i32), offs.to(i32), position.view(expert_ids.shape).to(i32), order.to(i32)


def tree_route(x: Tensor, node_w: Tensor, node_b: Tensor, node_child: Tensor, depth: int) -> Tensor:
    """Walks every row down the tree of hyperplanes, one level at a time; ids ``[B]`` int32.

    ``node_child[m, 1]`` when ``<x, node_w[m]> > node_b[m]`` (accumulated in the opmath dtype),
    else ``node_child[m, 0]``; a child ``-(e + 1)`` is leaf ``e``. No nodes: every row gets 0.
    """
    acc = opmath_dtype(x.dtype)
    n = node_w.shape[0]
    if n == 0:
        return torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
    xa, w, b = x.to(acc), node_w.to(acc), node_b.to(acc)
    cur = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for _ in range(depth):
        inner = cur >= 0
        node = cur.clamp(min=0)
        side = ((xa * w[node]).sum(1) > b[node]).long()
        cur = torch.where(inner, node_child[node, side], cur)
        if bool((cur >= n).any()):
            raise ValueError("node_child names a node outside [0, n)")
    if bool((cur >= 0).any()):
        raise ValueError(f"a path does not reach a leaf within depth = {depth}")
    return (-(cur + 1)).to(torch.int32)


def apply_capacity(
    expert_ids: Tensor, weights: Tensor, num_experts: int, capacity: int
) -> tuple[Tensor, Tensor]:
    """Which slots an expert of the given capacity keeps, by the policy of ``ops.apply_capacity``.

    Returns ``(keep [T, k] bool, weights with dropped slots zeroed)``: each expert takes slots in
    (choice j, token t) order until it holds ``capacity`` of them.
    """
    T, k = expert_ids.shape
    keep = torch.zeros(T, k, dtype=torch.bool)
    taken = [0] * num_experts
    for j in range(k):
        for t in range(T):
            e = int(expert_ids[t, j])
            if taken[e] < capacity:
                keep[t, j] = True
                taken[e] += 1
    return keep, torch.where(keep, weights, torch.zeros_like(weights))


def _flat_weights(weights: Tensor | None, shape, dtype, device) -> Tensor:
    if weights is None:
        return torch.ones(shape, dtype=dtype, device=device)
    return weights.to(dtype)


def permute(x: Tensor, position: Tensor, weights: Tensor | None = None) -> Tensor:
    """``out[position[t, j]] = weights[t, j] * x[t]``; ``out`` has ``T * k`` rows."""
    T, k = position.shape
    acc = opmath_dtype(x.dtype)
    w = _flat_weights(weights, (T, k), acc, x.device)
    src = (x.to(acc).unsqueeze(1) * w.unsqueeze(-1)).reshape(T * k, x.shape[1])
    order = torch.empty(T * k, dtype=torch.long, device=x.device)
    order[position.reshape(-1).long()] = torch.arange(T * k, device=x.device)
    return src[order].to(x.dtype)


def unpermute(y: Tensor, position: Tensor, weights: Tensor | None = None) -> Tensor:
    """``out[t] = sum_j weights[t, j] * y[position[t, j]]``, summed in the opmath dtype."""
    T, k = position.shape
    acc = opmath_dtype(y.dtype)
    w = _flat_weights(weights, (T, k), acc, y.device)
    rows = y.to(acc)[position.reshape(-1).long()].view(T, k, y.shape[1])
    return (rows * w.unsqueeze(-1)).sum(dim=1).to(y.dtype)


def grouped_mm(a: Tensor, b: Tensor, offs: Tensor, bias: Tensor | None = None) -> Tensor:
    """Rows ``offs[e-1]:offs[e]`` of ``a`` times ``b[e]`` (plus ``bias[e]``); rows past
    ``offs[-1]`` are zero."""
    ends = [int(v) for v in offs.tolist()]
    acc = opmath_dtype(a.dtype)
    pieces, begin = [], 0
    for e, end in enumerate(ends):
        piece = a[begin:end].to(acc) @ b[e].to(acc)
        pieces.append(piece if bias is None else piece + bias[e].to(acc))
        begin = end
    pieces.append(a.new_zeros(a.shape[0] - begin, b.shape[2], dtype=acc))
    return torch.cat(pieces, dim=0).to(a.dtype)


def grouped_mm_act(
    a: Tensor, b: Tensor, offs: Tensor, bias: Tensor | None = None, activation: str = "silu"
) -> Tensor:
    """:func:`grouped_mm` in the accumulation dtype, then the activation, then rounding once."""
    ends = [int(v) for v in offs.tolist()]
    acc = opmath_dtype(a.dtype)
    pre = torch.zeros(a.shape[0], b.shape[2], dtype=acc, device=a.device)
    begin = 0
    for e, end in enumerate(ends):
        pre[begin:end] = a[begin:end].to(acc) @ b[e].to(acc)
        if bias is not None:
            pre[begin:end] += bias[e].to(acc)
        begin = end
    if activation == "relu":
        out = torch.relu(pre)
    elif activation == "gelu":
        out = torch.nn.functional.gelu(pre)
    elif activation == "silu":
        out = torch.nn.functional.silu(pre)
    elif activation == "swiglu":
        h = pre.shape[1] // 2
        out = torch.nn.functional.silu(pre[:, :h]) * pre[:, h:]
    else:
        out = pre
    return out.to(a.dtype)


def swiglu(h: Tensor) -> Tensor:
    """``silu(gate) * up`` for ``h = [gate | up]`` along the last dimension, in opmath."""
    acc = opmath_dtype(h.dtype)
    gate, up = h.to(acc).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(h.dtype)


def grouped_swiglu_mlp(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    offs: Tensor,
) -> Tensor:
    """:func:`grouped_mm` -> :func:`swiglu` -> :func:`grouped_mm`, each rounded to the input dtype
    (the pre-activation and the activation are stored in it)."""
    return grouped_mm(swiglu(grouped_mm(x, w1, offs, b1)), w2, offs, b2)


def mixture(gate_logits: Tensor, expert_out: Tensor) -> Tensor:
    """``out[b] = sum_e softmax(gate_logits[b])[e] * expert_out[e, b]``."""
    acc = opmath_dtype(gate_logits.dtype)
    p = torch.softmax(gate_logits.to(acc), dim=-1)
    return torch.einsum("be,ebc->bc", p, expert_out.to(acc)).to(expert_out.dtype)


def load_balancing_loss(logits: Tensor, expert_ids: Tensor) -> Tensor:
    """Switch-Transformer balance loss ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of the ``T * k`` routed slots that went to expert ``e`` and ``P_e`` the
    mean router probability of ``e``; the loss is 1 when both are uniform.
    """
    T, E = logits.shape
    acc = opmath_dtype(logits.dtype)
    if T == 0:
        return logits.new_zeros((), dtype=acc)
    one_hot = torch.nn.functional.one_hot(expert_ids.long(), E).to(acc)  # [T, k, E]
    f = one_hot.sum(dim=(0, 1)) / expert_ids.numel()
    p = torch.softmax(logits.to(acc), dim=-1).mean(dim=0)
    return E * (f * p).sum()


def z_loss(logits: Tensor) -> Tensor:
    """Router z-loss (ST-MoE): mean over tokens of ``logsumexp(logits)^2``."""
    acc = opmath_dtype(logits.dtype)
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=acc)
    return torch.logsumexp(logits.to(acc), dim=-1).square().mean()
