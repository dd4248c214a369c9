"""moefast.tree_route (the routing of the hard MoE's "tree" gater) against moefast.reference, in
every dtype, with poisoned outputs; uneven trees, zero rows, a tree with no nodes, every row on
one expert, non-contiguous inputs; bad arguments and walks that leave the tree."""

from __future__ import annotations

import pytest
import torch
from moefast_testing import FLOAT_DTYPES, dtype_id, randn, random_tree

import moefast
from moefast import reference as ref

_ops = torch.ops.moefast
dtypes = pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)


@dtypes
@pytest.mark.parametrize("E, d, B", [(2, 5, 37), (3, 16, 200), (11, 33, 301), (64, 20, 999)])
def test_tree_route_matches_reference(E, d, B, dtype, gen):
    w, b, child, depth = random_tree(E, d, gen=gen, dtype=dtype)
    x = randn(B, d, gen=gen, dtype=dtype)
    got = moefast.tree_route(x, w, b, child, depth)
    want = ref.tree_route(x, w, b, child, depth)
    assert got.dtype == torch.int32 and got.shape == (B,)
    assert torch.equal(got, want)
    if B >= 50 * E:  # an even enough spread reaches every leaf
        assert torch.bincount(got, minlength=E).min() > 0


def test_tree_route_walks_each_row_by_hand(gen):
    w, b, child, depth = random_tree(9, 7, gen=gen, dtype=torch.float64)
    x = randn(40, 7, gen=gen, dtype=torch.float64)
    got = moefast.tree_route(x, w, b, child, depth)
    for i in range(x.shape[0]):
        node = 0
        while node >= 0:
            node = int(child[node, int(x[i] @ w[node] > b[node])])
        assert int(got[i]) == -node - 1


def test_tree_route_edge_cases(gen):
    w, b, child, depth = random_tree(5, 8, gen=gen)
    # zero rows
    assert moefast.tree_route(torch.zeros(0, 8), w, b, child, depth).shape == (0,)
    # a tree with no nodes sends every row to expert 0
    x = randn(13, 8, gen=gen)
    none = moefast.tree_route(x, torch.zeros(0, 8), torch.zeros(0), child[:0], 0)
    assert torch.equal(none, torch.zeros(13, dtype=torch.int32))
    # every row on one expert: thresholds no row can pass, so each walk takes child 0
    far = moefast.tree_route(x, w, torch.full_like(b, 1e30), child, depth)
    node = 0
    while node >= 0:
        node = int(child[node, 0])
    assert torch.equal(far, torch.full((13,), -node - 1, dtype=torch.int32))
    # a deeper depth bound than the tree needs changes nothing
    assert torch.equal(
        moefast.tree_route(x, w, b, child, w.shape[0]), moefast.tree_route(x, w, b, child, depth)
    )


def test_tree_route_non_contiguous(gen):
    w, b, child, depth = random_tree(12, 10, gen=gen)
    x = randn(10, 50, gen=gen).T  # [50, 10], transposed
    w_nc = torch.stack([w, w], 2)[:, :, 0]  # strided rows
    b_nc = torch.stack([b, b], 1)[:, 1]
    child_nc = child.T.contiguous().T
    want = ref.tree_route(x.contiguous(), w, b, child, depth)
    assert not (x.is_contiguous() or w_nc.is_contiguous() or b_nc.is_contiguous())
    assert torch.equal(moefast.tree_route(x, w_nc, b_nc, child_nc, depth), want)


def test_tree_route_larger_parallel(gen):
    torch.set_num_threads(2)
    w, b, child, depth = random_tree(32, 64, gen=gen)
    x = randn(5000, 64, gen=gen)
    assert torch.equal(
        moefast.tree_route(x, w, b, child, depth), ref.tree_route(x, w, b, child, depth)
    )


def test_tree_route_compiles(gen):
    w, b, child, depth = random_tree(6, 8, gen=gen)
    x = randn(30, 8, gen=gen)
    fn = torch.compile(lambda t: moefast.tree_route(t, w, b, child, depth), fullgraph=True)
    assert torch.equal(fn(x), moefast.tree_route(x, w, b, child, depth))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (lambda a: {**a, "x": a["x"][0]}, ValueError, "x must be 2-D"),
        (lambda a: {**a, "x": a["x"].long()}, TypeError, "x must be float"),
        (lambda a: {**a, "node_w": a["node_w"][:, :3]}, ValueError, "node_w must be \\[n, d\\]"),
        (lambda a: {**a, "node_w": a["node_w"].double()}, TypeError, "node_w and node_b"),
        (lambda a: {**a, "node_b": a["node_b"].double()}, TypeError, "node_w and node_b"),
        (lambda a: {**a, "node_b": a["node_b"][:2]}, ValueError, "node_b must be \\[n\\]"),
        (
            lambda a: {**a, "node_child": a["node_child"].int()},
            TypeError,
            "node_child must be int64",
        ),
        (
            lambda a: {**a, "node_child": a["node_child"][:, :1]},
            ValueError,
            "node_child \\[n, 2\\]",
        ),
        (lambda a: {**a, "depth": 0}, ValueError, "depth must be"),
        (lambda a: {**a, "depth": 99}, ValueError, "depth must be"),
        (lambda a: {**a, "depth": 2.0}, ValueError, "depth must be"),
        (lambda a: {**a, "node_w": a["node_w"].to("meta")}, ValueError, "same device"),
    ],
)
def test_tree_route_bad_arguments(change, exc, match, gen):
    w, b, child, depth = random_tree(5, 6, gen=gen)
    args = {
        "x": randn(7, 6, gen=gen),
        "node_w": w,
        "node_b": b,
        "node_child": child,
        "depth": depth,
    }
    with pytest.raises(exc, match=match):
        moefast.tree_route(**change(args))


def test_tree_route_raw_op_checks_too(gen):
    w, b, child, depth = random_tree(5, 6, gen=gen)
    x = randn(7, 6, gen=gen)
    with pytest.raises(ValueError, match="node_w must be"):
        _ops.tree_route(x, w[:, :2], b, child, depth)
    with pytest.raises(TypeError, match="node_child must be int64"):
        _ops.tree_route(x, w, b, child.int(), depth)
    with pytest.raises(ValueError, match="depth must be"):
        _ops.tree_route(x, w, b, child, 0)


def test_tree_route_walk_leaving_the_tree_raises(gen):
    w, b, child, depth = random_tree(5, 6, gen=gen)
    x = randn(50, 6, gen=gen)
    bad = child.clone()
    bad[0] = torch.tensor([7, 7])  # a node that does not exist
    with pytest.raises(ValueError, match="left the tree"):
        moefast.tree_route(x, w, b, bad, depth)
    loop = child.clone()
    loop[0] = torch.tensor([0, 0])  # a cycle: no leaf within depth levels
    with pytest.raises(ValueError, match="left the tree"):
        moefast.tree_route(x, w, b, loop, depth)
