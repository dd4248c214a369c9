"""Drop-in ``torch.nn`` layers on top of the moefast ops: :class:`GroupedLinear` and :class:`MoE`."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import ops

ACTIVATIONS = ("gelu", "relu", "silu", "swiglu")


class GroupedLinear(nn.Module):
    """``E`` independent linear maps applied to row groups: ``y[rows of e] = x[rows of e] @ W[e] + b[e]``.

    ``weight`` is ``[E, in_features, out_features]`` (the ``torch._grouped_mm`` layout) and ``bias``
    ``[E, out_features]``. ``forward(x [N, in], offs [E])`` takes the int32 cumulative row ends of
    the groups (``Routing.offs``); rows past ``offs[-1]`` come out as zeros (no bias); the bias is
    added inside the grouped GEMM. Each expert is initialised as ``nn.Linear(in_features, out_features)`` would be.
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if num_experts < 1 or in_features < 1 or out_features < 1:
            raise ValueError(
                "GroupedLinear: num_experts, in_features and out_features must be positive, got "
                f"{num_experts}, {in_features}, {out_features}"
            )
        factory = {"device": device, "dtype": dtype}
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, out_features, **factory))
        self.bias = (
            nn.Parameter(torch.empty(num_experts, out_features, **factory)) if bias else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's kaiming_uniform_(a=sqrt(5)) amounts to U(-1/sqrt(in), 1/sqrt(in)) for the
        # weight, and its bias uses the same bound.
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, offs: Tensor) -> Tensor:
        return ops.grouped_mm(x, self.weight, offs, self.bias)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, in_features={self.in_features}, "
            f"out_features={self.out_features}, bias={self.bias is not None}"
        )


def _plain(m: nn.Module) -> bool:
    """A GroupedLinear whose forward nothing overrides or hooks, so that a fused op may stand in
    for calling it."""
    from torch.nn.modules import module as _m

    return (
        type(m) is GroupedLinear
        and not (m._forward_hooks or m._forward_pre_hooks)
        and not (_m._global_forward_hooks or _m._global_forward_pre_hooks)
    )


class MoE(nn.Module):
    """A dropless mixture-of-experts feed-forward block.

    ``forward(x [..., d_model])`` routes each token to ``k`` of ``num_experts`` two-layer MLPs
    (``w2(act(w1(x)))``) and returns the weighted sum of their outputs, in the shape of ``x``.
    Routers: ``"softmax_topk"``, ``"topk_softmax"``, ``"hard"`` (``k == 1``), ``"dense"``
    (``k == num_experts``); see :func:`moefast.route`. Activations: ``gelu``, ``relu``, ``silu``,
    and ``swiglu`` (``w1`` then has ``2 * d_hidden`` outputs, the gate half first, then the up
    half: ``silu(gate) * up``). After each call ``aux_loss`` holds the load-balancing loss
    (plus ``z_loss_coef`` times the router z-loss) to add to the training loss, and
    ``last_routing`` the :class:`moefast.Routing` used.

    Dropless by default: every token reaches all ``k`` of its experts. With ``capacity_factor``
    set, each expert takes at most ``ceil(capacity_factor * T * k / num_experts)`` token slots of a
    call's ``T`` tokens, and the rest are dropped by the policy of :func:`moefast.apply_capacity`
    (first choices before second choices, earlier tokens first; a dropped slot adds nothing to its
    token's output, and the other weights are not renormalised). The balance loss is computed on
    the router's choices before dropping.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        k: int = 2,
        router: str = "softmax_topk",
        normalize: bool = False,
        activation: str = "gelu",
        bias: bool = True,
        z_loss_coef: float = 0.0,
        capacity_factor: float | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if router not in ops.ROUTER_MODES:
            raise ValueError(f"MoE: router must be one of {ops.ROUTER_MODES}, got {router!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"MoE: activation must be one of {ACTIVATIONS}, got {activation!r}")
        if not 1 <= k <= num_experts:
            raise ValueError(f"MoE: k must be in [1, num_experts] = [1, {num_experts}], got {k}")
        if router == "hard" and k != 1:
            raise ValueError(f"MoE: router 'hard' needs k == 1, got k={k}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(
                f"MoE: capacity_factor must be positive or None, got {capacity_factor}"
            )
        if router == "dense" and k != num_experts:
            raise ValueError(
                f"MoE: router 'dense' needs k == num_experts == {num_experts}, got {k}"
            )
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_hidden = d_hidden
        self.num_experts = num_experts
        self.k = k
        self.mode = router
        self.normalize = normalize
        self.activation = activation
        self.z_loss_coef = z_loss_coef
        self.capacity_factor = capacity_factor
        self.router = nn.Linear(d_model, num_experts, bias=False, **factory)
        w1_out = 2 * d_hidden if activation == "swiglu" else d_hidden
        self.w1 = GroupedLinear(num_experts, d_model, w1_out, bias=bias, **factory)
        self.w2 = GroupedLinear(num_experts, d_hidden, d_model, bias=bias, **factory)
        self.aux_loss: Tensor | None = None
        self.last_routing: ops.Routing | None = None

    def _act(self, h: Tensor) -> Tensor:
        if self.activation == "gelu":
            return F.gelu(h)
        if self.activation == "relu":
            return F.relu(h)
        if self.activation == "silu":
            return F.silu(h)
        return ops.swiglu(h)

    def _experts(self, xs: Tensor, offs: Tensor) -> Tensor:
        """The experts' MLPs on rows grouped by expert (``offs``: cumulative row ends).

        Without autograd (inference, ``torch.no_grad``) the first GEMM and the activation run as
        one :func:`moefast.grouped_mm_act`, which on CUDA applies the bias and the activation in
        the GEMM's epilogue; with autograd they stay apart, so that the backward reuses the
        stored pre-activation instead of recomputing it. A SwiGLU MLP in training runs as
        :func:`moefast.grouped_swiglu_mlp`, expert by expert on the CPU.
        """
        w1, w2 = self.w1, self.w2
        needs_grad = torch.is_grad_enabled() and (
            xs.requires_grad
            or any(p.requires_grad for p in w1.parameters())
            or any(p.requires_grad for p in w2.parameters())
        )
        if needs_grad and self.activation == "swiglu" and _plain(w1) and _plain(w2):
            return ops.grouped_swiglu_mlp(xs, w1.weight, w1.bias, w2.weight, w2.bias, offs)
        if needs_grad:
            h = self._act(w1(xs, offs))
        else:
            h = ops.grouped_mm_act(xs, w1.weight, offs, w1.bias, self.activation)
        return w2(h, offs)

    def _expert_outputs(self, xs: Tensor, routing: ops.Routing) -> Tensor:
        """Expert outputs of the permuted rows ``xs``; expert parallelism overrides this step."""
        return self._experts(xs, routing.offs)

    def forward(self, x: Tensor) -> Tensor:
        name = type(self).__name__
        if x.shape[-1] != self.d_model:
            raise ValueError(
                f"{name}: the last dimension of x must be d_model = {self.d_model}, "
                f"got shape {tuple(x.shape)}"
            )
        param_dtype = self.router.weight.dtype
        if x.dtype != param_dtype and not ops._autocast_enabled(x.device):
            raise TypeError(
                f"{name}: x is {x.dtype} but the layer's parameters are {param_dtype}; convert "
                "one of them, or run under torch.autocast"
            )
        tokens = x.reshape(-1, self.d_model)
        logits = self.router(tokens)
        chosen = ops.route(logits, self.k, mode=self.mode, normalize=self.normalize)
        routing = chosen
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * tokens.shape[0] * self.k / self.num_experts)
            routing = ops.apply_capacity(chosen, capacity)
        y = self._expert_outputs(ops.permute(tokens, routing), routing)
        out = ops.unpermute(y, routing)
        aux = ops.load_balancing_loss(logits, chosen)
        if self.z_loss_coef:
            aux = aux + self.z_loss_coef * ops.z_loss(logits)
        self.aux_loss = aux
        self.last_routing = routing
        return out.reshape(x.shape)

    @classmethod
    def from_hf(cls, block: nn.Module) -> nn.Module:
        """Converts a Hugging Face sparse-MoE block (Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE) into a
        moefast layer with the same function; see
        :func:`moefast.integrations.transformers.moe_from_hf` (needs ``transformers``)."""
        from ..integrations.transformers import moe_from_hf

        return moe_from_hf(block)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_hidden={self.d_hidden}, num_experts={self.num_experts}, "
            f"k={self.k}, router={self.mode!r}, normalize={self.normalize}, "
            f"activation={self.activation!r}, capacity_factor={self.capacity_factor}"
        )
