"""Hugging Face transformers integration: moefast as an *experts implementation*, and block conversion.

transformers (5.x) routes the experts of its MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and
the other classes decorated with ``@use_experts_implementation``) through a registry of experts
forwards, ``transformers.integrations.moe.ExpertsInterface``, chosen by
``config._experts_implementation``. :func:`register` adds moefast's forward under the name
``"moefast"``::

    import moefast.integrations.transformers as moefast_hf

    moefast_hf.register()
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="moefast")
    # or: AutoModelForCausalLM.from_config(config, experts_implementation="moefast")
    # or, on a model already built: model.set_experts_implementation("moefast")

The router stays the model's own; only the experts run on moefast (``routing_from_ids`` ->
``permute`` -> ``grouped_mm`` -> gate -> ``grouped_mm`` -> ``unpermute``; a default SwiGLU
gate runs the expert MLP as one ``grouped_swiglu_mlp``), with the expert weights
used in place, in their Hugging Face layout, as transposed views. Gradients reach the hidden states,
the expert weights (and biases) and the routing weights, hence the router.

:func:`moe_from_hf` goes further and turns a whole sparse-MoE block (router included) into a
:class:`moefast.nn.MoE` with copied weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..nn import MoE

try:
    from transformers.integrations import moe as _hf_moe
    from transformers.integrations.moe import ExpertsInterface
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(
        "moefast.integrations.transformers needs Hugging Face transformers 5.x (with "
        "transformers.integrations.moe.ExpertsInterface); install it with `pip install "
        "'transformers>=5'`."
    ) from exc

__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "HFMoEBlock",
    "is_registered",
    "moe_from_hf",
    "moefast_experts_forward",
    "register",
]

#: The name under which :func:`register` adds moefast to transformers' ``ExpertsInterface``.
EXPERTS_IMPLEMENTATION = "moefast"

# transformers' gate, act(gate) * up with the gate half first, installed on every experts class
# that defines no _apply_gate of its own (private; absent from some versions).
_default_apply_gate = getattr(_hf_moe, "_default_apply_gate", None)


# ----------------------------------------------------------------------------- experts forward


def _grouped_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    offs: Tensor,
    is_transposed: bool,
) -> Tensor:
    """``x [N, in]`` times the HF expert weights ``[E, out, in]`` (``[E, in, out]`` if transposed)."""
    # The [E, in, out] operand that grouped_mm wants, as a view: no copy of the weights.
    w = weight if is_transposed else weight.transpose(1, 2)
    x = x.to(w.dtype)
    # The bias is added inside the GEMM, to the rows of its group only.
    return ops.grouped_mm(x, w, offs, None if bias is None else bias.to(x.dtype))


def moefast_experts_forward(
    self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """The ``"moefast"`` experts implementation: an ``ExpertsInterface`` forward.

    ``self`` is an experts module decorated with transformers' ``@use_experts_implementation``;
    ``hidden_states [S, H]``, ``top_k_index [S, k]`` (expert ids) and ``top_k_weights [S, k]``
    come from the model's router. Handles what transformers' ``grouped_mm`` forward handles:
    gated (``gate_up_proj`` through ``self._apply_gate``) and plain (``up_proj`` through
    ``self.act_fn``) experts, ``is_transposed`` weights, per-expert biases, a post-expert norm, and
    expert parallelism (ids ``>= num_experts`` are other ranks' experts: they cost no GEMM work and
    contribute nothing, not even a router gradient). Sync-free: nothing is read back to the host.
    """
    num_experts = self.num_experts
    # Set by @use_experts_implementation; the defaults are its own.
    has_gate = getattr(self, "has_gate", True)
    has_bias = getattr(self, "has_bias", False)
    is_transposed = getattr(self, "is_transposed", False)
    expert_parallel = bool(getattr(self, "_is_expert_parallel", False))
    if expert_parallel:
        # Sentinels go to a phantom group E, sorted after every real expert, so that grouped_mm
        # (given the first E offsets only) leaves their rows at zero; their weights are zeroed so
        # that they add nothing, forward or backward, whatever the caller passed.
        sentinel = top_k_index >= num_experts
        routing = ops.routing_from_ids(
            top_k_index.clamp(max=num_experts),
            num_experts + 1,
            weights=top_k_weights.masked_fill(sentinel, 0.0),
        )
        offs = routing.offs[:num_experts]
    else:
        routing = ops.routing_from_ids(top_k_index, num_experts, weights=top_k_weights)
        offs = routing.offs

    if has_gate:
        up_weight = self.gate_up_proj
        up_bias = self.gate_up_proj_bias if has_bias else None
    else:
        up_weight = self.up_proj
        up_bias = self.up_proj_bias if has_bias else None
    down_bias = self.down_proj_bias if has_bias else None

    x = ops.permute(hidden_states.to(up_weight.dtype), routing)  # [S * k, H], grouped by expert
    if has_gate and _default_swiglu_gate(self):
        # The whole SwiGLU expert MLP as one op (expert by expert on the CPU); the [E, in, out]
        # operands are views of the HF weights, no copies.
        w1 = up_weight if is_transposed else up_weight.transpose(1, 2)
        w2 = self.down_proj if is_transposed else self.down_proj.transpose(1, 2)
        y = ops.grouped_swiglu_mlp(
            x,
            w1,
            None if up_bias is None else up_bias.to(x.dtype),
            w2.to(x.dtype),
            None if down_bias is None else down_bias.to(x.dtype),
            offs,
        )
    else:
        h = _grouped_linear(x, up_weight, up_bias, offs, is_transposed)
        h = self._apply_gate(h) if has_gate else self.act_fn(h)
        y = _grouped_linear(h, self.down_proj, down_bias, offs, is_transposed)
    if getattr(self, "has_post_expert_norm", False):
        y = self.post_expert_norm(y)

    # Weighted sum of each token's k expert outputs (float32 accumulation for 16-bit y).
    return ops.unpermute(y, routing).to(hidden_states.dtype)


# ----------------------------------------------------------------------------- registration


def register(name: str = EXPERTS_IMPLEMENTATION) -> None:
    """Adds :func:`moefast_experts_forward` to transformers' ``ExpertsInterface`` as ``name``.

    Afterwards ``experts_implementation="moefast"`` is accepted by ``from_pretrained``,
    ``from_config``, the config constructors and ``model.set_experts_implementation``. The
    registration is global (every ``ExpertsInterface`` instance sees it) and idempotent.
    """
    ExpertsInterface.register(name, moefast_experts_forward)


def is_registered(name: str = EXPERTS_IMPLEMENTATION) -> bool:
    """Whether ``name`` is registered in transformers' ``ExpertsInterface``."""
    return name in ExpertsInterface()


# ----------------------------------------------------------------------------- block conversion


def _silu_like(act: nn.Module | object) -> bool:
    from transformers.activations import SiLUActivation

    return isinstance(act, (SiLUActivation, nn.SiLU)) or act is torch.nn.functional.silu


def _default_swiglu_gate(experts: nn.Module) -> bool:
    """Whether the experts gate with transformers' default ``act_fn(gate) * up`` and SiLU, which
    is exactly :func:`moefast.swiglu` (a model that overrides ``_apply_gate`` keeps its own)."""
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # pragma: no cover (older transformers)
        return False
    gate = getattr(type(experts), "_apply_gate", None)
    return gate is _default_apply_gate and _silu_like(getattr(experts, "act_fn", None))


def _copy_linear(layer: nn.Linear) -> nn.Linear:
    out = nn.Linear(
        layer.in_features,
        layer.out_features,
        bias=layer.bias is not None,
        device=layer.weight.device,
        dtype=layer.weight.dtype,
    )
    with torch.no_grad():
        out.weight.copy_(layer.weight)
        if layer.bias is not None:
            out.bias.copy_(layer.bias)
    return out


class _SharedExpert(nn.Module):
    """A dense gated MLP, ``down(act(gate(x)) * up(x))``: a copy of Qwen2-MoE's shared expert."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.gate_proj = _copy_linear(mlp.gate_proj)
        self.up_proj = _copy_linear(mlp.up_proj)
        self.down_proj = _copy_linear(mlp.down_proj)
        self.act_fn = mlp.act_fn  # stateless

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class HFMoEBlock(nn.Module):
    """A :class:`moefast.nn.MoE` plus the parts of a Hugging Face block that ``MoE`` has no option for.

    ``moe_from_hf`` returns one for Qwen2-MoE (a shared expert, ``shared_expert``, scaled by
    ``sigmoid(shared_expert_gate(x))`` and added to the routed output) and for Mixtral blocks with
    ``router_jitter_noise > 0`` (in training the input is multiplied by ``U(1 - j, 1 + j)`` noise
    before the router and experts, out of place). ``forward(x [..., H])`` returns a tensor of the
    shape of ``x``; ``aux_loss`` is the load-balancing loss of the routed part.
    """

    def __init__(
        self,
        moe: MoE,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: nn.Module | None = None,
        jitter_noise: float = 0.0,
    ) -> None:
        super().__init__()
        self.moe = moe
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        self.jitter_noise = float(jitter_noise)

    @property
    def aux_loss(self) -> Tensor | None:
        return self.moe.aux_loss

    def forward(self, hidden_states: Tensor) -> Tensor:
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(hidden_states)
            noise.uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            hidden_states = hidden_states * noise
        out = self.moe(hidden_states)
        if self.shared_expert is not None:
            shared = self.shared_expert(hidden_states)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(hidden_states)) * shared
            out = out + shared
        return out

    def extra_repr(self) -> str:
        return f"jitter_noise={self.jitter_noise}" if self.jitter_noise else ""


def _supported_blocks() -> dict[type, tuple[type, str]]:
    """{sparse-MoE block class: (its router class, kind)}, for the models moe_from_hf knows."""
    from transformers.models.mixtral import modeling_mixtral as mixtral
    from transformers.models.olmoe import modeling_olmoe as olmoe
    from transformers.models.qwen2_moe import modeling_qwen2_moe as qwen2_moe
    from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3_moe

    return {
        mixtral.MixtralSparseMoeBlock: (mixtral.MixtralTopKRouter, "mixtral"),
        qwen2_moe.Qwen2MoeSparseMoeBlock: (qwen2_moe.Qwen2MoeTopKRouter, "qwen2_moe"),
        qwen3_moe.Qwen3MoeSparseMoeBlock: (qwen3_moe.Qwen3MoeTopKRouter, "plain"),
        olmoe.OlmoeSparseMoeBlock: (olmoe.OlmoeTopKRouter, "plain"),
    }


def moe_from_hf(block: nn.Module) -> MoE | HFMoEBlock:
    """A :class:`moefast.nn.MoE` computing what the Hugging Face sparse-MoE block ``block`` computes.

    Supported blocks: ``MixtralSparseMoeBlock``, ``Qwen3MoeSparseMoeBlock``, ``OlmoeSparseMoeBlock``
    (returned as a plain ``MoE``) and ``Qwen2MoeSparseMoeBlock`` (an :class:`HFMoEBlock` holding the
    ``MoE`` and a copy of the shared expert and its gate). Their routers are all "softmax over the
    experts in float32, top-k, then divide by the sum of the k if ``norm_topk_prob``" (always for
    Mixtral), with no router bias: ``MoE(router="softmax_topk", normalize=...)``. The experts must
    be SwiGLU (``hidden_act`` ``"silu"``, gate half first) without biases:
    ``activation="swiglu", bias=False``. The weights are copied, on the block's device and dtype:
    ``w1.weight = gate_up_proj.transpose(1, 2)``, ``w2.weight = down_proj.transpose(1, 2)``,
    ``router.weight = gate.weight``.

    The result, like the block in transformers 5.x, maps ``[..., H]`` to a tensor of the same
    shape (it returns no router logits; ``moe.last_routing`` and ``moe.aux_loss`` hold the
    routing and the load-balancing loss of the last call). Known differences, at rounding level:
    for float64 inputs moefast's softmax runs in float64 (transformers' in float32); for 16-bit
    inputs the routing weights are rounded to the input dtype (Mixtral keeps them in float32);
    ties between equal router logits go to the lower expert index.
    """
    table = _supported_blocks()
    entry = table.get(type(block))
    if entry is None:
        names = ", ".join(sorted(cls.__name__ for cls in table))
        raise TypeError(
            f"moe_from_hf: unsupported block {type(block).__name__}; supported: {names}. "
            "Other models can still run their experts on moefast with "
            f'experts_implementation="{EXPERTS_IMPLEMENTATION}" (see register()).'
        )
    router_cls, kind = entry
    gate, experts = block.gate, block.experts
    if type(gate) is not router_cls:
        raise TypeError(
            f"moe_from_hf: {type(block).__name__}.gate must be a {router_cls.__name__} (its routing "
            f"rule is the one mapped), got {type(gate).__name__}"
        )
    if getattr(gate, "bias", None) is not None:
        raise ValueError("moe_from_hf: routers with a bias are not supported by moefast.nn.MoE")
    if not getattr(experts, "has_gate", True) or not hasattr(experts, "gate_up_proj"):
        raise ValueError("moe_from_hf: the experts must be gated (gate_up_proj)")
    if getattr(experts, "has_bias", False) or getattr(experts, "has_post_expert_norm", False):
        raise ValueError("moe_from_hf: experts with biases or a post-expert norm are not supported")
    if not getattr(experts, "is_concatenated", True):
        raise ValueError("moe_from_hf: interleaved gate/up weights are not supported")
    if getattr(type(experts), "_apply_gate", None) not in (None, _default_apply_gate):
        raise ValueError(
            f"moe_from_hf: {type(experts).__name__} has a custom _apply_gate; only "
            "act(gate) * up with the gate half first maps onto activation='swiglu'"
        )
    if not _silu_like(experts.act_fn):
        raise ValueError(
            f"moe_from_hf: the experts' activation must be SiLU (hidden_act 'silu' or 'swish') "
            f"to map onto activation='swiglu', got {type(experts.act_fn).__name__}"
        )

    gate_up, down = experts.gate_up_proj, experts.down_proj
    if getattr(experts, "is_transposed", False):  # [E, H, 2I] and [E, I, H]: already moefast's
        w1, w2 = gate_up, down
    else:  # [E, 2I, H] and [E, H, I]
        w1, w2 = gate_up.transpose(1, 2), down.transpose(1, 2)
    num_experts, hidden, two_inter = w1.shape
    if two_inter % 2 or w2.shape != (num_experts, two_inter // 2, hidden):
        raise ValueError(
            f"moe_from_hf: inconsistent expert weights, gate_up_proj {tuple(gate_up.shape)} and "
            f"down_proj {tuple(down.shape)}"
        )
    if tuple(gate.weight.shape) != (num_experts, hidden):
        raise ValueError(
            f"moe_from_hf: router weight must be [E, H] = [{num_experts}, {hidden}], "
            f"got {tuple(gate.weight.shape)}"
        )
    normalize = True if kind == "mixtral" else bool(gate.norm_topk_prob)
    moe = MoE(
        d_model=hidden,
        d_hidden=two_inter // 2,
        num_experts=num_experts,
        k=int(gate.top_k),
        router="softmax_topk",
        normalize=normalize,
        activation="swiglu",
        bias=False,
        device=gate_up.device,
        dtype=gate_up.dtype,
    )
    with torch.no_grad():
        moe.w1.weight.copy_(w1)
        moe.w2.weight.copy_(w2)
        moe.router.weight.copy_(gate.weight)
    moe.train(block.training)

    jitter = float(getattr(block, "jitter_noise", 0.0) or 0.0) if kind == "mixtral" else 0.0
    if kind == "qwen2_moe":
        wrapped = HFMoEBlock(
            moe,
            shared_expert=_SharedExpert(block.shared_expert),
            shared_expert_gate=_copy_linear(block.shared_expert_gate),
        )
    elif jitter > 0:
        wrapped = HFMoEBlock(moe, jitter_noise=jitter)
    else:
        return moe
    wrapped.train(block.training)
    return wrapped
