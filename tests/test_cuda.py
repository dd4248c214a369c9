"""The CUDA kernels against the CPU path (itself tested against the reference), on fresh random
inputs whose sizes do not divide the block sizes; CUDA-graph capture and the absence of host
synchronisation. Every test here is marked ``cuda`` and skips cleanly without a GPU."""

from __future__ import annotations

import pytest
import torch

import moefast

pytestmark = pytest.mark.cuda

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _distinct_logits(T, E, gen, dtype):
    """Rows of well-separated values, so every dtype picks the same top-k on both devices."""
    base = torch.arange(E, dtype=torch.float64) * (4.0 / max(E - 1, 1)) - 2.0
    perm = torch.argsort(torch.rand(T, E, generator=gen, dtype=torch.float64), dim=1)
    return base[perm].to(dtype)


def _close(a, b, dtype):
    torch.testing.assert_close(a.cpu(), b.cpu(), equal_nan=True, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("mode", "E", "k", "normalize"),
    [
        ("softmax_topk", 8, 2, False),
        ("softmax_topk", 64, 8, True),
        ("topk_softmax", 256, 8, False),
        ("softmax_topk", 129, 20, False),
        ("hard", 33, 1, False),
        ("dense", 17, 17, False),
    ],
)
def test_router_matches_cpu(dtype, mode, E, k, normalize):
    gen = _gen(E * 31 + k)
    logits = _distinct_logits(301, E, gen, dtype)
    want = moefast.route(logits.requires_grad_(), k, mode=mode, normalize=normalize)
    lc = logits.detach().cuda().requires_grad_()
    got = moefast.route(lc, k, mode=mode, normalize=normalize)
    assert torch.equal(got.expert_ids.cpu(), want.expert_ids)
    _close(got.weights, want.weights, dtype)
    for field in ("counts", "offs", "position", "order"):
        assert torch.equal(getattr(got, field).cpu(), getattr(want, field)), field
    if mode != "hard":
        g = torch.randn(301, k, generator=gen).to(dtype)
        (want.weights * g).sum().backward()
        (got.weights * g.cuda()).sum().backward()
        _close(lc.grad, logits.grad, dtype)


def test_router_ties_and_nan_match_cpu():
    logits = torch.zeros(5, 12)
    logits[1, 3] = float("nan")
    logits[2, :] = torch.tensor([1.0, 3.0, 3.0, 2.0] * 3)
    want = moefast.route(logits, 4)
    got = moefast.route(logits.cuda(), 4)
    assert torch.equal(got.expert_ids.cpu(), want.expert_ids)
    _close(got.weights, want.weights, torch.float32)


@pytest.mark.parametrize(("T", "k", "E"), [(0, 2, 4), (1, 1, 1), (777, 2, 8), (20000, 4, 256)])
def test_plan_matches_cpu(T, k, E):
    gen = _gen(T + E)
    ids = torch.randint(0, E, (T, k), generator=gen, dtype=torch.int32)
    if T > 10:
        ids[:, 0] = 0  # a crowded expert
        ids[ids == E - 1] = 0  # and an empty one
    want = moefast.routing_from_ids(ids, E)
    got = moefast.routing_from_ids(ids.cuda(), E)
    for field in ("counts", "offs", "position", "order"):
        assert torch.equal(getattr(got, field).cpu(), getattr(want, field)), field


def test_plan_out_of_range_ids_are_dropped_past_offs_on_cuda():
    ids = torch.tensor([[0], [5], [1], [-1], [1]], dtype=torch.int32)
    r = moefast.routing_from_ids(ids.cuda(), 2)
    assert r.counts.tolist() == [1, 2]
    assert r.offs.tolist() == [1, 3]
    assert sorted(r.position.flatten().tolist()) == [0, 1, 2, 3, 4]
    assert set(r.position[[1, 3]].flatten().tolist()) == {3, 4}  # past offs[-1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1024, 1001, 8])
@pytest.mark.parametrize("weighted", [False, True])
def test_permute_unpermute_match_cpu(dtype, d, weighted):
    gen = _gen(d)
    T, E, k = 203, 7, 3
    logits = _distinct_logits(T, E, gen, torch.float32)
    x = torch.randn(T, d, generator=gen).to(dtype)
    r_cpu = moefast.route(logits, k)
    r_gpu = moefast.route(logits.cuda(), k)
    xc = x.clone().requires_grad_()
    xg = x.cuda().requires_grad_()
    w_cpu = r_cpu.weights.clone().requires_grad_() if weighted else None
    w_gpu = r_gpu.weights.clone().requires_grad_() if weighted else None
    pc, pg = moefast.permute(xc, r_cpu), moefast.permute(xg, r_gpu)
    _close(pg, pc, dtype)
    yc = moefast.unpermute(pc * 1.5, r_cpu, w_cpu)
    yg = moefast.unpermute(pg * 1.5, r_gpu, w_gpu)
    _close(yg, yc, dtype)
    g = torch.randn(T, d, generator=gen).to(dtype)
    yc.backward(g)
    yg.backward(g.cuda())
    _close(xg.grad, xc.grad, dtype)
    if weighted:
        torch.testing.assert_close(w_gpu.grad.cpu(), w_cpu.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("B", "E", "C"), [(1, 1, 1), (67, 3, 1000), (130, 33, 17)])
def test_mixture_matches_cpu(dtype, B, E, C):
    gen = _gen(B * E + C)
    gate = torch.randn(B, E, generator=gen).to(dtype)
    eo = torch.randn(E, B, C, generator=gen).to(dtype)
    gc, ec = gate.clone().requires_grad_(), eo.clone().requires_grad_()
    gg, eg = gate.cuda().requires_grad_(), eo.cuda().requires_grad_()
    oc, og = moefast.mixture(gc, ec), moefast.mixture(gg, eg)
    _close(og, oc, dtype)
    g = torch.randn(B, C, generator=gen).to(dtype)
    oc.backward(g)
    og.backward(g.cuda())
    _close(eg.grad, ec.grad, dtype)
    torch.testing.assert_close(gg.grad.cpu().float(), gc.grad.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (67, 2 * 1000), (3, 130, 2 * 17), (0, 8)])
def test_swiglu_matches_cpu(dtype, shape):
    gen = _gen(sum(shape))
    h = (torch.randn(*shape, generator=gen) * 3).to(dtype)
    hc, hg = h.clone().requires_grad_(), h.cuda().requires_grad_()
    oc, og = moefast.swiglu(hc), moefast.swiglu(hg)
    _close(og, oc, dtype)
    g = torch.randn(*oc.shape, generator=gen).to(dtype)
    oc.backward(g)
    og.backward(g.cuda())
    _close(hg.grad, hc.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_swiglu_mlp_matches_cpu(dtype):
    """On CUDA grouped_swiglu_mlp is the composition of the CUDA grouped_mm and swiglu; it agrees
    with the CPU op (which runs expert by expert), forward and backward."""
    gen = _gen(11)
    E, d, H, N = 4, 40, 24, 150
    offs = torch.tensor([30, 30, 100, 141], dtype=torch.int32)  # an empty expert, unused tail
    args = [
        torch.randn(N, d, generator=gen),
        torch.randn(E, d, 2 * H, generator=gen) * d**-0.5,
        torch.randn(E, 2 * H, generator=gen),
        torch.randn(E, H, d, generator=gen) * H**-0.5,
        torch.randn(E, d, generator=gen),
    ]
    cpu = [a.to(dtype).requires_grad_() for a in args]
    gpu = [a.to(dtype).cuda().requires_grad_() for a in args]
    yc = moefast.grouped_swiglu_mlp(*cpu, offs)
    yg = moefast.grouped_swiglu_mlp(*gpu, offs.cuda())
    _close(yg, yc, dtype)
    g = torch.randn(N, d, generator=gen).to(dtype)
    yc.backward(g)
    yg.backward(g.cuda())
    for a, b in zip(gpu, cpu, strict=True):
        torch.testing.assert_close(a.grad.cpu().float(), b.grad.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_bias_grad_matches_cpu(dtype):
    gen = _gen(5)
    grad = torch.randn(301, 77, generator=gen).to(dtype)
    offs = torch.tensor([10, 10, 150, 290], dtype=torch.int32)  # an empty group, unused tail
    want = torch.ops.moefast.grouped_bias_grad(grad, offs)
    got = torch.ops.moefast.grouped_bias_grad(grad.cuda(), offs.cuda())
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(got[1].cpu(), torch.zeros(77, dtype=dtype))


@pytest.mark.parametrize("dtype", (*DTYPES, torch.float64))
@pytest.mark.parametrize("E, d", [(2, 7), (13, 100), (64, 1024)])
def test_tree_route_matches_cpu(dtype, E, d):
    from moefast_testing import random_tree

    gen = _gen(E * 7 + d)
    w, b, child, depth = random_tree(E, d, gen=gen, dtype=dtype)
    x = torch.randn(1001, d, generator=gen).to(dtype)
    want = moefast.tree_route(x, w, b, child, depth)
    got = moefast.tree_route(x.cuda(), w.cuda(), b.cuda(), child.cuda(), depth)
    assert got.dtype == torch.int32 and got.device.type == "cuda"
    # the sums run in another order on the GPU: only rows within rounding of a hyperplane may differ
    differ = (got.cpu() != want).float().mean().item()
    assert differ <= (0.01 if dtype in (torch.bfloat16, torch.float16) else 0.002), differ
    empty = moefast.tree_route(x[:0].cuda(), w.cuda(), b.cuda(), child.cuda(), depth)
    assert empty.shape == (0,)


def test_tree_route_leaving_the_tree_gives_minus_one_on_cuda():
    from moefast_testing import random_tree

    w, b, child, depth = random_tree(5, 6, gen=_gen(3))
    child[0] = torch.tensor([7, 7])
    got = moefast.tree_route(torch.randn(20, 6).cuda(), w.cuda(), b.cuda(), child.cuda(), depth)
    assert torch.equal(got.cpu(), torch.full((20,), -1, dtype=torch.int32))


def _pipeline(x, logits, k):
    routing = moefast.route(logits, k, normalize=True)
    y = moefast.permute(x, routing) * 2.0
    out = moefast.unpermute(y, routing)
    return out, routing


def test_pipeline_has_no_host_sync():
    gen = _gen(11)
    x = torch.randn(513, 96, generator=gen).cuda().requires_grad_()
    logits = _distinct_logits(513, 16, gen, torch.float32).cuda().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, routing = _pipeline(x, logits, 4)
        loss = out.square().sum() + moefast.load_balancing_loss(logits, routing)
        loss = loss + moefast.z_loss(logits)
        loss.backward()
        capped = moefast.apply_capacity(routing, 100)
        moefast.unpermute(moefast.permute(x, capped), capped).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert x.grad is not None and logits.grad is not None


def test_pipeline_forward_and_backward_in_a_cuda_graph():
    gen = _gen(12)
    T, d, E, k = 300, 64, 8, 2
    x = torch.randn(T, d, generator=gen).cuda().requires_grad_()
    logits = _distinct_logits(T, E, gen, torch.float32).cuda().requires_grad_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up outside the capture
            x.grad = logits.grad = None
            out, _ = _pipeline(x, logits, k)
            out.square().sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    x.grad = logits.grad = None
    with torch.cuda.graph(graph):
        out, _ = _pipeline(x, logits, k)
        out.square().sum().backward()
    # Replay on new inputs and compare with an eager run.
    new_x = torch.randn(T, d, generator=gen).cuda()
    new_logits = _distinct_logits(T, E, gen, torch.float32).cuda()
    with torch.no_grad():
        x.copy_(new_x)
        logits.copy_(new_logits)
    graph.replay()
    torch.cuda.synchronize()
    xe = new_x.clone().requires_grad_()
    le = new_logits.clone().requires_grad_()
    out_e, _ = _pipeline(xe, le, k)
    out_e.square().sum().backward()
    torch.testing.assert_close(out, out_e)
    torch.testing.assert_close(x.grad, xe.grad)
    torch.testing.assert_close(logits.grad, le.grad)
