"""moefast.nn.GroupedLinear and moefast.nn.MoE against a plain-PyTorch MoE layer."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import moefast
from moefast import reference
from moefast.nn import ACTIVATIONS, GroupedLinear, MoE


def reference_moe(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same layer written with a loop over tokens' choices and dense per-expert matmuls."""
    tokens = x.reshape(-1, moe.d_model)
    logits = tokens @ moe.router.weight.t()
    weights, ids = reference.route(logits, moe.k, moe.mode, moe.normalize)
    out = torch.zeros_like(tokens)
    for j in range(moe.k):
        for e in range(moe.num_experts):
            rows = (ids[:, j] == e).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            h = tokens[rows] @ moe.w1.weight[e] + moe.w1.bias[e]
            if moe.activation == "swiglu":
                gate, up = h.chunk(2, dim=-1)
                h = F.silu(gate) * up
            else:
                h = getattr(F, moe.activation)(h)
            y = h @ moe.w2.weight[e] + moe.w2.bias[e]
            out = out.index_add(0, rows, weights[rows, j, None] * y)
    return out.reshape(x.shape), reference.load_balancing_loss(logits, ids)


CASES = [
    ("softmax_topk", 2, False),
    ("softmax_topk", 2, True),
    ("topk_softmax", 3, False),
    ("hard", 1, False),
    ("dense", 4, False),
]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(("router", "k", "normalize"), CASES)
def test_moe_matches_reference_forward_and_backward(router, k, normalize, activation):
    torch.manual_seed(0)
    moe = MoE(12, 20, 4, k=k, router=router, normalize=normalize, activation=activation).double()
    x = torch.randn(3, 7, 12, dtype=torch.float64, requires_grad=True)
    y = moe(x)
    assert y.shape == x.shape
    (y.square().sum() + moe.aux_loss).backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in moe.parameters()]

    x.grad = None
    moe.zero_grad(set_to_none=True)
    y_ref, aux_ref = reference_moe(moe, x)
    (y_ref.square().sum() + aux_ref).backward()
    want = [x.grad] + [p.grad for p in moe.parameters()]

    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(moe.aux_loss, aux_ref)
    for name, g, w in zip(["x"] + [n for n, _ in moe.named_parameters()], got, want, strict=True):
        if w is None:  # the hard router gives the router no gradient
            assert router == "hard" and name == "router.weight"
            continue
        torch.testing.assert_close(g, w, msg=lambda m, name=name: f"{name}: {m}")


def test_moe_swiglu_training_runs_the_fused_op_unless_hooked(monkeypatch):
    """In training, a SwiGLU MoE on the CPU runs its experts as one grouped_swiglu_mlp; a forward
    hook on w1 or w2 (or a subclass) makes it call the modules instead, so the hook still fires.
    Both give the same results."""
    torch.manual_seed(0)
    moe = MoE(8, 6, 4, k=2, activation="swiglu")
    x = torch.randn(10, 8, requires_grad=True)
    calls = []
    real = moefast.ops.grouped_swiglu_mlp
    monkeypatch.setattr(moefast.ops, "grouped_swiglu_mlp", lambda *a: calls.append(1) or real(*a))
    y_fused = moe(x)
    assert calls == [1]
    seen = []
    handle = moe.w1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    y_hooked = moe(x)
    handle.remove()
    assert calls == [1] and seen == [(20, 12)]
    torch.testing.assert_close(y_fused, y_hooked)
    g = torch.randn_like(y_fused)
    got = torch.autograd.grad(y_fused, [x, *moe.parameters()], g)
    want = torch.autograd.grad(y_hooked, [x, *moe.parameters()], g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_grouped_linear_bias_only_on_routed_rows():
    torch.manual_seed(1)
    lin = GroupedLinear(3, 5, 4)
    x = torch.randn(9, 5)
    offs = torch.tensor([2, 2, 6], dtype=torch.int32)  # expert 1 empty, rows 6..8 unused
    y = lin(x, offs)
    torch.testing.assert_close(y[:2], x[:2] @ lin.weight[0] + lin.bias[0])
    torch.testing.assert_close(y[2:6], x[2:6] @ lin.weight[2] + lin.bias[2])
    assert torch.equal(y[6:], torch.zeros(3, 4))


def test_grouped_linear_initialises_like_linear():
    torch.manual_seed(2)
    lin = GroupedLinear(16, 64, 32)
    bound = 1 / 64**0.5
    for p in (lin.weight, lin.bias):
        assert p.abs().max() <= bound
        assert p.abs().max() > 0.9 * bound  # spread over the whole range, not a constant
    # the spread matches nn.Linear's (uniform on [-bound, bound] has std bound / sqrt(3))
    assert abs(lin.weight.std().item() - bound / 3**0.5) < 0.05 * bound


def test_state_dict_round_trip():
    torch.manual_seed(3)
    a = MoE(8, 16, 4, k=2, activation="swiglu")
    b = MoE(8, 16, 4, k=2, activation="swiglu")
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 8)
    torch.testing.assert_close(a(x), b(x))
    assert set(a.state_dict()) == {"router.weight", "w1.weight", "w1.bias", "w2.weight", "w2.bias"}
    assert a.w1.weight.shape == (4, 8, 32)


def test_moe_bfloat16_close_to_float32():
    torch.manual_seed(4)
    moe = MoE(32, 64, 8, k=2)
    x = torch.randn(64, 32)
    # well-separated router logits so that bfloat16 picks the same experts
    y32 = moe(x)
    ids32 = moe.last_routing.expert_ids
    y16 = moe.to(torch.bfloat16)(x.bfloat16())
    same = (moe.last_routing.expert_ids == ids32).all(dim=1)
    assert same.float().mean() > 0.8
    torch.testing.assert_close(y16.float()[same], y32[same], atol=5e-2, rtol=5e-2)


def test_moe_bad_arguments():
    with pytest.raises(ValueError, match="d_model"):
        MoE(8, 16, 4)(torch.randn(3, 9))
    with pytest.raises(ValueError, match="k must be"):
        MoE(8, 16, 4, k=5)
    with pytest.raises(ValueError, match="hard"):
        MoE(8, 16, 4, k=2, router="hard")
    with pytest.raises(ValueError, match="dense"):
        MoE(8, 16, 4, k=2, router="dense")
    with pytest.raises(ValueError, match="activation"):
        MoE(8, 16, 4, activation="tanh")
    with pytest.raises(ValueError, match="router"):
        MoE(8, 16, 4, router="top1")
    with pytest.raises(TypeError, match=r"x is torch\.float64"):
        MoE(8, 16, 4)(torch.randn(3, 8, dtype=torch.float64))


def test_demo_runs_and_reports_accuracy(capsys):
    pytest.importorskip("sklearn")
    from moefast import demo

    assert demo.main(["--epochs", "2", "--experts", "4"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("MoE held-out accuracy"))
    accuracy = float(line.split()[3])
    assert 0.5 < accuracy <= 1.0  # two epochs already beat chance (0.1) by far


@pytest.mark.parametrize("capacity", [0, 1, 4, 9, 40])
def test_apply_capacity_follows_the_drop_policy(capacity):
    torch.manual_seed(5)
    T, E, k = 30, 4, 2
    logits = torch.randn(T, E)
    logits[:, 1] += 1.5  # expert 1 is popular, so it overflows first
    routing = moefast.route(logits, k)
    capped = moefast.apply_capacity(routing, capacity)
    keep, weights = reference.apply_capacity(routing.expert_ids, routing.weights, E, capacity)
    assert torch.equal(capped.weights, weights)
    kept_counts = torch.bincount(routing.expert_ids[keep].long(), minlength=E).to(torch.int32)
    assert torch.equal(capped.counts, kept_counts)
    assert torch.equal(capped.offs, torch.cumsum(kept_counts, 0).to(torch.int32))
    # position and order stay inverse permutations; kept rows sit below offs[-1] grouped by
    # expert in slot order, dropped rows above it
    flat_pos = capped.position.reshape(-1).long()
    assert torch.equal(capped.order[flat_pos].long(), torch.arange(T * k))
    kept_rows = flat_pos[keep.reshape(-1)]
    assert kept_rows.numel() == 0 or int(kept_rows.max()) < int(capped.offs[-1])
    assert bool((flat_pos[~keep.reshape(-1)] >= capped.offs[-1]).all())
    order = capped.order[: int(capped.offs[-1])].long()
    experts_in_row_order = routing.expert_ids.reshape(-1)[order]
    assert bool((experts_in_row_order[1:] >= experts_in_row_order[:-1]).all())


def test_moe_capacity_factor_drops_overflow_and_matches_reference():
    torch.manual_seed(6)
    moe = MoE(12, 16, 4, k=2, capacity_factor=0.5).double()
    with torch.no_grad():
        moe.router.weight[0] += 0.5  # skew the routing so that some experts overflow
    x = torch.randn(40, 12, dtype=torch.float64, requires_grad=True)
    y = moe(x)
    capacity = 10  # ceil(0.5 * 40 * 2 / 4)
    assert int(moe.last_routing.counts.max()) <= capacity
    assert int(moe.last_routing.counts.sum()) < 80  # something was dropped
    logits = x @ moe.router.weight.t()
    weights, ids = reference.route(logits, 2)
    _, w = reference.apply_capacity(ids, weights, 4, capacity)
    dropless = MoE(12, 16, 4, k=2).double()
    dropless.load_state_dict(moe.state_dict())
    # each kept slot's expert output, weighted: run the dropless layer's experts per slot
    out = torch.zeros_like(x)
    for j in range(2):
        r = moefast.routing_from_ids(ids[:, j], 4, w[:, j : j + 1])
        h = dropless.w1(moefast.permute(x, r), r.offs)
        out = out + moefast.unpermute(dropless.w2(dropless._act(h), r.offs), r)
    torch.testing.assert_close(y, out)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_moe_under_autocast_bfloat16():
    torch.manual_seed(7)
    moe = MoE(16, 32, 4, k=2, activation="swiglu")
    x = torch.randn(24, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    assert y.dtype == torch.bfloat16  # the expert GEMMs ran in bfloat16
    y_ref = moe(x)
    torch.testing.assert_close(y.float(), y_ref, atol=6e-2, rtol=6e-2)
    y.float().sum().backward()
    assert moe.w1.weight.grad.dtype == torch.float32
    assert moe.router.weight.grad is not None


def test_moe_compiles_fullgraph_with_the_same_results():
    torch.manual_seed(8)
    moe = MoE(16, 32, 4, k=2, activation="swiglu", z_loss_coef=1e-3)
    x = torch.randn(2, 12, 16, requires_grad=True)
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    (y.square().sum() + compiled.aux_loss).backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in moe.parameters()]
    x.grad = None
    moe.zero_grad(set_to_none=True)
    y_eager = moe(x)
    (y_eager.square().sum() + moe.aux_loss).backward()
    torch.testing.assert_close(y, y_eager)
    for g, p in zip(got, [x, *moe.parameters()], strict=True):
        torch.testing.assert_close(g, p.grad)
