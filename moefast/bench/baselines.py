"""The baselines moefast is measured against: per-expert Python loops and PyTorch's grouped GEMM.

Shared by ``python -m moefast.bench`` and the pytest-benchmark suites in ``bench/``.

The ``loop_*`` functions are written the way MoE layers are commonly written in plain PyTorch
today (e.g. the Mixtral layer of Hugging Face transformers): a Python loop over experts, a boolean
mask per expert (``torch.where(expert_ids == e)``), indexing, ``torch.matmul`` and ``index_add_``,
in the dtype of the inputs. Stacked expert tensors are split with ``unbind`` (as if each expert
were its own parameter): indexing ``w[e]`` instead would make autograd fill a whole ``w``-sized
zero gradient per expert. They produce the same layout as the moefast ops (rows grouped by
expert in ascending order, in token order inside an expert), so their results compare directly.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

# ----------------------------------------------------------------------------- per-expert loops


def loop_route(logits: Tensor, k: int, mode: str) -> tuple[Tensor, Tensor]:
    """``torch.softmax`` + ``torch.topk``: ``(weights [T, k] in logits.dtype, ids [T, k])``."""
    if mode == "softmax_topk":
        weights, ids = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)
    else:  # topk_softmax
        top, ids = logits.topk(k, dim=-1)
        weights = torch.softmax(top.float(), dim=-1)
    return weights.to(logits.dtype), ids


def loop_routing_plan(
    expert_ids: Tensor, num_experts: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(counts, offs, position, order)`` from one ``nonzero`` per expert."""
    flat = expert_ids.reshape(-1)
    slots = [torch.nonzero(flat == e).squeeze(1) for e in range(num_experts)]
    order = torch.cat(slots)
    counts = torch.tensor([s.numel() for s in slots])
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel())
    return counts, counts.cumsum(0), position.view(expert_ids.shape), order


def loop_permute(x: Tensor, expert_ids: Tensor, num_experts: int) -> Tensor:
    """Gathers the tokens of each expert with a boolean mask and concatenates them."""
    pieces = []
    for e in range(num_experts):
        token, _slot = torch.where(expert_ids == e)
        pieces.append(x[token])
    return torch.cat(pieces)


def loop_unpermute(y: Tensor, expert_ids: Tensor, weights: Tensor, num_experts: int) -> Tensor:
    """Scales each expert's rows by their weights and adds them into the tokens (``index_add_``)."""
    T = expert_ids.shape[0]
    out = y.new_zeros(T, y.shape[1])
    begin = 0
    for e in range(num_experts):
        token, slot = torch.where(expert_ids == e)
        end = begin + token.numel()
        out.index_add_(0, token, y[begin:end] * weights[token, slot, None])
        begin = end
    return out


def loop_grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """One ``torch.matmul`` per expert on its slice of rows (the row split read on the host)."""
    pieces, begin = [], 0
    for b_e, end in zip(b.unbind(0), offs.tolist(), strict=True):
        pieces.append(a[begin:end] @ b_e)
        begin = end
    if begin < a.shape[0]:
        pieces.append(a.new_zeros(a.shape[0] - begin, b.shape[2]))
    return torch.cat(pieces)


def loop_mixture(gate_logits: Tensor, expert_out: Tensor) -> Tensor:
    """Softmax of the gate, then a weighted sum over experts, one expert at a time."""
    p = torch.softmax(gate_logits.float(), dim=-1).to(expert_out.dtype)
    out = None
    for p_e, out_e in zip(p.unbind(1), expert_out.unbind(0), strict=True):
        term = p_e[:, None] * out_e
        out = term if out is None else out + term
    return out


def loop_moe(x, router_weight, router_bias, w1, w2, k: int) -> Tensor:
    """A whole MoE layer (softmax-top-k router, GELU MLP experts) the Mixtral way."""
    logits = x.float() @ router_weight + router_bias
    weights, ids = torch.softmax(logits, dim=-1).topk(k, dim=-1)
    weights = weights.to(x.dtype)
    out = x.new_zeros(x.shape)
    for e, (w1_e, w2_e) in enumerate(zip(w1.unbind(0), w2.unbind(0), strict=True)):
        token, slot = torch.where(ids == e)
        h = F.gelu(x[token] @ w1_e) @ w2_e
        out.index_add_(0, token, h * weights[token, slot, None])
    return out


# ----------------------------------------------------------------------------- torch's grouped GEMM

_torch_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@functools.cache
def torch_grouped_mm_unavailable(dtype: torch.dtype, device: str = "cpu") -> str | None:
    """``None`` if PyTorch's grouped GEMM runs forward and backward on ``device`` for ``dtype``,
    else why not."""
    if _torch_grouped_mm is None:
        return f"torch {torch.__version__} has no grouped_mm"
    try:
        a = torch.randn(24, 16, dtype=dtype, device=device, requires_grad=True)
        b = torch.randn(3, 16, 8, dtype=dtype, device=device, requires_grad=True)
        offs = torch.tensor([8, 8, 24], dtype=torch.int32, device=device)
        out = _torch_grouped_mm(a, b, offs=offs)
        torch.autograd.grad(out, (a, b), torch.randn_like(out))
    except Exception as exc:  # any failure means "not on this build / device / dtype"
        return (
            f"torch grouped_mm does not run on {device} for {dtype}: "
            f"{type(exc).__name__}: {str(exc)[:200]}"
        )
    return None


def torch_grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    return _torch_grouped_mm(a, b, offs=offs)


def torch_moe(x, router_weight, router_bias, w1, w2, k: int) -> Tensor:
    """A whole MoE layer in plain PyTorch with its grouped GEMM: sort, gather, GEMMs, index_add_."""
    E = w1.shape[0]
    logits = x.float() @ router_weight + router_bias
    weights, ids = torch.softmax(logits, dim=-1).topk(k, dim=-1)
    flat = ids.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    offs = torch.bincount(flat, minlength=E).cumsum(0).to(torch.int32)
    token = order // k
    h = F.gelu(torch_grouped_mm(x[token], w1, offs))
    h = torch_grouped_mm(h, w2, offs) * weights.to(x.dtype).reshape(-1)[order, None]
    return x.new_zeros(x.shape).index_add_(0, token, h)


# ----------------------------------------------------------------------------- whole layers


def moefast_moe(x, router_weight, router_bias, w1, w2, k: int) -> Tensor:
    """The same layer as :func:`loop_moe` on moefast ops."""
    import moefast

    r = moefast.route(x.float() @ router_weight + router_bias, k)
    h = moefast.permute(x, r)
    h = F.gelu(moefast.grouped_mm(h, w1, r.offs))
    h = moefast.grouped_mm(h, w2, r.offs)
    return moefast.unpermute(h, r, r.weights.to(x.dtype))


def reference_moe(x, router_weight, router_bias, w1, w2, k: int) -> Tensor:
    """The same layer as :func:`loop_moe` on :mod:`moefast.reference` ops."""
    from moefast import reference

    weights, ids = reference.route(x.float() @ router_weight + router_bias, k)
    _counts, offs, position, _order = reference.routing_plan(ids, w1.shape[0])
    h = reference.permute(x, position)
    h = F.gelu(reference.grouped_mm(h, w1, offs))
    h = reference.grouped_mm(h, w2, offs)
    return reference.unpermute(h, position, weights.to(x.dtype))


def dense_moe_limit(x, router_weight, router_bias, w1, w2, k: int) -> Tensor:
    """The layer's two GEMMs and GELU done densely on ``T * k`` rows: the same FLOPs."""
    h = F.gelu(x.repeat_interleave(k, dim=0) @ w1[0]) @ w2[0]
    return h.view(x.shape[0], k, x.shape[1]).sum(dim=1)
