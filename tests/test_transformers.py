"""moefast as a Hugging Face transformers experts implementation, and moe_from_hf.

Tiny randomly initialised models (no download): the "moefast" experts implementation must match
transformers' own ("eager" and "batched_mm") forward and backward, and ``moe_from_hf(block)`` must
match the block it was made from.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
hf_moe = pytest.importorskip("transformers.integrations.moe")

import moefast.integrations.transformers as moefast_hf  # noqa: E402
from moefast.nn import MoE  # noqa: E402

VOCAB, HIDDEN, INTER, EXPERTS, TOP_K = 64, 32, 64, 8, 2
_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts_per_tok": TOP_K,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def _mixtral(**kw):
    return transformers.MixtralConfig(
        **_COMMON, intermediate_size=INTER, num_local_experts=EXPERTS, **kw
    )


def _qwen2_moe(**kw):
    return transformers.Qwen2MoeConfig(
        **_COMMON,
        intermediate_size=INTER,
        moe_intermediate_size=INTER,
        shared_expert_intermediate_size=48,
        num_experts=EXPERTS,
        norm_topk_prob=False,
        **kw,
    )


def _qwen3_moe(**kw):
    return transformers.Qwen3MoeConfig(
        **_COMMON,
        intermediate_size=INTER,
        moe_intermediate_size=INTER,
        num_experts=EXPERTS,
        norm_topk_prob=True,
        **kw,
    )


def _olmoe(**kw):
    return transformers.OlmoeConfig(
        **_COMMON, intermediate_size=INTER, num_experts=EXPERTS, norm_topk_prob=False, **kw
    )


CONFIGS = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe, "olmoe": _olmoe}
ARCHS = list(CONFIGS)


@pytest.fixture(scope="module", autouse=True)
def _registered():
    moefast_hf.register()


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Deterministic weights, large enough that routers separate the experts clearly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * r)
            elif name.endswith("gate.weight") or "router" in name:
                p.copy_(0.5 * r)
            else:
                p.copy_(r * 0.3 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.1 * r)


def _model_pair(arch: str, dtype: torch.dtype, impl: str = "eager", seed: int = 0):
    """The same tiny causal LM twice: with experts_implementation ``impl`` and "moefast"."""
    cfg = CONFIGS[arch]()
    # from_config writes experts_implementation into the config it is given: one copy each.
    ref = transformers.AutoModelForCausalLM.from_config(
        copy.deepcopy(cfg), experts_implementation=impl, dtype=dtype
    )
    _randomize(ref, seed)
    new = transformers.AutoModelForCausalLM.from_config(
        copy.deepcopy(cfg), experts_implementation="moefast", dtype=dtype
    )
    new.load_state_dict(ref.state_dict())
    assert ref.config._experts_implementation == impl
    assert new.config._experts_implementation == "moefast"
    return ref.eval(), new.eval()


def _tol(dtype):
    return (
        {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    )


# ----------------------------------------------------------------------------- registration


def test_register_is_idempotent_and_listed():
    moefast_hf.register()
    moefast_hf.register()
    assert moefast_hf.is_registered()
    assert "moefast" in hf_moe.ALL_EXPERTS_FUNCTIONS
    assert "moefast" in hf_moe.ALL_EXPERTS_FUNCTIONS.valid_keys()
    assert "moefast" in hf_moe.ExpertsInterface()  # the registration is global
    fn = hf_moe.ALL_EXPERTS_FUNCTIONS.get_interface("moefast", None)
    assert fn is moefast_hf.moefast_experts_forward


def test_import_moefast_does_not_import_transformers():
    code = (
        "import sys, moefast, moefast.integrations, moefast.nn; "
        "assert 'transformers' not in sys.modules, 'transformers was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_name_still_rejected():
    cfg = _qwen3_moe()
    with pytest.raises(ValueError, match="not supported"):
        transformers.AutoModelForCausalLM.from_config(cfg, experts_implementation="nope")


# ----------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("arch", ARCHS)
def test_model_matches_eager_forward_backward(arch, dtype):
    ref, new = _model_pair(arch, dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, 9), generator=g)
    labels = torch.randint(0, VOCAB, (2, 9), generator=g)
    coef = torch.randn(2, 9, VOCAB, generator=g, dtype=dtype)
    outs = []
    for model in (ref, new):
        out = model(input_ids=ids, labels=labels)
        (out.loss + (out.logits * coef).sum()).backward()
        outs.append(out)
    torch.testing.assert_close(outs[1].logits, outs[0].logits, **_tol(dtype))
    torch.testing.assert_close(outs[1].loss, outs[0].loss, **_tol(dtype))
    new_params = dict(new.named_parameters())
    checked = 0
    for name, p in ref.named_parameters():
        q = new_params[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            tol = _tol(dtype)
            # A gradient summed over every token of a whole model (the embedding's reaches 65
            # here) carries float32 rounding in proportion to its largest entries, not to each
            # entry: the absolute tolerance scales with them (float64 keeps 1e-10).
            tol["atol"] = max(tol["atol"], tol["rtol"] * 1e-2 * float(p.grad.abs().max()))
            torch.testing.assert_close(q.grad, p.grad, **tol, msg=name)
            checked += 1
    assert checked == len(new_params)
    # The gradient reaches the expert weights and, through the routing weights, the routers.
    experts = [m for m in new.modules() if hasattr(m, "gate_up_proj")]
    routers = [m.gate for m in new.modules() if hasattr(m, "experts") and hasattr(m, "gate")]
    assert experts and routers
    for m in experts:
        assert m.gate_up_proj.grad.abs().sum() > 0 and m.down_proj.grad.abs().sum() > 0
    for r in routers:
        assert r.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_model_bfloat16_forward(arch):
    ref, new = _model_pair(arch, torch.bfloat16)
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = ref(input_ids=ids).logits.float()
        b = new(input_ids=ids).logits.float()
    assert b.dtype == a.dtype and b.shape == a.shape
    # eager accumulates each expert's contribution in bfloat16, moefast in float32: allow a few
    # bfloat16 ulps of the logits' scale.
    scale = a.abs().max()
    assert (a - b).abs().max() <= 0.03 * scale, ((a - b).abs().max(), scale)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


def test_set_experts_implementation_switches_a_built_model():
    ref, _ = _model_pair("qwen3_moe", torch.float32)
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = ref(input_ids=ids).logits
        ref.set_experts_implementation("moefast")
        assert ref.config._experts_implementation == "moefast"
        b = ref(input_ids=ids).logits
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_model_matches_grouped_mm_implementation():
    ref, new = _model_pair("olmoe", torch.float32, impl="grouped_mm")
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(new(input_ids=ids).logits, ref(input_ids=ids).logits)


# ----------------------------------------------------------------------------- experts variants


class _Norm(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))
        self.bias = torch.nn.Parameter(torch.full((d,), 0.1))  # so that norm(0) != 0

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight + self.bias


def _experts_class(has_gate, has_bias, is_transposed, post_norm):
    @hf_moe.use_experts_implementation(
        has_gate=has_gate,
        has_bias=has_bias,
        is_transposed=is_transposed,
        has_post_expert_norm=post_norm,
    )
    class Experts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            E, H, Inter = EXPERTS, HIDDEN, INTER
            self.num_experts = E
            up_out = 2 * Inter if has_gate else Inter

            def w(out_f, in_f):
                shape = (E, in_f, out_f) if is_transposed else (E, out_f, in_f)
                return torch.nn.Parameter(torch.randn(shape, dtype=torch.float64) / in_f**0.5)

            if has_gate:
                self.gate_up_proj = w(up_out, H)
            else:
                self.up_proj = w(up_out, H)
            self.down_proj = w(H, Inter)
            if has_bias:
                bias = torch.nn.Parameter(torch.randn(E, up_out, dtype=torch.float64))
                setattr(self, "gate_up_proj_bias" if has_gate else "up_proj_bias", bias)
                self.down_proj_bias = torch.nn.Parameter(torch.randn(E, H, dtype=torch.float64))
            if post_norm:
                self.post_expert_norm = _Norm(H).double()
            self.act_fn = torch.nn.SiLU() if has_gate else torch.nn.GELU()

        def forward(self, hidden_states, top_k_index, top_k_weights):  # never used here
            raise AssertionError

    return Experts


def _run(fn, module, x, idx, w):
    for p in module.parameters():
        p.grad = None
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    out = fn(module, x, idx, w)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    (out * gy).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    return out, x.grad, w.grad, grads


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["local", "ep"])
@pytest.mark.parametrize(
    "has_gate,has_bias,is_transposed,post_norm",
    [
        (True, False, False, False),
        (True, True, False, False),
        (True, False, True, False),
        (False, True, True, False),
        (False, False, False, True),
        (True, True, True, True),
    ],
)
def test_experts_variants_match_batched_mm(
    has_gate, has_bias, is_transposed, post_norm, expert_parallel
):
    torch.manual_seed(6)
    cfg = transformers.PretrainedConfig()
    module = _experts_class(has_gate, has_bias, is_transposed, post_norm)(cfg)
    module._is_expert_parallel = expert_parallel
    g = torch.Generator().manual_seed(7)
    S = 13
    x = torch.randn(S, HIDDEN, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOP_K] for _ in range(S)])
    w = torch.rand(S, TOP_K, generator=g, dtype=torch.float64)
    if expert_parallel:
        # Other ranks' experts get the sentinel id num_experts. transformers zeroes their weights,
        # but the forward must not rely on it: they keep weights here, and must still add nothing.
        off_rank = torch.rand(S, TOP_K, generator=g) < 0.3
        off_rank[0] = True  # a token with no local expert at all
        idx = idx.masked_fill(off_rank, EXPERTS)
    ref = _run(hf_moe.batched_mm_experts_forward, module, x, idx, w)
    new = _run(moefast_hf.moefast_experts_forward, module, x, idx, w)
    tol = {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(new[0], ref[0], **tol)
    torch.testing.assert_close(new[1], ref[1], **tol)
    torch.testing.assert_close(new[2], ref[2], **tol)
    assert ref[3].keys() == new[3].keys()
    for name in ref[3]:
        torch.testing.assert_close(new[3][name], ref[3][name], **tol, msg=name)
    if expert_parallel:
        assert (new[2][idx == EXPERTS] == 0).all()
        assert (new[0][0] == 0).all()


def test_experts_default_swiglu_gate_runs_moefast_swiglu_mlp(monkeypatch):
    """With transformers' default gate and SiLU the expert MLP is one moefast.grouped_swiglu_mlp;
    an overridden _apply_gate (or another activation) is called as the model defines it, and both
    match batched_mm."""
    calls = []
    real = moefast_hf.ops.grouped_swiglu_mlp
    monkeypatch.setattr(
        moefast_hf.ops,
        "grouped_swiglu_mlp",
        lambda x, w1, *a: calls.append((x.shape[0], w1.shape[2])) or real(x, w1, *a),
    )
    g = torch.Generator().manual_seed(9)
    S = 11
    x = torch.randn(S, HIDDEN, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOP_K] for _ in range(S)])
    w = torch.rand(S, TOP_K, generator=g, dtype=torch.float64)

    cls = _experts_class(True, False, False, False)
    module = cls(transformers.PretrainedConfig())
    module._is_expert_parallel = False
    ref = _run(hf_moe.batched_mm_experts_forward, module, x, idx, w)
    new = _run(moefast_hf.moefast_experts_forward, module, x, idx, w)
    assert calls == [(S * TOP_K, 2 * INTER)]
    for a, b in zip(new[:3], ref[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)

    class Custom(cls):  # a model with its own gate: silu(gate) * up * 0.5
        def _apply_gate(self, gate_up):
            gate, up = gate_up.chunk(2, dim=-1)
            return 0.5 * self.act_fn(gate) * up

    calls.clear()
    custom = Custom(transformers.PretrainedConfig())
    custom.load_state_dict(module.state_dict())
    custom._is_expert_parallel = False
    ref = _run(hf_moe.batched_mm_experts_forward, custom, x, idx, w)
    new = _run(moefast_hf.moefast_experts_forward, custom, x, idx, w)
    assert calls == []
    for a, b in zip(new[:3], ref[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_experts_forward_casts_inputs_and_output():
    """bfloat16 hidden states with float32 routing weights (Mixtral's router keeps float32)."""
    module = _experts_class(True, False, False, False)(transformers.PretrainedConfig())
    module = module.to(torch.bfloat16)
    module._is_expert_parallel = False
    g = torch.Generator().manual_seed(8)
    x = torch.randn(10, HIDDEN, generator=g).bfloat16()
    idx = torch.randint(0, EXPERTS, (10, TOP_K), generator=g)
    w = torch.rand(10, TOP_K, generator=g)
    out = moefast_hf.moefast_experts_forward(module, x, idx, w)
    ref = hf_moe.batched_mm_experts_forward(module, x, idx, w)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["local", "ep"])
def test_experts_forward_traces_without_graph_breaks(expert_parallel):
    """fullgraph tracing fails on host reads (.item(), .tolist(), data-dependent shapes)."""
    module = _experts_class(True, True, False, True)(transformers.PretrainedConfig())
    module._is_expert_parallel = expert_parallel
    g = torch.Generator().manual_seed(14)
    x = torch.randn(9, HIDDEN, generator=g, dtype=torch.float64)
    idx = torch.randint(0, EXPERTS + int(expert_parallel), (9, TOP_K), generator=g)
    w = torch.rand(9, TOP_K, generator=g, dtype=torch.float64)
    torch._dynamo.reset()
    traced = torch.compile(moefast_hf.moefast_experts_forward, backend="eager", fullgraph=True)
    torch.testing.assert_close(
        traced(module, x, idx, w), moefast_hf.moefast_experts_forward(module, x, idx, w)
    )


# ----------------------------------------------------------------------------- moe_from_hf


def _block(arch, dtype=torch.float32, **cfg_kw):
    cfg = CONFIGS[arch](**cfg_kw)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, experts_implementation="eager", dtype=dtype
    )
    _randomize(model, 9)
    return model.model.layers[0].mlp


@pytest.mark.parametrize("arch", ARCHS)
def test_moe_from_hf_matches_block(arch):
    block = _block(arch)
    moe = moe_from_hf_checked(block, arch)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(3, 7, HIDDEN, generator=g)
    gy = torch.randn(3, 7, HIDDEN, generator=g)
    outs, grads = [], []
    for layer in (block, moe):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        (y * gy).sum().backward()
        outs.append(y)
        grads.append(xi.grad)
    assert outs[1].shape == outs[0].shape
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    # Parameter gradients, mapped back to the Hugging Face layout.
    inner = moe.moe if isinstance(moe, moefast_hf.HFMoEBlock) else moe
    tol = {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(inner.router.weight.grad, block.gate.weight.grad, **tol)
    torch.testing.assert_close(
        inner.w1.weight.grad, block.experts.gate_up_proj.grad.transpose(1, 2), **tol
    )
    torch.testing.assert_close(
        inner.w2.weight.grad, block.experts.down_proj.grad.transpose(1, 2), **tol
    )
    if arch == "qwen2_moe":
        torch.testing.assert_close(
            moe.shared_expert.gate_proj.weight.grad,
            block.shared_expert.gate_proj.weight.grad,
            **tol,
        )
        torch.testing.assert_close(
            moe.shared_expert_gate.weight.grad, block.shared_expert_gate.weight.grad, **tol
        )


def moe_from_hf_checked(block, arch):
    moe = moefast_hf.moe_from_hf(block)
    inner = moe
    if arch == "qwen2_moe":
        assert isinstance(moe, moefast_hf.HFMoEBlock)
        inner = moe.moe
    else:
        assert isinstance(moe, MoE)
    assert inner.activation == "swiglu" and inner.mode == "softmax_topk" and inner.k == TOP_K
    assert inner.normalize == (arch in ("mixtral", "qwen3_moe"))
    assert inner.w1.bias is None and inner.w2.bias is None
    # Copies, not views: the converted layer trains on its own.
    assert inner.w1.weight.data_ptr() != block.experts.gate_up_proj.data_ptr()
    return moe


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_from_hf_bfloat16(arch):
    block = _block(arch, torch.bfloat16)
    moe = moefast_hf.moe_from_hf(block)
    x = torch.randn(4, 5, HIDDEN, generator=torch.Generator().manual_seed(11)).bfloat16()
    with torch.no_grad():
        a, b = block(x).float(), moe(x).float()
    assert moe(x).dtype == torch.bfloat16
    assert (a - b).abs().max() <= 0.03 * a.abs().max()


def test_moe_from_hf_mixtral_jitter():
    block = _block("mixtral", router_jitter_noise=0.1)
    moe = moefast_hf.moe_from_hf(block)
    assert isinstance(moe, moefast_hf.HFMoEBlock) and moe.jitter_noise == 0.1
    x = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(12))
    for training in (False, True):
        block.train(training)
        moe.train(training)
        torch.manual_seed(13)
        a = block(x.clone())  # transformers' jitter multiplies its input in place
        torch.manual_seed(13)
        b = moe(x)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert not torch.equal(a, block.eval()(x.clone()))  # the noise did act in training


def test_moe_from_hf_rejects_unsupported():
    with pytest.raises(TypeError, match="unsupported block"):
        moefast_hf.moe_from_hf(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="SiLU"):
        moefast_hf.moe_from_hf(_block("olmoe", hidden_act="gelu"))
