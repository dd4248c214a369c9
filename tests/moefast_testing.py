"""Helpers shared by the moefast tests: inputs, tolerances and the two pipelines (ops, reference)."""

from __future__ import annotations

import torch

import moefast
from moefast import reference as ref

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
HALF_DTYPES = (torch.bfloat16, torch.float16)

# Forward tolerances: the kernels accumulate in float32 (float64 for float64) and round once, as
# the reference does, so only the order of the sums differs.
_TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-10, 1e-10),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (2e-3, 2e-3),
}
# Gradients go through a few more roundings to 16 bits than the forward.
_GRAD_TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-10, 1e-10),
    torch.bfloat16: (3e-2, 2e-2),
    torch.float16: (4e-3, 4e-3),
}


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def assert_close(actual, expected, dtype=None, *, grad=False, msg=None):
    """Compares with the tolerance of ``dtype`` (that of ``expected`` by default); NaN == NaN."""
    dtype = dtype or expected.dtype
    rtol, atol = (_GRAD_TOL if grad else _TOL).get(dtype, (0.0, 0.0))
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=atol, equal_nan=True, check_dtype=True, msg=msg
    )


def randn(*shape, gen, dtype=torch.float32, requires_grad=False, scale=1.0):
    """Standard normal values (drawn in float64 from ``gen``, then cast), never all zeros or ones."""
    t = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def distinct_logits(T, E, *, gen, dtype=torch.float32, requires_grad=False):
    """Router logits ``[T, E]`` whose values in each row are well apart (no ties or near ties).

    Each row is a random permutation of evenly spaced values, plus a little noise and a random
    shift of the whole row, so that top-k is unambiguous in every dtype (16-bit included) and stays
    so under gradcheck's small perturbations.
    """
    spacing = 4.0 / max(E - 1, 1)
    base = torch.arange(E, dtype=torch.float64) * spacing - 2.0
    perm = torch.argsort(torch.rand(T, E, generator=gen, dtype=torch.float64), dim=1)
    noise = (torch.rand(T, E, generator=gen, dtype=torch.float64) - 0.5) * 0.2 * spacing
    shift = torch.rand(T, 1, generator=gen, dtype=torch.float64) * 2.0 - 1.0
    t = (base[perm] + noise + shift).to(dtype)
    return t.requires_grad_(requires_grad)


def random_ids(T, k, E, *, gen):
    """``[T, k]`` int32 expert ids, ``k`` distinct experts per token."""
    scores = torch.rand(T, E, generator=gen)
    return torch.argsort(scores, dim=1)[:, :k].to(torch.int32).contiguous()


def offs_from_counts(counts) -> torch.Tensor:
    return torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0).to(torch.int32)


def grads(outputs, inputs, grad_outputs):
    """Gradients of ``outputs`` with respect to ``inputs``; an input not reached gets zeros."""
    if isinstance(outputs, torch.Tensor):
        outputs, grad_outputs = (outputs,), (grad_outputs,)
    return torch.autograd.grad(
        outputs, inputs, grad_outputs, allow_unused=True, materialize_grads=True
    )


def leaf(t: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``t`` that requires grad (for running the reference on the same input)."""
    return t.detach().clone().requires_grad_(True)


def moefast_pipeline(x, logits, b, k, mode="softmax_topk", normalize=False):
    """route -> permute -> grouped_mm -> unpermute with moefast; returns (out, routing)."""
    routing = moefast.route(logits, k, mode=mode, normalize=normalize)
    xp = moefast.permute(x, routing)
    y = moefast.grouped_mm(xp, b, routing.offs)
    return moefast.unpermute(y, routing), routing


def reference_pipeline(x, logits, b, k, mode="softmax_topk", normalize=False):
    """The same pipeline with moefast.reference; returns (out, expert_ids)."""
    weights, ids = ref.route(logits, k, mode=mode, normalize=normalize)
    _counts, offs, position, _order = ref.routing_plan(ids, logits.shape[1])
    xp = ref.permute(x, position)
    y = ref.grouped_mm(xp, b, offs)
    return ref.unpermute(y, position, weights), ids


def random_tree(E, d, *, gen, dtype=torch.float32):
    """A random binary tree of hyperplanes with ``E`` leaves, for ``moefast.tree_route``.

    Nodes grow at random open slots (so the tree is uneven) and the leaves get the experts in a
    random order. Returns ``(node_w [E-1, d], node_b [E-1], node_child [E-1, 2] int64, depth)``.
    """
    n = E - 1
    child = torch.full((n, 2), -1, dtype=torch.int64)
    slots, depth_of = [], {}
    for node in range(n):
        if node > 0:
            parent, side = slots.pop(int(torch.randint(len(slots), (1,), generator=gen)))
            child[parent, side] = node
            depth_of[node] = depth_of[parent] + 1
        else:
            depth_of[node] = 1
        slots += [(node, 0), (node, 1)]
    experts = torch.randperm(E, generator=gen)
    for (parent, side), e in zip(slots, experts.tolist(), strict=True):
        child[parent, side] = -(e + 1)
    w = randn(n, d, gen=gen, dtype=dtype)
    b = (0.3 * torch.randn(n, generator=gen)).to(dtype)
    return w, b, child, max(depth_of.values(), default=0)
