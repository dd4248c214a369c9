"""Expert parallelism for :class:`moefast.nn.MoE`: :class:`ExpertParallelMoE`."""

from __future__ import annotations

import inspect
import itertools
from collections import OrderedDict

import torch
import torch.distributed as dist
from torch import Tensor

from .. import distributed as ep_dist
from .. import ops
from .moe import GroupedLinear, MoE

__all__ = ["ExpertParallelMoE"]

_EXPERTS = ("w1", "w2")


class ExpertParallelMoE(MoE):
    """:class:`MoE` in expert-parallel mode: each rank of a process group holds ``E / W`` experts.

    Takes :class:`MoE`'s arguments plus ``process_group`` (the default group when ``None``; it must
    be initialised before the layer is built). ``num_experts`` is the global number of experts
    ``E`` and must be divisible by the group's size ``W``; rank ``r`` holds the experts
    ``r * E / W`` to ``(r + 1) * E / W - 1`` (see :func:`moefast.distributed.shard_range`), in
    ``w1`` and ``w2`` with the same names as in :class:`MoE` (``w1.weight`` is
    ``[E / W, d_model, ...]``). The router (and anything else outside the experts) is replicated.

    ``forward(x)`` routes this rank's tokens over all ``E`` experts exactly as :class:`MoE` does,
    sends each routed row to the rank that holds its expert (two ``all_to_all_single``: the
    counts, then the rows), runs the local experts with the grouped kernels and sends the results
    back; backward does the reverse. Dropless unless ``capacity_factor`` is set (the capacity is
    then that of :class:`MoE` on this rank's tokens). The output, ``aux_loss`` (the load-balancing
    loss of this rank's tokens) and ``last_routing`` (over the ``E`` experts) are those of the
    single-process :class:`MoE` holding all experts applied to this rank's tokens. Every rank of
    the group must call ``forward`` and ``backward`` (see :mod:`moefast.distributed`).

    Gradients: an expert weight's gradient stays on its rank and sums over every rank's tokens;
    the router's gradient covers this rank's tokens only, like any data-parallel parameter: call
    :func:`moefast.distributed.sync_gradients` after ``backward`` (or use DDP, ignoring
    :func:`moefast.distributed.expert_parameter_names`).

    Construction makes the experts of this rank only (the full set is never allocated). Ranks
    build their routers independently: start from :meth:`from_dense`, or call
    :func:`moefast.distributed.broadcast_replicated_params` once, so that they agree.
    """

    is_expert_parallel = True

    def __init__(self, *args, process_group=None, **kwargs) -> None:
        bound = inspect.signature(MoE.__init__).bind(self, *args, **kwargs)
        bound.apply_defaults()
        device, dtype = bound.arguments["device"], bound.arguments["dtype"]
        bound.arguments["device"] = "meta"  # MoE checks the arguments; nothing is allocated
        super().__init__(*bound.args[1:], **bound.kwargs)
        W, rank = ep_dist.group_size_and_rank(process_group)
        begin, end = ep_dist.shard_range(self.num_experts, W, rank)
        self.process_group = process_group
        self.world_size = W
        self.rank = rank
        self.expert_begin = begin
        self.num_local_experts = end - begin
        factory = {"device": device, "dtype": dtype}
        for name in _EXPERTS:
            full: GroupedLinear = getattr(self, name)
            local = GroupedLinear(
                self.num_local_experts,
                full.in_features,
                full.out_features,
                bias=full.bias is not None,
                **factory,
            )
            setattr(self, name, local)
        # Everything else MoE made (the router) is materialised and initialised as MoE does.
        target = torch.device(device) if device is not None else torch.get_default_device()
        for m in self.modules():
            own = itertools.chain(m.parameters(recurse=False), m.buffers(recurse=False))
            if not any(t.is_meta for t in own):
                continue
            if not hasattr(m, "reset_parameters"):
                raise RuntimeError(
                    f"ExpertParallelMoE: cannot initialise {type(m).__name__} (no reset_parameters)"
                )
            m.to_empty(device=target, recurse=False)
            m.reset_parameters()

    # ------------------------------------------------------------------------- conversion

    @classmethod
    def from_dense(cls, moe: MoE, process_group=None) -> ExpertParallelMoE:
        """This rank's part of a single-process ``moe``: its experts' slice, the router copied.

        Every rank must pass an equal ``moe`` (same seed, or the same checkpoint). The result is
        on ``moe``'s device and dtype and in its training mode.
        """
        weight = moe.router.weight
        layer = cls(
            moe.d_model,
            moe.d_hidden,
            moe.num_experts,
            k=moe.k,
            router=moe.mode,
            normalize=moe.normalize,
            activation=moe.activation,
            bias=moe.w1.bias is not None,
            z_loss_coef=moe.z_loss_coef,
            capacity_factor=moe.capacity_factor,
            device=weight.device,
            dtype=weight.dtype,
            process_group=process_group,
        )
        layer.load_dense_state_dict(moe.state_dict())
        return layer.train(moe.training)

    def _expert_keys(self) -> set[str]:
        return {f"{m}.{n}" for m in _EXPERTS for n, _ in getattr(self, m).named_parameters()}

    def shard_state_dict(self, state_dict: dict[str, Tensor]) -> OrderedDict[str, Tensor]:
        """This rank's slice of the state dict of a single-process :class:`MoE` (no copy)."""
        keys = self._expert_keys()
        begin, end = self.expert_begin, self.expert_begin + self.num_local_experts
        out = OrderedDict()
        for key, value in state_dict.items():
            if key in keys:
                if value.shape[0] != self.num_experts:
                    raise ValueError(
                        f"ExpertParallelMoE: {key} of the dense state dict must have "
                        f"num_experts = {self.num_experts} rows, got shape {tuple(value.shape)}"
                    )
                value = value[begin:end]
            out[key] = value
        return out

    def load_dense_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True):
        """Loads the state dict of a single-process :class:`MoE` (all experts); keeps this slice."""
        return self.load_state_dict(self.shard_state_dict(state_dict), strict=strict)

    @torch.no_grad()
    def dense_state_dict(self) -> OrderedDict[str, Tensor]:
        """The state dict of the equivalent single-process :class:`MoE`, gathered on every rank.

        Collective (one ``all_gather`` per expert tensor); for checkpoints that any world size, or
        a plain :class:`MoE`, can load.
        """
        keys = self._expert_keys()
        out = OrderedDict()
        for key, value in self.state_dict().items():
            if key in keys:
                parts = [torch.empty_like(value) for _ in range(self.world_size)]
                dist.all_gather(parts, value.contiguous(), group=self.process_group)
                value = torch.cat(parts)
            else:
                value = value.clone()
            out[key] = value
        return out

    def expert_parameters(self):
        """The parameters of this rank's experts (local to the rank, not replicated)."""
        for name in _EXPERTS:
            yield from getattr(self, name).parameters()

    # ------------------------------------------------------------------------- forward

    def _expert_outputs(self, xs: Tensor, routing: ops.Routing) -> Tensor:
        # Rows go to the ranks of their experts, through the local experts, and back.
        received, plan = ep_dist.dispatch(xs, routing.counts, self.process_group)
        return ep_dist.combine(self._experts(received, plan.local.offs), plan)

    def extra_repr(self) -> str:
        end = self.expert_begin + self.num_local_experts
        return (
            f"{super().extra_repr()}, world_size={self.world_size}, rank={self.rank}, "
            f"local_experts=[{self.expert_begin}, {end})"
        )
