"""Routing: moefast.route, routing_from_ids, the routing plan and the router losses."""

from __future__ import annotations

import pytest
import torch
from moefast_testing import (
    FLOAT_DTYPES,
    assert_close,
    distinct_logits,
    dtype_id,
    grads,
    leaf,
    randn,
    random_ids,
)

import moefast
from moefast import reference as ref

# (mode, normalize, T, E, k); E = 24 with k = 18 takes the kernel's partial_sort path (k > 16).
ROUTE_CASES = [
    ("softmax_topk", False, 13, 6, 2),
    ("softmax_topk", True, 13, 6, 2),
    ("softmax_topk", False, 9, 24, 18),
    ("softmax_topk", True, 9, 24, 18),
    ("topk_softmax", False, 13, 6, 3),
    ("topk_softmax", True, 13, 6, 3),
    ("topk_softmax", False, 9, 24, 18),
    ("hard", False, 13, 6, 1),
    ("dense", False, 13, 5, 5),
    ("dense", True, 13, 5, 5),
]


def _case_id(case):
    mode, normalize, T, E, k = case
    return f"{mode}-norm{int(normalize)}-T{T}-E{E}-k{k}"


def assert_plan_equal(routing: moefast.Routing, num_experts: int):
    """The plan fields of ``routing`` are exactly those of reference.routing_plan."""
    counts, offs, position, order = ref.routing_plan(routing.expert_ids, num_experts)
    for name, expected in [
        ("counts", counts),
        ("offs", offs),
        ("position", position),
        ("order", order),
    ]:
        actual = getattr(routing, name)
        assert actual.dtype == torch.int32, name
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=name)


# ----------------------------------------------------------------------------- route


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", ROUTE_CASES, ids=_case_id)
def test_route_matches_reference(case, dtype, gen):
    mode, normalize, T, E, k = case
    logits = distinct_logits(T, E, gen=gen, dtype=dtype, requires_grad=True)
    routing = moefast.route(logits, k, mode=mode, normalize=normalize)
    logits_ref = leaf(logits)
    w_ref, ids_ref = ref.route(logits_ref, k, mode=mode, normalize=normalize)

    assert routing.expert_ids.dtype == torch.int32
    assert routing.expert_ids.shape == (T, k)
    torch.testing.assert_close(routing.expert_ids, ids_ref, rtol=0, atol=0)
    assert routing.weights.dtype == dtype
    assert_close(routing.weights, w_ref)
    assert_plan_equal(routing, E)

    grad_w = randn(T, k, gen=gen, dtype=dtype)
    if mode == "hard":
        # Weight 1 and no gradient to the logits.
        assert torch.equal(routing.weights, torch.ones(T, k, dtype=dtype))
        (g,) = grads(routing.weights, [logits], grad_w)
        assert torch.count_nonzero(g) == 0
        return
    (g,) = grads(routing.weights, [logits], grad_w)
    (g_ref,) = grads(w_ref, [logits_ref], grad_w)
    assert g.dtype == dtype
    assert_close(g, g_ref, grad=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_route_weights_sum(dtype, gen):
    """Normalised and topk_softmax weights sum to 1 per token; dense weights too."""
    logits = distinct_logits(11, 7, gen=gen, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    one = torch.ones(11, dtype=acc)
    for mode, k, normalize in [
        ("softmax_topk", 3, True),
        ("topk_softmax", 3, False),
        ("dense", 7, False),
    ]:
        w = moefast.route(logits, k, mode=mode, normalize=normalize).weights
        assert_close(w.to(acc).sum(-1), one, dtype)
    # Without normalisation the kept softmax mass is below 1.
    w = moefast.route(logits, 3, mode="softmax_topk").weights.float()
    assert bool((w.sum(-1) < 1).all())


def test_route_k_equals_E(gen):
    """k = E in softmax_topk mode: every expert, sorted by logit, the full softmax."""
    T, E = 10, 4
    logits = distinct_logits(T, E, gen=gen)
    routing = moefast.route(logits, E)
    expected_ids = torch.argsort(logits, dim=1, descending=True).to(torch.int32)
    torch.testing.assert_close(routing.expert_ids, expected_ids, rtol=0, atol=0)
    expected_w = torch.softmax(logits, -1).gather(1, expected_ids.long())
    assert_close(routing.weights, expected_w)
    assert torch.equal(routing.counts, torch.full((E,), T, dtype=torch.int32))
    assert_plan_equal(routing, E)
    # topk_softmax with k = E is the same softmax, dense the unsorted one.
    w_ts = moefast.route(logits, E, mode="topk_softmax").weights
    assert_close(w_ts, expected_w)
    dense = moefast.route(logits, E, mode="dense")
    assert torch.equal(dense.expert_ids, torch.arange(E, dtype=torch.int32).expand(T, E))
    assert_close(dense.weights, torch.softmax(logits, -1))


@pytest.mark.parametrize("mode", ["softmax_topk", "topk_softmax", "hard", "dense"])
def test_route_single_expert(mode, gen):
    """E = 1: every token goes to expert 0 with weight 1."""
    T = 7
    logits = randn(T, 1, gen=gen, requires_grad=True)
    routing = moefast.route(logits, 1, mode=mode, normalize=False)
    assert torch.equal(routing.expert_ids, torch.zeros(T, 1, dtype=torch.int32))
    assert_close(routing.weights, torch.ones(T, 1))
    assert torch.equal(routing.counts, torch.tensor([T], dtype=torch.int32))
    assert torch.equal(routing.offs, torch.tensor([T], dtype=torch.int32))
    assert_plan_equal(routing, 1)
    # The softmax of a single logit is constant: zero gradient.
    (g,) = grads(routing.weights, [logits], randn(T, 1, gen=gen))
    assert_close(g, torch.zeros(T, 1))


def test_route_all_tokens_on_one_expert(gen):
    T, E = 9, 5
    logits = randn(T, E, gen=gen, scale=0.1)
    logits[:, 3] += 10.0
    routing = moefast.route(logits, 1)
    assert torch.equal(routing.expert_ids, torch.full((T, 1), 3, dtype=torch.int32))
    assert torch.equal(routing.counts, torch.tensor([0, 0, 0, T, 0], dtype=torch.int32))
    assert torch.equal(routing.offs, torch.tensor([0, 0, 0, T, T], dtype=torch.int32))
    assert torch.equal(routing.order, torch.arange(T, dtype=torch.int32))
    assert_plan_equal(routing, E)


def test_route_expert_without_tokens(gen):
    T, E, k = 12, 6, 2
    logits = distinct_logits(T, E, gen=gen)
    logits[:, 2] -= 100.0  # expert 2 never in anyone's top 2
    logits[:, 5] -= 100.0  # nor expert 5 (the last one)
    routing = moefast.route(logits, k)
    assert routing.counts[2] == 0 and routing.counts[5] == 0
    assert routing.offs[1] == routing.offs[2]
    assert routing.offs[-1] == T * k == routing.offs[4]
    assert_plan_equal(routing, E)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("E, k", [(6, 2), (24, 18)])
def test_ties_go_to_lower_index(E, k, dtype):
    T = 4
    # Every row holds repeated values; the order of equal logits must follow the expert index.
    values = torch.tensor([0.5, 2.0, -1.0, 2.0, 0.5, 2.0], dtype=torch.float64)
    logits = values.repeat(T, E // 6 + 1)[:, :E].to(dtype).contiguous()
    logits[1] = 1.0  # a row of identical logits: experts 0..k-1
    routing = moefast.route(logits, k)
    w_ref, ids_ref = ref.route(logits, k)
    torch.testing.assert_close(routing.expert_ids, ids_ref, rtol=0, atol=0)
    assert_close(routing.weights, w_ref)
    assert torch.equal(routing.expert_ids[1], torch.arange(k, dtype=torch.int32))
    if E == 6:
        assert routing.expert_ids[0].tolist() == [1, 3]
    for t in range(T):  # equal logits are listed in ascending expert order
        ids = routing.expert_ids[t].long()
        vals = logits[t, ids].float()
        for j in range(k - 1):
            assert vals[j] > vals[j + 1] or (vals[j] == vals[j + 1] and ids[j] < ids[j + 1])
    hard = moefast.route(logits, 1, mode="hard")
    assert hard.expert_ids[:, 0].tolist() == [1, 0, 1, 1]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "mode, k", [("softmax_topk", 2), ("topk_softmax", 2), ("hard", 1), ("dense", 5)]
)
def test_nan_logits_rank_first(mode, k, dtype, gen):
    T, E = 6, 5
    logits = distinct_logits(T, E, gen=gen, dtype=dtype)
    nan = float("nan")
    logits[0, 3] = nan
    logits[2, 1] = nan
    logits[2, 4] = nan  # two NaNs: the lower index first
    logits[4, :] = nan
    routing = moefast.route(logits, k, mode=mode)
    w_ref, ids_ref = ref.route(logits, k, mode=mode)
    torch.testing.assert_close(routing.expert_ids, ids_ref, rtol=0, atol=0)
    assert_plan_equal(routing, E)
    if mode != "dense":
        assert routing.expert_ids[0, 0] == 3
        assert routing.expert_ids[2, 0] == 1
        assert routing.expert_ids[4, 0] == 0
        if k > 1:
            assert routing.expert_ids[2, 1] == 4
            assert routing.expert_ids[4, 1] == 1
    nan_rows = [0, 2, 4]
    clean_rows = [1, 3, 5]
    if mode == "hard":
        assert torch.equal(routing.weights, torch.ones(T, 1, dtype=dtype))
    else:
        assert bool(routing.weights[nan_rows].isnan().all())
    assert not bool(routing.weights[clean_rows].isnan().any())
    assert_close(routing.weights, w_ref)


# ----------------------------------------------------------------------------- plan


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=dtype_id)
@pytest.mark.parametrize("T, k, E", [(1, 1, 1), (17, 1, 4), (23, 2, 5), (8, 3, 3), (40, 4, 9)])
def test_routing_from_ids_plan(T, k, E, ids_dtype, gen):
    ids = random_ids(T, k, E, gen=gen).to(ids_dtype)
    routing = moefast.routing_from_ids(ids, E)
    torch.testing.assert_close(routing.expert_ids, ids.to(torch.int32), rtol=0, atol=0)
    assert_plan_equal(routing, E)
    assert routing.weights.dtype == torch.float32
    assert torch.equal(routing.weights, torch.full((T, k), 1.0 / k))
    assert int(routing.counts.sum()) == T * k
    # position and order are inverse permutations.
    order, position = routing.order.long(), routing.position.reshape(-1).long()
    assert torch.equal(order[position], torch.arange(T * k))


def test_routing_from_ids_1d_and_weights(gen):
    T, E = 10, 4
    ids = torch.randint(0, E, (T,), generator=gen)
    weights = randn(T, 1, gen=gen, dtype=torch.float64)
    routing = moefast.routing_from_ids(ids, E, weights)
    assert routing.expert_ids.shape == (T, 1)
    assert routing.weights is weights
    assert_plan_equal(routing, E)


def test_routing_from_ids_repeated_expert_per_token():
    """Two slots of one token on the same expert: both rows, in slot order."""
    ids = torch.tensor([[1, 1], [0, 1], [1, 0]], dtype=torch.int32)
    routing = moefast.routing_from_ids(ids, 3)
    assert routing.counts.tolist() == [2, 4, 0]
    assert routing.offs.tolist() == [2, 6, 6]
    assert routing.order.tolist() == [2, 5, 0, 1, 3, 4]
    assert_plan_equal(routing, 3)


def test_plan_is_stable(gen):
    """Inside one expert, rows follow the slot order t * k + j."""
    T, k, E = 50, 3, 4
    routing = moefast.routing_from_ids(random_ids(T, k, E, gen=gen), E)
    order = routing.order.long()
    flat_ids = routing.expert_ids.reshape(-1).long()
    begin = 0
    for e in range(E):
        end = int(routing.offs[e])
        rows = order[begin:end]
        assert bool((flat_ids[rows] == e).all())
        assert bool((rows[1:] > rows[:-1]).all())
        begin = end


def test_plan_identical_across_thread_counts(gen, restore_threads):
    """T * k = 40000 slots: the parallel counting sort uses several chunks; same plan for any."""
    T, k, E = 20000, 2, 16
    ids = random_ids(T, k, E, gen=gen)
    expected = ref.routing_plan(ids, E)
    plans = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        plans.append(moefast.routing_from_ids(ids, E))
    torch.set_num_threads(restore_threads)
    for routing in plans:
        for actual, exp in zip(
            (routing.counts, routing.offs, routing.position, routing.order), expected, strict=True
        ):
            assert torch.equal(actual, exp)


def test_routing_plan_raw_op(gen):
    ids = random_ids(15, 2, 6, gen=gen)
    counts, offs, position, order = torch.ops.moefast.routing_plan(ids, 6)
    for actual, expected in zip(
        (counts, offs, position, order), ref.routing_plan(ids, 6), strict=True
    ):
        assert actual.dtype == torch.int32
        assert torch.equal(actual, expected)


def test_routing_is_a_plain_tuple_of_tensors(gen):
    routing = moefast.route(distinct_logits(5, 4, gen=gen), 2)
    assert isinstance(routing, tuple)
    assert routing._fields == ("expert_ids", "weights", "offs", "counts", "position", "order")
    assert all(isinstance(t, torch.Tensor) for t in routing)


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("k", [1, 2])
def test_load_balancing_loss_matches_reference(k, dtype, gen):
    T, E = 16, 5
    logits = distinct_logits(T, E, gen=gen, dtype=dtype, requires_grad=True)
    routing = moefast.route(logits, k)
    loss = moefast.load_balancing_loss(logits, routing)
    logits_ref = leaf(logits)
    loss_ref = ref.load_balancing_loss(logits_ref, routing.expert_ids)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == acc and loss.shape == ()
    assert_close(loss, loss_ref, dtype)
    (g,) = grads(loss, [logits], torch.tensor(1.0, dtype=acc))
    (g_ref,) = grads(loss_ref, [logits_ref], torch.tensor(1.0, dtype=acc))
    assert g.dtype == dtype
    assert_close(g, g_ref, grad=True)


def test_load_balancing_loss_uniform_is_one():
    T, E = 8, 4
    logits = torch.zeros(T, E) + torch.linspace(0, 1e-3, E)  # near-uniform probabilities
    ids = torch.arange(T * 2, dtype=torch.int32).reshape(T, 2) % E  # perfectly balanced routing
    loss = moefast.load_balancing_loss(logits, moefast.routing_from_ids(ids, E))
    assert abs(float(loss) - 1.0) < 1e-3
    # Concentrated routing and probabilities give a larger loss.
    logits2 = logits.clone()
    logits2[:, 0] += 5.0
    routing2 = moefast.route(logits2, 2)
    assert float(moefast.load_balancing_loss(logits2, routing2)) > 1.5


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_z_loss_matches_reference(dtype, gen):
    logits = randn(12, 6, gen=gen, dtype=dtype, scale=3.0, requires_grad=True)
    loss = moefast.z_loss(logits)
    logits_ref = leaf(logits)
    loss_ref = ref.z_loss(logits_ref)
    assert loss.shape == ()
    assert_close(loss, loss_ref, dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    (g,) = grads(loss, [logits], torch.tensor(1.0, dtype=acc))
    (g_ref,) = grads(loss_ref, [logits_ref], torch.tensor(1.0, dtype=acc))
    assert_close(g, g_ref, grad=True)


def test_losses_zero_tokens():
    logits = torch.empty(0, 4)
    routing = moefast.route(logits, 2)
    assert float(moefast.load_balancing_loss(logits, routing)) == 0.0
    assert float(ref.load_balancing_loss(logits, routing.expert_ids)) == 0.0
    assert float(moefast.z_loss(logits)) == 0.0


# ----------------------------------------------------------------------------- apply_capacity


@pytest.mark.parametrize("capacity", [0, 1, 3, 7, 100])
def test_apply_capacity_layout(capacity, gen):
    """Kept rows keep their (expert, slot) order below offs[-1]; dropped rows follow, in order."""
    T, E, k = 20, 4, 2
    logits = distinct_logits(T, E, gen=gen)
    logits[:, 0] += 1.5  # a popular expert
    routing = moefast.route(logits, k)
    capped = moefast.apply_capacity(routing, capacity)
    keep, weights = ref.apply_capacity(routing.expert_ids, routing.weights, E, capacity)
    assert torch.equal(capped.expert_ids, routing.expert_ids)
    assert torch.equal(capped.weights, weights)
    assert torch.equal(capped.counts, routing.counts.clamp(max=capacity))
    assert torch.equal(capped.offs, torch.cumsum(capped.counts, 0).to(torch.int32))
    kept_row = keep.reshape(-1)[routing.order.long()]
    expected_order = torch.cat([routing.order[kept_row], routing.order[~kept_row]])
    assert torch.equal(capped.order, expected_order)
    flat_pos = capped.position.reshape(-1).long()
    assert torch.equal(capped.order[flat_pos].long(), torch.arange(T * k))
    for field in ("expert_ids", "weights", "offs", "counts", "position", "order"):
        assert getattr(capped, field).dtype == getattr(routing, field).dtype, field
    if capacity >= int(routing.counts.max()):
        for field in routing._fields:
            assert torch.equal(getattr(capped, field), getattr(routing, field)), field


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("capacity", [0, 4, 9])
def test_apply_capacity_pipeline_matches_reference(capacity, dtype, gen):
    T, E, k, d, h = 16, 4, 2, 5, 3
    x = randn(T, d, gen=gen, dtype=dtype, requires_grad=True)
    logits = distinct_logits(T, E, gen=gen, dtype=dtype)
    logits[:, 2] += 1.0
    logits.requires_grad_(True)
    b = randn(E, d, h, gen=gen, dtype=dtype, requires_grad=True)
    routing = moefast.apply_capacity(moefast.route(logits, k), capacity)
    y = moefast.grouped_mm(moefast.permute(x, routing), b, routing.offs)
    out = moefast.unpermute(y, routing)

    x_ref, logits_ref, b_ref = leaf(x), leaf(logits), leaf(b)
    w_ref, ids_ref = ref.route(logits_ref, k)
    _, w_ref = ref.apply_capacity(ids_ref, w_ref, E, capacity)
    _, offs_ref, pos_ref, _ = ref.routing_plan(ids_ref, E)  # dropless layout, zero weights
    out_ref = ref.unpermute(
        ref.grouped_mm(ref.permute(x_ref, pos_ref), b_ref, offs_ref), pos_ref, w_ref
    )
    assert_close(out, out_ref)
    if capacity == 0:
        assert torch.count_nonzero(out) == 0
    g = randn(T, h, gen=gen, dtype=dtype)
    for name, got, exp in zip(
        ("x", "logits", "b"),
        grads(out, [x, logits, b], g),
        grads(out_ref, [x_ref, logits_ref, b_ref], g),
        strict=True,
    ):
        assert_close(got, exp, grad=True, msg=lambda m, name=name: f"grad of {name}: {m}")
