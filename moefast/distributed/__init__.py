"""Expert parallelism with ``torch.distributed``: the all-to-all exchange and its helpers.

Each rank of a process group of ``W`` ranks holds ``E / W`` of the ``E`` experts, rank ``r`` the
experts ``r * E / W`` to ``(r + 1) * E / W - 1``. A layer (see
:class:`moefast.nn.expert_parallel.ExpertParallelMoE`) routes its own tokens over all ``E``
experts and permutes them (:func:`moefast.permute`): the rows are then grouped by expert, hence by
destination rank. Then

1. :func:`dispatch` exchanges the per-expert row counts (one ``all_to_all_single`` of ``E``
   integers, the only host synchronisation: the row splits of the next exchange must be host
   ints), sends the rows with a second ``all_to_all_single``, and groups the received rows, which
   come in (source rank, local expert) order, by local expert with a local
   :func:`moefast.routing_from_ids` plan and :func:`moefast.permute`;
2. the local experts run on them with :func:`moefast.grouped_mm` and the plan's ``offs``;
3. :func:`combine` undoes the local grouping and sends the rows back with the reverse
   ``all_to_all_single``, to be combined by :func:`moefast.unpermute` with the routing weights.

The exchanges are differentiable (:func:`all_to_all`): the backward pass runs the reverse
all-to-all with the splits saved by the forward pass, so it needs no further count exchange and no
host synchronisation. The same code runs on gloo (CPU tensors) and nccl (CUDA tensors).

Collectives must be called in the same order on every rank: every rank of the group must call
every expert-parallel layer forward, and backward, even with no tokens (a batch of zero rows is
fine).

Gradients: the expert weights' gradients stay on their rank; each is the sum over the tokens of
*all* ranks. Replicated parameters (the router, and everything else outside the experts) get on
each rank the gradient of that rank's tokens only; :func:`sync_gradients` all-reduces them (and
scales the expert gradients to match), the job ``DistributedDataParallel`` does for a dense model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import ops

__all__ = [
    "ExpertParallelPlan",
    "all_to_all",
    "broadcast_replicated_params",
    "combine",
    "dense_state_dict",
    "dispatch",
    "exchange_counts",
    "expert_parameter_names",
    "load_dense_state_dict",
    "shard_range",
    "sync_gradients",
]


# ----------------------------------------------------------------------------- process groups


def _check_initialized(what: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"moefast.distributed.{what}: torch.distributed is not initialized; call "
            "torch.distributed.init_process_group first (torchrun sets up the environment for it)"
        )


def group_size_and_rank(group=None) -> tuple[int, int]:
    """``(world size, rank)`` of this process in ``group`` (the default group when ``None``)."""
    _check_initialized("group_size_and_rank")
    return dist.get_world_size(group), dist.get_rank(group)


def shard_range(num_experts: int, world_size: int, rank: int) -> tuple[int, int]:
    """The experts ``[begin, end)`` that ``rank`` holds: ``E / W`` contiguous experts per rank."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard_range: need 0 <= rank < world_size, got {rank}, {world_size}")
    if num_experts % world_size:
        raise ValueError(
            f"expert parallelism needs num_experts divisible by the world size, got "
            f"num_experts = {num_experts} and world size {world_size}"
        )
    n = num_experts // world_size
    return rank * n, (rank + 1) * n


# ----------------------------------------------------------------------------- all-to-all

# Backends seen to lack all_to_all_single; they get point-to-point sends instead (the list form
# all_to_all is no help: gloo's needs equal sizes). gloo has all_to_all_single on CPU (torch 2.13:
# yes), nccl on CUDA.
_NO_A2A_SINGLE: set[str] = set()


def _all_to_all_p2p(out: Tensor, x: Tensor, output_splits, input_splits, group) -> None:
    W, me = group_size_and_rank(group)
    outs, ins = out.split(list(output_splits)), x.split(list(input_splits))
    p2p = []
    for i in range(W):  # a loop over ranks; both sides know every size, so empty blocks are skipped
        if i == me:
            outs[i].copy_(ins[i])
            continue
        peer = dist.get_global_rank(group, i) if group is not None else i
        if ins[i].numel():
            p2p.append(dist.P2POp(dist.isend, ins[i], peer, group))
        if outs[i].numel():
            p2p.append(dist.P2POp(dist.irecv, outs[i], peer, group))
    if p2p:
        for work in dist.batch_isend_irecv(p2p):
            work.wait()


def _all_to_all_raw(x: Tensor, output_splits: Sequence[int], input_splits: Sequence[int], group):
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    x = x.contiguous()
    backend = str(dist.get_backend(group))
    if backend not in _NO_A2A_SINGLE:
        try:
            dist.all_to_all_single(out, x, list(output_splits), list(input_splits), group=group)
            return out
        except (RuntimeError, NotImplementedError) as exc:  # raised before any communication
            if "support" not in str(exc).lower():
                raise
            _NO_A2A_SINGLE.add(backend)
    _all_to_all_p2p(out, x, output_splits, input_splits, group)  # into row blocks of ``out``
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.splits = (tuple(output_splits), tuple(input_splits))
        ctx.group = group
        return _all_to_all_raw(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return _all_to_all_raw(grad, input_splits, output_splits, ctx.group), None, None, None


def all_to_all(
    x: Tensor,
    output_split_sizes: Sequence[int],
    input_split_sizes: Sequence[int],
    group=None,
) -> Tensor:
    """Differentiable ``all_to_all_single`` over the rows of ``x``.

    Rows ``sum(input_split_sizes[:i]) + range(input_split_sizes[i])`` of ``x`` go to rank ``i``;
    the result holds the rows received from each rank in rank order, ``output_split_sizes[i]``
    from rank ``i``. Both splits are host ints. The backward pass sends the gradient back with the
    splits swapped. Collective: every rank of ``group`` must call it.
    """
    _check_initialized("all_to_all")
    return _AllToAll.apply(x, tuple(output_split_sizes), tuple(input_split_sizes), group)


def exchange_counts(counts: Tensor, group=None) -> tuple[list[int], list[int], Tensor]:
    """Exchanges the per-expert row counts of every rank; the one host sync of expert parallelism.

    ``counts [E]`` (int32 or int64, on the device of the data) are this rank's rows per global
    expert. Returns ``(send_splits, recv_splits, recv_counts)``: the rows this rank sends to and
    receives from each rank (host ints), and ``recv_counts [W, E / W]`` int64 on the device,
    ``recv_counts[s, j]`` the rows rank ``s`` sends for local expert ``j``.
    """
    _check_initialized("exchange_counts")
    W, _ = group_size_and_rank(group)
    E = counts.shape[0]
    if counts.dim() != 1 or E % W:
        raise ValueError(
            f"moefast.distributed.exchange_counts: counts must be [E] with E divisible by the "
            f"world size {W}, got shape {tuple(counts.shape)}"
        )
    send_counts = counts.to(torch.int64).contiguous()
    per_rank = [E // W] * W  # E / W counts to each rank
    recv_counts = _all_to_all_raw(send_counts, per_rank, per_rank, group).view(W, E // W)
    # One device-to-host copy for both splits.
    splits = torch.cat([send_counts.view(W, E // W).sum(1), recv_counts.sum(1)])
    host = splits.tolist()  # host-ok: all_to_all_single needs its split sizes on the host
    return host[:W], host[W:], recv_counts


@dataclass(frozen=True)
class ExpertParallelPlan:
    """What :func:`dispatch` did, for :func:`combine` to undo.

    Fields: ``local`` the :class:`moefast.Routing` (``k = 1``) over this rank's ``E / W`` experts
    of the received rows (its ``offs`` feed :func:`moefast.grouped_mm`); ``send_splits`` and
    ``recv_splits`` the rows sent to and received from each rank; ``num_rows`` the rows of the
    permuted input (``T * k``, of which the first ``sum(send_splits)`` were sent, the rest being
    rows dropped by a capacity); ``group`` the process group.
    """

    local: ops.Routing
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    num_rows: int
    group: object = None


def dispatch(x_perm: Tensor, counts: Tensor, group=None) -> tuple[Tensor, ExpertParallelPlan]:
    """Sends permuted rows to the ranks that hold their experts, grouped there by local expert.

    ``x_perm [T * k, d]`` is :func:`moefast.permute`'s output for a routing over all ``E``
    experts and ``counts [E]`` that routing's ``counts`` (rows past ``counts.sum()``, dropped by
    :func:`moefast.apply_capacity`, are not sent). Returns ``(x_local [N, d], plan)``: the ``N``
    rows that all ranks sent to this one, grouped by local expert in ascending order (inside one
    expert, by source rank, then in the sender's order), and the plan for :func:`combine`;
    ``plan.local.offs`` are the row ends per local expert. Differentiable in ``x_perm``.
    Collective: every rank of ``group`` must call it.
    """
    if x_perm.dim() != 2:
        raise ValueError(
            f"moefast.distributed.dispatch: x_perm must be 2-D [T * k, d], got shape "
            f"{tuple(x_perm.shape)}"
        )
    send_splits, recv_splits, recv_counts = exchange_counts(counts, group)
    W, E_local = recv_counts.shape
    sent = sum(send_splits)
    if sent > x_perm.shape[0]:
        raise ValueError(
            f"moefast.distributed.dispatch: counts add up to {sent} rows but x_perm has "
            f"{x_perm.shape[0]}"
        )
    received = all_to_all(x_perm[:sent], recv_splits, send_splits, group)
    n = sum(recv_splits)
    # The received rows come in (source rank, local expert) blocks; label each with its local
    # expert (no host sync: the output size is known) and plan the grouping by local expert.
    experts = torch.arange(E_local, device=counts.device, dtype=torch.int32).repeat(W)
    local_ids = torch.repeat_interleave(experts, recv_counts.reshape(-1), output_size=n)
    ones = torch.ones((n, 1), dtype=received.dtype, device=received.device)
    local = ops.routing_from_ids(local_ids.unsqueeze(1), E_local, weights=ones)
    plan = ExpertParallelPlan(local, tuple(send_splits), tuple(recv_splits), x_perm.shape[0], group)
    return ops.permute(received, local), plan


def combine(y_local: Tensor, plan: ExpertParallelPlan) -> Tensor:
    """Sends the experts' outputs back: the inverse of :func:`dispatch`.

    ``y_local [N, d']`` is in ``dispatch``'s output order; returns ``[T * k, d']`` in the order of
    the permuted input of ``dispatch`` (zeros for rows that were not sent), ready for
    :func:`moefast.unpermute`. Differentiable. Collective.
    """
    y_recv = ops.unpermute(y_local, plan.local)  # weights 1: undoes the grouping by local expert
    y = all_to_all(y_recv, plan.send_splits, plan.recv_splits, plan.group)
    missing = plan.num_rows - y.shape[0]
    if missing:
        y = torch.cat([y, y.new_zeros((missing, *y.shape[1:]))])
    return y


# ----------------------------------------------------------------------------- parameters


def _expert_parameter_ids(module: nn.Module) -> set[int]:
    ids: set[int] = set()
    for m in module.modules():
        if getattr(m, "is_expert_parallel", False):
            ids.update(id(p) for p in m.expert_parameters())
    return ids


def expert_parameter_names(module: nn.Module) -> list[str]:
    """Names (as in ``module.named_parameters()``) of the expert-parallel parameters.

    These differ from rank to rank and must not be broadcast or averaged by data parallelism: pass
    them to ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model`` when wrapping
    a model in DDP (and scale their gradients by ``1 / W``, as :func:`sync_gradients` does).
    """
    ids = _expert_parameter_ids(module)
    return [name for name, p in module.named_parameters() if id(p) in ids]


def _replicated(module: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    ids = _expert_parameter_ids(module)
    params, experts = [], []
    for p in module.parameters():
        (experts if id(p) in ids else params).append(p)
    return params, experts


def _coalesced(tensors: Iterable[Tensor], fn) -> None:
    """Calls ``fn`` once per (device, dtype) on a flat copy of ``tensors``, then copies back."""
    buckets: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    for ts in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        fn(flat)
        offset = 0
        for t in ts:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


@torch.no_grad()
def broadcast_replicated_params(module: nn.Module, src: int = 0, group=None) -> None:
    """Copies the replicated parameters and the buffers of group rank ``src`` to every rank.

    Call it once after building a model (and moving it to its device) so that the router and
    every other non-expert parameter start equal on all ranks; the experts are left alone.
    Collective.
    """
    _check_initialized("broadcast_replicated_params")
    params, _ = _replicated(module)
    tensors = [p.data for p in params] + [b for b in module.buffers()]
    if not tensors:
        return
    global_src = dist.get_global_rank(group, src) if group is not None else src
    _coalesced(tensors, lambda flat: dist.broadcast(flat, global_src, group=group))


@torch.no_grad()
def sync_gradients(module: nn.Module, group=None, average: bool = True) -> None:
    """Makes the gradients after ``backward`` those of the whole batch of all ranks.

    Replicated parameters (router, ...) have on each rank the gradient of that rank's tokens;
    they are all-reduced (summed) over ``group``. Expert-parallel parameters already hold the sum
    over all ranks' tokens and stay local. With ``average=True`` (the default, what DDP does)
    every gradient is then divided by the world size: the gradients are those of the mean of the
    ranks' losses. With ``average=False`` they are those of their sum. A parameter without a
    gradient counts as a zero gradient (so that every rank makes the same collective). Use it in
    place of DDP when the group is the whole data-parallel world; with expert-parallel groups
    smaller than the data-parallel world, the expert gradients would also need a reduction over
    the ranks that hold the same experts, which this helper does not do. Collective.
    """
    _check_initialized("sync_gradients")
    W, _ = group_size_and_rank(group)
    for m in module.modules():
        if getattr(m, "is_expert_parallel", False) and m.world_size != W:
            raise NotImplementedError(
                f"sync_gradients: an expert-parallel layer uses a group of {m.world_size} ranks "
                f"but the gradients are synchronised over {W}; only equal groups are supported"
            )
    params, experts = _replicated(module)
    grads = []
    for p in params:
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    if grads:
        _coalesced(grads, lambda flat: dist.all_reduce(flat, group=group))
    if average and W > 1:
        for g in grads:
            g.div_(W)
        for p in experts:
            if p.grad is not None:
                p.grad.div_(W)


# ----------------------------------------------------------------------------- checkpoints


def _expert_parallel_modules(module: nn.Module):
    for name, m in module.named_modules():
        if getattr(m, "is_expert_parallel", False):
            yield (f"{name}." if name else ""), m


def dense_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """``module.state_dict()`` with every expert-parallel layer's experts gathered from all ranks.

    The result is the state dict of the same model built with single-process :class:`MoE` layers
    (all experts), on every rank: save it from one rank, and load it into a model of any world
    size with :func:`load_dense_state_dict` (or into a single-process model as is). Collective.
    """
    state = module.state_dict()
    for prefix, m in _expert_parallel_modules(module):
        for key, value in m.dense_state_dict().items():
            state[prefix + key] = value
    return state


def load_dense_state_dict(module: nn.Module, state_dict: dict[str, Tensor], strict: bool = True):
    """Loads a :func:`dense_state_dict` (all experts), keeping this rank's experts; local."""
    state = dict(state_dict)
    for prefix, m in _expert_parallel_modules(module):
        sub = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        for key, value in m.shard_state_dict(sub).items():
            state[prefix + key] = value
    return module.load_state_dict(state, strict=strict)
