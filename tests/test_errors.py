"""Bad input gets a clear ValueError / TypeError naming the argument at fault, never a crash.

First through the functional API (moefast.*), then through the raw torch.ops.moefast.* ops, whose
C++ checks (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE) raise ValueError / TypeError too.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from moefast_testing import distinct_logits, offs_from_counts, randn, random_ids

import moefast

_ops = torch.ops.moefast
T, E, K = 6, 4, 2  # tokens, experts, experts per token
D, H = 5, 3  # model and hidden sizes


@pytest.fixture
def routing(gen):
    return moefast.route(distinct_logits(T, E, gen=gen), K)


def _raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match) as info:
        fn(*args, **kwargs)
    # The message says which moefast function complained.
    assert "moefast" in str(info.value)
    return info


# ----------------------------------------------------------------------------- route


@pytest.mark.parametrize("shape", [(T * E,), (2, T, E), ()])
def test_route_logits_rank(shape, gen):
    _raises(ValueError, "logits must be 2-D", moefast.route, torch.randn(shape, generator=gen), 1)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_route_integer_logits(dtype):
    _raises(TypeError, "logits must be float", moefast.route, torch.ones(T, E, dtype=dtype), 1)


def test_route_no_experts():
    _raises(ValueError, "logits", moefast.route, torch.empty(T, 0), 1)


@pytest.mark.parametrize("k", [0, -1, E + 1, 100])
def test_route_k_out_of_range(k, gen):
    _raises(ValueError, r"k must be in \[1, E\]", moefast.route, distinct_logits(T, E, gen=gen), k)


@pytest.mark.parametrize("k", [1.0, "2", None, True, torch.tensor(2)])
def test_route_k_not_an_int(k, gen):
    _raises(TypeError, "k must be an int", moefast.route, distinct_logits(T, E, gen=gen), k)


@pytest.mark.parametrize("k", [2, E])
def test_route_hard_needs_k_1(k, gen):
    _raises(
        ValueError,
        "mode 'hard' needs k == 1",
        moefast.route,
        distinct_logits(T, E, gen=gen),
        k,
        mode="hard",
    )


@pytest.mark.parametrize("k", [1, E - 1])
def test_route_dense_needs_k_E(k, gen):
    _raises(
        ValueError,
        "mode 'dense' needs k == E",
        moefast.route,
        distinct_logits(T, E, gen=gen),
        k,
        mode="dense",
    )


@pytest.mark.parametrize("mode", ["topk", "Softmax_TopK", "", "sparse"])
def test_route_unknown_mode(mode, gen):
    _raises(
        ValueError,
        "mode must be one of",
        moefast.route,
        distinct_logits(T, E, gen=gen),
        1,
        mode=mode,
    )


# ----------------------------------------------------------------------------- routing_from_ids


def test_routing_from_ids_rank():
    _raises(
        ValueError,
        "expert_ids must be 2-D",
        moefast.routing_from_ids,
        torch.zeros(2, 3, 1, dtype=torch.int32),
        E,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int16, torch.uint8])
def test_routing_from_ids_dtype(dtype):
    _raises(
        TypeError,
        "expert_ids must be int32 or int64",
        moefast.routing_from_ids,
        torch.zeros(T, 1, dtype=dtype),
        E,
    )


@pytest.mark.parametrize("bad", [-1, E, E + 7], ids=["negative", "eq-E", "gt-E"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_routing_from_ids_out_of_range(bad, dtype, gen):
    ids = random_ids(T, K, E, gen=gen).to(dtype)
    ids[3, 1] = bad
    info = _raises(ValueError, "expert_ids must be in", moefast.routing_from_ids, ids, E)
    assert str(bad) in str(info.value)  # the offending id is named


@pytest.mark.parametrize("bad", [2**32 + 1, -(2**32) + 2, 2**31], ids=["2^32+1", "-2^32+2", "2^31"])
def test_routing_from_ids_int64_out_of_int32_range(bad):
    """int64 ids beyond int32 must not wrap around into a valid expert id."""
    ids = torch.tensor([[0], [bad], [1]], dtype=torch.int64)
    _raises(ValueError, "expert_ids", moefast.routing_from_ids, ids, E)


@pytest.mark.parametrize("num_experts", [0, -3])
def test_routing_from_ids_num_experts(num_experts):
    _raises(
        ValueError,
        "num_experts",
        moefast.routing_from_ids,
        torch.zeros(T, 1, dtype=torch.int32),
        num_experts,
    )


def test_routing_from_ids_no_columns():
    _raises(
        ValueError, "expert_ids", moefast.routing_from_ids, torch.zeros(T, 0, dtype=torch.int32), E
    )


@pytest.mark.parametrize(
    "weights, exc, match",
    [
        (torch.ones(T, K + 1), ValueError, r"weights must be \[T, k\]"),
        (torch.ones(T + 1, K), ValueError, r"weights must be \[T, k\]"),
        (torch.ones(T * K), ValueError, "weights must be 2-D"),
        (torch.ones(T, K, dtype=torch.int64), TypeError, "weights must be float"),
        (torch.ones(T, K, device="meta"), ValueError, "weights and routing must be on the same"),
    ],
    ids=["cols", "rows", "1-D", "int", "meta"],
)
def test_routing_from_ids_bad_weights(weights, exc, match, gen):
    _raises(exc, match, moefast.routing_from_ids, random_ids(T, K, E, gen=gen), E, weights)


# ----------------------------------------------------------------------------- permute / unpermute


@pytest.mark.parametrize("shape", [(T, D, 1), (T,)])
def test_permute_x_rank(shape, routing, gen):
    _raises(
        ValueError, "x must be 2-D", moefast.permute, torch.randn(shape, generator=gen), routing
    )


def test_permute_x_rows(routing, gen):
    _raises(
        ValueError,
        "x has 7 rows but the routing has T = 6",
        moefast.permute,
        randn(T + 1, D, gen=gen),
        routing,
    )


def test_permute_integer_x(routing):
    _raises(
        TypeError, "x must be float", moefast.permute, torch.ones(T, D, dtype=torch.int64), routing
    )


def test_permute_x_on_other_device(routing):
    _raises(
        ValueError,
        "x and routing must be on the same device",
        moefast.permute,
        torch.empty(T, D, device="meta"),
        routing,
    )


@pytest.mark.parametrize(
    "make", [lambda r: tuple(r), lambda r: list(r), lambda r: None, lambda r: r.position]
)
def test_routing_argument_not_a_routing(make, routing, gen):
    bad = make(routing)
    _raises(
        TypeError, "routing must be a moefast.Routing", moefast.permute, randn(T, D, gen=gen), bad
    )
    _raises(
        TypeError,
        "routing must be a moefast.Routing",
        moefast.unpermute,
        randn(T * K, D, gen=gen),
        bad,
    )
    _raises(
        TypeError,
        "routing must be a moefast.Routing",
        moefast.load_balancing_loss,
        randn(T, E, gen=gen),
        bad,
    )


@pytest.mark.parametrize("shape", [(T * K,), (T * K, D, 1)])
def test_unpermute_y_rank(shape, routing, gen):
    _raises(
        ValueError, "y must be 2-D", moefast.unpermute, torch.randn(shape, generator=gen), routing
    )


@pytest.mark.parametrize("rows", [T, T * K - 1, T * K + 1])
def test_unpermute_y_rows(rows, routing, gen):
    _raises(
        ValueError,
        r"y must have T \* k = 12 rows",
        moefast.unpermute,
        randn(rows, D, gen=gen),
        routing,
    )


def test_unpermute_integer_y(routing):
    _raises(
        TypeError,
        "y must be float",
        moefast.unpermute,
        torch.ones(T * K, D, dtype=torch.int32),
        routing,
    )


def test_unpermute_y_on_other_device(routing):
    _raises(
        ValueError,
        "y and routing must be on the same device",
        moefast.unpermute,
        torch.empty(T * K, D, device="meta"),
        routing,
    )


@pytest.mark.parametrize(
    "weights, exc, match",
    [
        (torch.ones(T, K + 1), ValueError, r"weights must be \[T, k\]"),
        (torch.ones(K, T), ValueError, r"weights must be \[T, k\]"),
        (torch.ones(T, K, 1), ValueError, "weights must be 2-D"),
        (torch.ones(T, K, dtype=torch.int32), TypeError, "weights must be float"),
        (torch.ones(T, K, device="meta"), ValueError, "weights and routing must be on the same"),
        ([[0.5, 0.5]] * T, TypeError, "weights must be a torch.Tensor"),
    ],
    ids=["cols", "transposed", "3-D", "int", "meta", "list"],
)
def test_unpermute_bad_weights(weights, exc, match, routing, gen):
    _raises(exc, match, moefast.unpermute, randn(T * K, D, gen=gen), routing, weights)


# ----------------------------------------------------------------------------- grouped_mm


def _gmm_args(gen, N=8, counts=(3, 0, 5)):
    offs = offs_from_counts(list(counts))
    return randn(N, D, gen=gen), randn(len(counts), D, H, gen=gen), offs


def test_grouped_mm_act_unknown_activation(gen):
    a, b, offs = _gmm_args(gen)
    _raises(
        ValueError, "activation must be one of", moefast.grouped_mm_act, a, b, offs, None, "tanh"
    )
    with pytest.raises(ValueError, match="activation must be one of"):
        torch.ops.moefast.grouped_mm_act(a, b, offs, None, "tanh")


def test_grouped_mm_act_swiglu_needs_even_width(gen):
    a, b, offs = _gmm_args(gen)
    odd = b[:, :, :3].contiguous()
    _raises(
        ValueError,
        "even number of output columns",
        moefast.grouped_mm_act,
        a,
        odd,
        offs,
        None,
        "swiglu",
    )
    with pytest.raises(ValueError, match="even number of output columns"):
        torch.ops.moefast.grouped_mm_act(a, odd, offs, None, "swiglu")


def test_grouped_mm_act_checks_like_grouped_mm(gen):
    a, b, offs = _gmm_args(gen)
    _raises(ValueError, "grouped_mm_act: b must be 3-D", moefast.grouped_mm_act, a, b[0], offs)
    with pytest.raises(TypeError, match="grouped_mm_act: a and b must share a dtype"):
        torch.ops.moefast.grouped_mm_act(a, b.double(), offs, None, "relu")


def test_grouped_mm_a_rank(gen):
    a, b, offs = _gmm_args(gen)
    _raises(ValueError, "a must be 2-D", moefast.grouped_mm, a.unsqueeze(0), b, offs)


def test_grouped_mm_b_rank(gen):
    a, b, offs = _gmm_args(gen)
    _raises(ValueError, "b must be 3-D", moefast.grouped_mm, a, b[0], offs)


def test_grouped_mm_offs_rank(gen):
    a, b, offs = _gmm_args(gen)
    _raises(ValueError, "offs must be 1-D", moefast.grouped_mm, a, b, offs.unsqueeze(0))


def test_grouped_mm_K_mismatch(gen):
    a, b, offs = _gmm_args(gen)
    _raises(
        ValueError,
        r"a \[N, K\] and b \[E, K, M\] must agree on K",
        moefast.grouped_mm,
        a[:, : D - 1],
        b,
        offs,
    )


def test_grouped_mm_offs_length(gen):
    a, b, offs = _gmm_args(gen)
    _raises(ValueError, "offs must have one entry per group", moefast.grouped_mm, a, b, offs[:2])


def test_grouped_mm_integer_a(gen):
    a, b, offs = _gmm_args(gen)
    _raises(TypeError, "a must be float", moefast.grouped_mm, a.long(), b.long(), offs)


@pytest.mark.parametrize("b_dtype", [torch.float64, torch.bfloat16, torch.int32])
def test_grouped_mm_dtype_mismatch(b_dtype, gen):
    a, b, offs = _gmm_args(gen)
    _raises(TypeError, "a and b must share a dtype", moefast.grouped_mm, a, b.to(b_dtype), offs)


@pytest.mark.parametrize("offs_dtype", [torch.int64, torch.int16, torch.float32])
def test_grouped_mm_offs_dtype(offs_dtype, gen):
    a, b, offs = _gmm_args(gen)
    _raises(TypeError, "offs must be int32", moefast.grouped_mm, a, b, offs.to(offs_dtype))


@pytest.mark.parametrize("which", ["a", "b", "offs"])
def test_grouped_mm_device(which, gen):
    args = dict(zip("a b offs".split(), _gmm_args(gen), strict=True))
    args[which] = args[which].to("meta")
    _raises(
        ValueError,
        f"{'a' if which == 'a' else ''}.*must be on the same device",
        moefast.grouped_mm,
        **args,
    )


@pytest.mark.parametrize("via", ["moefast", "torch.ops"])
@pytest.mark.parametrize(
    "offs, match",
    [
        ([3, 2, 8], "offs must be non-decreasing"),
        ([-1, 2, 8], "offs must be non-decreasing and >= 0"),
        ([3, 3, 9], r"offs\[-1\] = 9 is past the number of rows N = 8"),
        ([0, 0, 100], r"offs\[-1\] = 100 is past"),
    ],
    ids=["decreasing", "negative", "past-N", "far-past-N"],
)
def test_grouped_mm_bad_offs_values(offs, match, via, gen):
    a, b, _ = _gmm_args(gen)
    fn = moefast.grouped_mm if via == "moefast" else _ops.grouped_mm
    _raises(ValueError, match, fn, a, b, torch.tensor(offs, dtype=torch.int32))


@pytest.mark.parametrize(
    "bias, exc, match",
    [
        (torch.ones(3, H + 1), ValueError, r"bias must be \[E, M\] = \[3, 3\]"),
        (torch.ones(2, H), ValueError, r"bias must be \[E, M\]"),
        (torch.ones(3 * H), ValueError, "bias must be 2-D"),
        (torch.ones(3, H, dtype=torch.float64), TypeError, "bias must have the dtype of a"),
        (torch.ones(3, H, device="meta"), ValueError, "a and bias must be on the same device"),
    ],
    ids=["cols", "rows", "1-D", "dtype", "meta"],
)
def test_grouped_mm_bad_bias(bias, exc, match, gen):
    a, b, offs = _gmm_args(gen)
    _raises(exc, match, moefast.grouped_mm, a, b, offs, bias)


def test_raw_grouped_mm_bad_bias(gen):
    a, b, offs = _gmm_args(gen)
    _raises(ValueError, r"bias must be \[E, M\]", _ops.grouped_mm, a, b, offs, torch.ones(3, 1))
    _raises(
        TypeError,
        "bias must have the dtype of a",
        _ops.grouped_mm,
        a,
        b,
        offs,
        torch.ones(3, H, dtype=torch.float16),
    )


def test_raw_grouped_bias_grad_checks(gen):
    g = randn(8, H, gen=gen)
    offs = offs_from_counts([3, 0, 5])
    _raises(TypeError, "offs must be int32", _ops.grouped_bias_grad, g, offs.long())
    _raises(ValueError, "grad_out must be 2-D", _ops.grouped_bias_grad, g[0], offs)
    _raises(TypeError, "grad_out must be float", _ops.grouped_bias_grad, g.long(), offs)
    _raises(
        ValueError,
        r"offs\[-1\] = 9 is past",
        _ops.grouped_bias_grad,
        g,
        torch.tensor([1, 9], dtype=torch.int32),
    )
    _raises(
        ValueError,
        "offs must be non-decreasing",
        _ops.grouped_bias_grad,
        g,
        torch.tensor([4, 1], dtype=torch.int32),
    )


@pytest.mark.parametrize("capacity", [-1, 1.5, None, True])
def test_apply_capacity_bad_capacity(capacity, routing):
    _raises(
        ValueError, "capacity must be a non-negative int", moefast.apply_capacity, routing, capacity
    )


def test_apply_capacity_not_a_routing(routing):
    _raises(
        TypeError, "routing must be a moefast.Routing", moefast.apply_capacity, tuple(routing), 2
    )


# ----------------------------------------------------------------------------- mixture


def test_mixture_gate_rank(gen):
    _raises(
        ValueError,
        "gate_logits must be 2-D",
        moefast.mixture,
        randn(1, 3, E, gen=gen),
        randn(E, 3, H, gen=gen),
    )


def test_mixture_expert_out_rank(gen):
    _raises(
        ValueError,
        "expert_out must be 3-D",
        moefast.mixture,
        randn(3, E, gen=gen),
        randn(E, 3, gen=gen),
    )


@pytest.mark.parametrize("shape", [(E + 1, 3, H), (E, 4, H), (3, E, H)])
def test_mixture_expert_out_shape(shape, gen):
    _raises(
        ValueError,
        r"expert_out must be \[E, B, C\]",
        moefast.mixture,
        randn(3, E, gen=gen),
        randn(*shape, gen=gen),
    )


def test_mixture_dtypes(gen):
    gate, eo = randn(3, E, gen=gen), randn(E, 3, H, gen=gen)
    _raises(
        TypeError,
        "gate_logits and expert_out must share a dtype",
        moefast.mixture,
        gate,
        eo.double(),
    )
    _raises(TypeError, "gate_logits must be float", moefast.mixture, gate.long(), eo.long())


def test_mixture_device(gen):
    _raises(
        ValueError,
        "gate_logits and expert_out must be on the same device",
        moefast.mixture,
        randn(3, E, gen=gen),
        torch.empty(E, 3, H, device="meta"),
    )


def test_mixture_no_experts(gen):
    _raises(ValueError, "gate_logits", moefast.mixture, torch.empty(3, 0), torch.empty(0, 3, H))


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("fn", ["load_balancing_loss", "z_loss"])
def test_loss_logits_rank_and_dtype(fn, routing, gen):
    def call(logits):
        if fn == "z_loss":
            return moefast.z_loss(logits)
        return moefast.load_balancing_loss(logits, routing)

    _raises(ValueError, "logits must be 2-D", call, randn(T * E, gen=gen))
    _raises(ValueError, "logits must be 2-D", call, randn(1, T, E, gen=gen))
    _raises(TypeError, "logits must be float", call, torch.ones(T, E, dtype=torch.int64))


@pytest.mark.parametrize("shape", [(T + 1, E), (T, E + 1)])
def test_load_balancing_loss_routing_mismatch(shape, routing, gen):
    _raises(
        ValueError,
        "routing is for T = 6 tokens and E = 4 experts",
        moefast.load_balancing_loss,
        randn(*shape, gen=gen),
        routing,
    )


def test_load_balancing_loss_device(routing):
    """logits on another device than the routing: a clear error, like the other ops."""
    _raises(
        ValueError, "logits", moefast.load_balancing_loss, torch.empty(T, E, device="meta"), routing
    )


# ----------------------------------------------------------------------------- raw ops (C++ checks)


def test_raw_router_checks(gen):
    logits = distinct_logits(T, E, gen=gen)
    _raises(TypeError, "logits must be float", _ops.router, logits.long(), 1, "softmax_topk", False)
    _raises(ValueError, "logits must be 2-D", _ops.router, logits[0], 1, "softmax_topk", False)
    _raises(ValueError, r"k must be in \[1, E\]", _ops.router, logits, 0, "softmax_topk", False)
    _raises(ValueError, r"k must be in \[1, E\]", _ops.router, logits, E + 1, "topk_softmax", True)
    _raises(ValueError, "mode 'hard' needs k == 1", _ops.router, logits, 2, "hard", False)
    _raises(ValueError, "mode 'dense' needs k == E", _ops.router, logits, 2, "dense", False)
    _raises(ValueError, "mode must be one of", _ops.router, logits, 2, "bogus", False)


def test_raw_router_backward_checks(gen):
    logits = distinct_logits(T, E, gen=gen)
    w, ids = _ops.router(logits, K, "softmax_topk", False)
    _raises(
        ValueError,
        "grad_weights must be",
        _ops.router_backward,
        w[:, :1],
        logits,
        ids,
        "softmax_topk",
        False,
    )
    _raises(
        TypeError,
        "expert_ids must be int32",
        _ops.router_backward,
        w,
        logits,
        ids.long(),
        "softmax_topk",
        False,
    )
    _raises(
        ValueError,
        r"expert_ids must be \[T, k\]",
        _ops.router_backward,
        w[:3],
        logits,
        ids[:3],
        "softmax_topk",
        False,
    )
    _raises(ValueError, "mode must be one of", _ops.router_backward, w, logits, ids, "bogus", False)


def test_raw_router_backward_1d_expert_ids(gen):
    """A 1-D expert_ids must be reported as such, not as 'k must be in [1, E], got k=0'."""
    logits = distinct_logits(T, E, gen=gen)
    ids = torch.zeros(T, dtype=torch.int32)
    _raises(
        ValueError,
        "expert_ids",
        _ops.router_backward,
        randn(T, 1, gen=gen),
        logits,
        ids,
        "softmax_topk",
        False,
    )


_OOB_SCRIPT = textwrap.dedent(
    """
    import torch, moefast
    logits = torch.randn(4, 3)
    gw = torch.randn(4, 2)
    for mode in ("softmax_topk", "topk_softmax"):
        for bad in (-1, 3, 100000):
            ids = torch.tensor([[0, 1], [2, 1], [1, bad], [0, 2]], dtype=torch.int32)
            try:
                torch.ops.moefast.router_backward(gw, logits, ids, mode, False)
            except ValueError as e:
                assert "expert_ids" in str(e), str(e)
            else:
                print("NO ERROR", mode, bad)
    print("DONE")
    """
)


def test_raw_router_backward_out_of_range_ids():
    """expert_ids outside [0, E) would be used as indices into a row of E: must be refused.

    Run in a subprocess: without the check the kernel reads and writes out of bounds.
    """
    proc = subprocess.run(
        [sys.executable, "-c", _OOB_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "NO ERROR" not in proc.stdout, proc.stdout
    assert "DONE" in proc.stdout


def test_raw_routing_plan_checks(gen):
    ids = random_ids(T, K, E, gen=gen)
    _raises(TypeError, "expert_ids must be int32", _ops.routing_plan, ids.float(), E)
    _raises(TypeError, "expert_ids must be int32", _ops.routing_plan, ids.long(), E)
    _raises(ValueError, "expert_ids must be 2-D", _ops.routing_plan, ids.reshape(-1), E)
    _raises(ValueError, "num_experts must be in", _ops.routing_plan, ids, 0)
    bad = ids.clone()
    bad[2, 1] = E
    info = _raises(
        ValueError, r"expert_ids must be in \[0, num_experts\)", _ops.routing_plan, bad, E
    )
    assert "at token 2, slot 1" in str(info.value)


def test_raw_permute_unpermute_checks(routing, gen):
    x, pos = randn(T, D, gen=gen), routing.position
    _raises(TypeError, "position must be int32", _ops.permute, x, pos.long(), None)
    _raises(ValueError, "position must be 2-D", _ops.permute, x, pos.reshape(-1), None)
    _raises(ValueError, "x has 5 rows", _ops.permute, x[:5], pos, None)
    _raises(TypeError, "x must be float", _ops.permute, x.long(), pos, None)
    _raises(
        ValueError,
        "weights must have the shape of position",
        _ops.permute,
        x,
        pos,
        torch.ones(T, K + 1),
    )
    _raises(
        TypeError,
        "weights must be float",
        _ops.permute,
        x,
        pos,
        torch.ones(T, K, dtype=torch.int64),
    )
    bad = pos.clone()
    bad[0, 0] = T * K
    _raises(
        ValueError, r"position must hold row indices in \[0, T \* k\)", _ops.permute, x, bad, None
    )
    bad[0, 0] = -1
    _raises(
        ValueError,
        "position must hold row indices",
        _ops.unpermute,
        randn(T * K, D, gen=gen),
        bad,
        None,
    )
    y = randn(T * K, D, gen=gen)
    _raises(ValueError, r"y must have T \* k = 12 rows", _ops.unpermute, y[:-1], pos, None)
    _raises(TypeError, "y must be float", _ops.unpermute, y.int(), pos, None)
    _raises(ValueError, "weights must have the shape", _ops.unpermute, y, pos, torch.ones(K, T))


def test_raw_unpermute_weight_grad_checks(routing, gen):
    g, y, pos = randn(T, D, gen=gen), randn(T * K, D, gen=gen), routing.position
    _raises(
        TypeError,
        "grad_out and y must share a dtype",
        _ops.unpermute_weight_grad,
        g.double(),
        y,
        pos,
    )
    _raises(
        ValueError,
        r"expected grad_out \[T, d\] and y \[T \* k, d\]",
        _ops.unpermute_weight_grad,
        g[:, :-1],
        y,
        pos,
    )
    _raises(ValueError, "grad_out must be 2-D", _ops.unpermute_weight_grad, g[0], y, pos)
    _raises(TypeError, "y must be float", _ops.unpermute_weight_grad, g.long(), y.long(), pos)


def test_raw_grouped_mm_checks(gen):
    a, b, offs = _gmm_args(gen)
    _raises(ValueError, "b must be 3-D", _ops.grouped_mm, a, b[0], offs)
    _raises(ValueError, "a must be 2-D", _ops.grouped_mm, a[0], b, offs)
    _raises(TypeError, "a and b must share a dtype", _ops.grouped_mm, a, b.double(), offs)
    _raises(TypeError, "offs must be int32", _ops.grouped_mm, a, b, offs.long())
    _raises(ValueError, "offs must have one entry per group", _ops.grouped_mm, a, b, offs[1:])
    _raises(ValueError, "must agree on K", _ops.grouped_mm, a.T.contiguous(), b, offs)


def test_raw_grouped_mm_weight_grad_checks(gen):
    a, _b, offs = _gmm_args(gen)
    g = randn(a.shape[0], H, gen=gen)
    wg = _ops.grouped_mm_weight_grad
    _raises(TypeError, "offs must be int32", wg, a, g, offs.long())
    _raises(ValueError, "offs must be 1-D", wg, a, g, offs.unsqueeze(1))
    _raises(
        ValueError, r"offs\[-1\] = 9 is past", wg, a, g, torch.tensor([1, 9], dtype=torch.int32)
    )
    _raises(
        ValueError, "offs must be non-decreasing", wg, a, g, torch.tensor([4, 1], dtype=torch.int32)
    )
    _raises(ValueError, "a and grad_out must have the same rows", wg, a, g[1:], offs)
    _raises(TypeError, "a and grad_out must share a dtype", wg, a, g.double(), offs)
    _raises(ValueError, "grad_out must be 2-D", wg, a, g[0], offs)


def test_raw_mixture_checks(gen):
    gate, eo = randn(3, E, gen=gen), randn(E, 3, H, gen=gen)
    _raises(ValueError, r"expert_out must be \[E, B, C\]", _ops.mixture, gate, eo[1:])
    _raises(
        TypeError, "gate_logits and expert_out must share a dtype", _ops.mixture, gate, eo.half()
    )
    _raises(ValueError, "gate_logits must be 2-D", _ops.mixture, gate[0], eo)
    _raises(
        ValueError,
        r"grad_out must be \[B, C\]",
        _ops.mixture_backward,
        randn(3, H + 1, gen=gen),
        gate,
        eo,
    )
    _raises(
        ValueError,
        "expert_out must be 3-D",
        _ops.mixture_backward,
        randn(3, H, gen=gen),
        gate,
        eo[0],
    )


def test_errors_are_value_or_type_errors(gen):
    """The C++ checks raise the Python ValueError / TypeError classes (TORCH_CHECK_VALUE/TYPE)."""
    a, b, offs = _gmm_args(gen)
    with pytest.raises(ValueError) as info:
        _ops.grouped_mm(a, b, torch.tensor([5, 1, 8], dtype=torch.int32))
    assert type(info.value) is not RuntimeError
    with pytest.raises(TypeError):
        _ops.grouped_mm(a, b, offs.long())


# ----------------------------------------------------------------------------- swiglu


def test_swiglu_bad_inputs(gen):
    h = randn(4, 6, gen=gen)
    _raises(ValueError, "last dimension of h must be even", moefast.swiglu, h[:, :5])
    _raises(ValueError, "last dimension of h must be even", moefast.swiglu, torch.tensor(1.0))
    _raises(TypeError, "h must be float32", moefast.swiglu, torch.ones(4, 6, dtype=torch.int32))
    _raises(TypeError, "h must be a torch.Tensor", moefast.swiglu, [[1.0, 2.0]])
    # The raw ops check in C++ too.
    _raises(ValueError, "last dimension of h must be even", _ops.swiglu, h[:, :5])
    _raises(ValueError, "at least one dimension", _ops.swiglu, torch.tensor(1.0))
    _raises(TypeError, "h must be float32", _ops.swiglu, torch.ones(4, 6, dtype=torch.int64))
    g = randn(4, 3, gen=gen)
    _raises(ValueError, "grad_out must have the shape of swiglu", _ops.swiglu_backward, g[:, :2], h)
    _raises(ValueError, "grad_out must have the shape of swiglu", _ops.swiglu_backward, g, h[:2])
    _raises(TypeError, "grad_out and h must share a dtype", _ops.swiglu_backward, g.double(), h)
    _raises(ValueError, "last dimension of h must be even", _ops.swiglu_backward, g, h[:, :5])


# ----------------------------------------------------------------------------- grouped_swiglu_mlp


def test_grouped_swiglu_mlp_bad_inputs(gen):
    E, d, H, N = 3, 4, 2, 7
    x = randn(N, d, gen=gen)
    w1, w2 = randn(E, d, 2 * H, gen=gen), randn(E, H, d, gen=gen)
    b1, b2 = randn(E, 2 * H, gen=gen), randn(E, d, gen=gen)
    offs = offs_from_counts([2, 0, 4])
    f = moefast.grouped_swiglu_mlp
    _raises(ValueError, "x must be 2-D", f, x[None], w1, b1, w2, b2, offs)
    _raises(ValueError, "w1 needs an even number", f, x, w1[:, :, :3], b1, w2, b2, offs)
    _raises(ValueError, "must agree on d", f, x[:, :3], w1, b1, w2, b2, offs)
    _raises(ValueError, r"w2 must be \[E, H, d\] = \[3, 2, 4\]", f, x, w1, b1, w2[:, :1], b2, offs)
    _raises(ValueError, r"b1 must be \[E, 4\]", f, x, w1, b1[:, :3], w2, b2, offs)
    _raises(ValueError, r"b2 must be \[E, 4\]", f, x, w1, b1, w2, b2[:2], offs)
    _raises(TypeError, "offs must be int32", f, x, w1, b1, w2, b2, offs.long())
    _raises(ValueError, "one entry per expert", f, x, w1, b1, w2, b2, offs[:2])
    _raises(TypeError, "the weights must have the dtype of x", f, x, w1.double(), b1, w2, b2, offs)
    _raises(TypeError, "x must be float32", f, x.long(), w1, b1, w2, b2, offs)
    _raises(
        ValueError, "offs\\[-1\\] = 9 is past", f, x, w1, b1, w2, b2, offs_from_counts([2, 3, 4])
    )
    _raises(
        ValueError,
        "non-decreasing",
        f,
        x,
        w1,
        b1,
        w2,
        b2,
        torch.tensor([3, 1, 5], dtype=torch.int32),
    )
    # The raw ops check in C++ too, naming the argument.
    op, bwd = torch.ops.moefast.grouped_swiglu_mlp, torch.ops.moefast.grouped_swiglu_mlp_backward
    _raises(ValueError, "w2 must be \\[E, H, d\\]", op, x, w1, b1, w2[:, :1], b2, offs)
    _raises(ValueError, "w1 must have an even number", op, x, w1[:, :, :3], None, w2, None, offs)
    _raises(TypeError, "b1 must have the dtype of x", op, x, w1, b1.double(), w2, b2, offs)
    _raises(ValueError, "b2 must be \\[3, 4\\]", op, x, w1, b1, w2, b2[:, :2], offs)
    h, act, g = randn(N, 2 * H, gen=gen), randn(N, H, gen=gen), randn(N, d, gen=gen)
    _raises(
        ValueError, "grad_y must be \\[7, 4\\]", bwd, g[:5], x, w1, w2, offs, h, act, True, True
    )
    _raises(ValueError, "h must be \\[7, 4\\]", bwd, g, x, w1, w2, offs, h[:, :3], act, True, True)
    _raises(
        TypeError,
        "act must have the dtype of x",
        bwd,
        g,
        x,
        w1,
        w2,
        offs,
        h,
        act.double(),
        True,
        True,
    )
