"""moefast.nn.GroupedLinear and moefast.nn.MoE against a plain-PyTorch MoE layer."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

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
    with pytest.raises(TypeError, match="x is torch.float64"):
        MoE(8, 16, 4)(torch.randn(3, 8, dtype=torch.float64))


def test_demo_runs_and_reports_accuracy(capsys):
    pytest.importorskip("sklearn")
    from moefast import demo

    assert demo.main(["--epochs", "2", "--experts", "4"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("MoE held-out accuracy"))
    accuracy = float(line.split()[3])
    assert 0.5 < accuracy <= 1.0  # two epochs already beat chance (0.1) by far
