"""The CUDA grouped GEMM (forward, data gradient, weight gradient, fused bias and activation)
against a float64 reference on fresh random inputs, on every implementation the dispatcher can
pick: aligned bf16/fp16 shapes take the tensor-core kernels (CUTLASS, sm_90a or sm_80), fp32 takes
them as TF32 only when TF32 is allowed, and fp64, fp32 and unaligned shapes take the CUDA-core
kernel. Group sizes include empty groups, one group holding every row, sizes that are not
multiples of the tiles, an unused tail past offs[-1] and E = 256 under Zipf routing. The group
sizes stay on the device: the op runs under sync-debug "error" mode and inside a CUDA graph whose
replays change the group sizes. Every test is marked ``cuda`` and skips cleanly without a GPU."""

from __future__ import annotations

import math

import pytest
import torch

import moefast
import moefast.nn
from moefast import reference

pytestmark = pytest.mark.cuda

# Relative tolerance against the float64 reference, as a fraction of the output scale.
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}
TF32_TOL = 5e-3


def _sizes(pattern: str, N: int, E: int, gen: torch.Generator) -> list[int]:
    if pattern == "uniform":
        base = [N // E] * E
        base[-1] += N - sum(base)
        return base
    if pattern == "empty_groups":  # every other group empty
        full = E // 2 + E % 2
        sizes = [0] * E
        for i in range(full):
            sizes[2 * i] = N // full
        sizes[0] += N - sum(sizes)
        return sizes
    if pattern == "one_group":  # every row on the last expert
        return [0] * (E - 1) + [N]
    if pattern == "ragged":  # sizes that are not multiples of any tile, some empty
        w = torch.rand(E, generator=gen) * (torch.rand(E, generator=gen) > 0.2)
        w[0] = w[0] + 0.01
        sizes = torch.floor(w / w.sum() * N).long().tolist()
        sizes[0] += N - sum(sizes)
        return sizes
    if pattern == "zipf":  # skewed routing: expert e gets a share proportional to 1 / (e + 1)
        w = 1.0 / torch.arange(1, E + 1, dtype=torch.float64)
        sizes = torch.floor(w / w.sum() * N).long().tolist()
        sizes[0] += N - sum(sizes)
        return sizes
    if pattern == "tail":  # the last rows belong to no group
        used = N - 37
        sizes = [used // E] * E
        sizes[-1] += used - sum(sizes)
        return sizes
    raise AssertionError(pattern)


def _offs(sizes: list[int]) -> torch.Tensor:
    return torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(torch.int32)


def _inputs(N, K, M, E, dtype, gen, bias=False):
    a = torch.randn(N, K, generator=gen, dtype=torch.float64).to(dtype)
    b = (torch.randn(E, K, M, generator=gen, dtype=torch.float64) / math.sqrt(K)).to(dtype)
    bb = torch.randn(E, M, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    return a, b, bb


def _assert_close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str):
    got = got.detach().cpu().double()
    want = want.detach().cpu().double()
    assert got.shape == want.shape, what
    assert torch.isfinite(got).all(), f"{what}: non-finite values (an element left unwritten?)"
    scale = max(want.abs().max().item(), 1.0)
    err = (got - want).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.3g} x {scale:.3g}"


def _reference_grads(a, b, offs, bias, grad_out):
    a64 = a.double().requires_grad_()
    b64 = b.double().requires_grad_()
    bias64 = bias.double().requires_grad_() if bias is not None else None
    out = reference.grouped_mm(a64, b64, offs, bias64)
    out.backward(grad_out.double())
    return out, a64.grad, b64.grad, (bias64.grad if bias is not None else None)


CASES = [
    # (N, K, M, E, pattern): aligned shapes reach the tensor-core kernels for bf16 / fp16
    (1000, 128, 256, 8, "uniform"),
    (777, 64, 136, 8, "ragged"),
    (513, 256, 64, 6, "empty_groups"),
    (300, 96, 128, 5, "one_group"),
    (640, 64, 64, 4, "tail"),
    (2048, 64, 128, 256, "zipf"),
    # unaligned: K and M not multiples of 8 -> the CUDA-core kernel for every dtype
    (301, 70, 33, 7, "ragged"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize(("N", "K", "M", "E", "pattern"), CASES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_grouped_mm_forward_and_backward(dtype, N, K, M, E, pattern, with_bias, gen):
    torch.backends.cuda.matmul.allow_tf32 = False
    sizes = _sizes(pattern, N, E, gen)
    offs = _offs(sizes)
    a, b, bias = _inputs(N, K, M, E, dtype, gen, with_bias)
    grad_out = torch.randn(N, M, generator=gen, dtype=torch.float64).to(dtype)
    want, ga, gb, gbias = _reference_grads(a, b, offs, bias, grad_out)

    ac = a.cuda().requires_grad_()
    bc = b.cuda().requires_grad_()
    biasc = bias.cuda().requires_grad_() if with_bias else None
    got = moefast.grouped_mm(ac, bc, offs.cuda(), biasc)
    got.backward(grad_out.cuda())
    tol = TOL[dtype]
    _assert_close(got, want, tol, "forward")
    _assert_close(ac.grad, ga, tol, "data gradient")
    _assert_close(bc.grad, gb, tol * 4, "weight gradient")
    if with_bias:
        _assert_close(biasc.grad, gbias, tol * 4, "bias gradient")
    used = int(offs[-1])
    assert torch.equal(got[used:].cpu(), torch.zeros(N - used, M, dtype=dtype)), "tail not zero"
    for e, n in enumerate(sizes):
        if n == 0:
            assert torch.equal(bc.grad[e].cpu(), torch.zeros(K, M, dtype=dtype)), e


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "swiglu", "none"])
@pytest.mark.parametrize(("K", "M"), [(128, 192), (72, 50)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_grouped_mm_act_fused_epilogue(dtype, activation, K, M, with_bias, gen):
    """relu / gelu / silu in the epilogue (with the bias); swiglu without a bias as two GEMMs whose
    second epilogue reads the gate, with a bias as the product and one more pass."""
    torch.backends.cuda.matmul.allow_tf32 = False
    N, E = 600, 6
    offs = _offs(_sizes("ragged", N - 11, E, gen))
    a, b, bias = _inputs(N, K, M, E, dtype, gen, bias=with_bias)
    bias64 = bias.double() if with_bias else None
    want = reference.grouped_mm_act(a.double(), b.double(), offs, bias64, activation)
    biasc = bias.cuda() if with_bias else None
    got = moefast.grouped_mm_act(a.cuda(), b.cuda(), offs.cuda(), biasc, activation)
    _assert_close(got, want, TOL[dtype], activation)
    used = int(offs[-1])
    assert torch.equal(got[used:].cpu(), torch.zeros_like(got[used:].cpu())), "tail not zero"
    # Gradients through the recomputed pre-activation match the reference's autograd.
    ac = a.cuda().requires_grad_()
    bc = b.cuda().requires_grad_()
    biasc = bias.cuda().requires_grad_() if with_bias else None
    g = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    moefast.grouped_mm_act(ac, bc, offs.cuda(), biasc, activation).backward(g.to(dtype).cuda())
    a64 = a.double().requires_grad_()
    b64 = b.double().requires_grad_()
    bias64 = bias.double().requires_grad_() if with_bias else None
    reference.grouped_mm_act(a64, b64, offs, bias64, activation).backward(g.to(dtype).double())
    _assert_close(ac.grad, a64.grad, TOL[dtype] * 2, f"{activation} data gradient")
    _assert_close(bc.grad, b64.grad, TOL[dtype] * 4, f"{activation} weight gradient")
    if with_bias:
        _assert_close(biasc.grad, bias64.grad, TOL[dtype] * 4, f"{activation} bias gradient")


def test_tf32_only_when_allowed(gen):
    N, K, M, E = 512, 256, 128, 4
    offs = _offs(_sizes("ragged", N, E, gen))
    a, b, _ = _inputs(N, K, M, E, torch.float32, gen)
    want = reference.grouped_mm(a.double(), b.double(), offs)
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        exact = moefast.grouped_mm(a.cuda(), b.cuda(), offs.cuda())
        _assert_close(exact, want, TOL[torch.float32], "fp32")
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = moefast.grouped_mm(a.cuda(), b.cuda(), offs.cuda())
        _assert_close(tf32, want, TF32_TOL, "tf32")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_non_contiguous_operands(dtype, gen):
    torch.backends.cuda.matmul.allow_tf32 = False
    N, K, M, E = 400, 64, 80, 5
    offs = _offs(_sizes("ragged", N, E, gen))
    a_t = torch.randn(K, N, generator=gen).to(dtype)  # a = a_t.T: column-major
    w = (torch.randn(E, M, K, generator=gen) / math.sqrt(K)).to(dtype)  # b = w^T per expert
    want = reference.grouped_mm(a_t.T.double(), w.transpose(1, 2).double(), offs)
    got = moefast.grouped_mm(a_t.cuda().T, w.cuda().transpose(1, 2), offs.cuda())
    _assert_close(got, want, TOL[dtype], "transposed operands")
    strided = torch.randn(E, K, 2 * M, generator=gen).to(dtype)[:, :, ::2]
    want = reference.grouped_mm(a_t.T.double(), strided.double(), offs)
    got = moefast.grouped_mm(a_t.T.cuda(), strided.cuda(), offs.cuda())
    _assert_close(got, want, TOL[dtype], "strided b")


def test_backend_selection():
    """The dispatcher picks the tensor-core kernels where it should, so that the tests above
    exercise them (and not only the CUDA-core fallback) on this GPU."""
    major, minor = torch.cuda.get_device_capability()
    sm = major * 10 + minor
    tc = moefast._C.with_cutlass and sm >= 80
    want16 = ("sm90" if sm == 90 else "sm80") if tc else "simt"
    backend = moefast._C.grouped_mm_backend
    a = torch.randn(64, 128, device="cuda").bfloat16()
    b = torch.randn(4, 128, 256, device="cuda").bfloat16()
    assert backend(a, b) == want16
    assert backend(a.half(), b.half()) == want16
    assert backend(a, b.transpose(1, 2).contiguous().transpose(1, 2)) == want16  # data gradient
    assert backend(a, torch.randn(64, 256, device="cuda").bfloat16(), weight_grad=True) == want16
    assert backend(a[:, :70], b[:, :70]) == "simt"  # K = 70 is not a multiple of 8
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert backend(a.float(), b.float()) == "simt"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert backend(a.float(), b.float()) == ("sm80_tf32" if tc else "simt")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert backend(a.double(), b.double()) == "simt"


def test_empty_reduction_gives_bias(gen):
    """K = 0: every product is empty, so the output is the bias (zeros past offs[-1])."""
    a = torch.randn(40, 0, generator=gen).bfloat16().cuda()
    b = torch.randn(3, 0, 16, generator=gen).bfloat16().cuda()
    bias = torch.randn(3, 16, generator=gen).bfloat16()
    offs = torch.tensor([10, 10, 30], dtype=torch.int32)
    got = moefast.grouped_mm(a, b, offs.cuda(), bias.cuda()).cpu()
    want = reference.grouped_mm(a.cpu(), b.cpu(), offs, bias)
    assert torch.equal(got, want)


def test_zero_rows_and_single_expert(gen):
    a = torch.randn(0, 64, generator=gen).bfloat16().cuda()
    b = torch.randn(3, 64, 32, generator=gen).bfloat16().cuda()
    offs = torch.zeros(3, dtype=torch.int32, device="cuda")
    assert moefast.grouped_mm(a, b, offs).shape == (0, 32)
    gb = torch.ops.moefast.grouped_mm_weight_grad(a, torch.zeros(0, 32).bfloat16().cuda(), offs)
    assert torch.equal(gb.cpu(), torch.zeros(3, 64, 32, dtype=torch.bfloat16))
    a = torch.randn(50, 64, generator=gen).bfloat16()
    b = torch.randn(1, 64, 32, generator=gen).bfloat16()
    offs = torch.tensor([50], dtype=torch.int32)
    want = reference.grouped_mm(a.double(), b.double(), offs)
    _assert_close(moefast.grouped_mm(a.cuda(), b.cuda(), offs.cuda()), want, 2e-2, "E = 1")


def test_grouped_mm_has_no_host_sync(gen):
    N, K, M, E = 1024, 128, 256, 16
    offs = _offs(_sizes("zipf", N, E, gen)).cuda()
    a = torch.randn(N, K, generator=gen).bfloat16().cuda().requires_grad_()
    b = torch.randn(E, K, M, generator=gen).bfloat16().cuda().requires_grad_()
    bias = torch.randn(E, M, generator=gen).bfloat16().cuda().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = moefast.grouped_mm(a, b, offs, bias)
        out.float().square().sum().backward()
        moefast.grouped_mm_act(a.detach(), b.detach(), offs, bias.detach(), "gelu")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert a.grad is not None and b.grad is not None and bias.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_graph_replay_with_new_group_sizes(dtype, gen):
    """The group sizes are read on the device: a captured graph replays correctly after offs
    changes, including to sizes with empty groups."""
    torch.backends.cuda.matmul.allow_tf32 = False
    N, K, M, E = 768, 64, 128, 8
    offs = _offs(_sizes("uniform", N, E, gen)).cuda()
    a = torch.randn(N, K, generator=gen).to(dtype).cuda().requires_grad_()
    b = (torch.randn(E, K, M, generator=gen) / 8).to(dtype).cuda().requires_grad_()
    grad = torch.randn(N, M, generator=gen).to(dtype).cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            a.grad = b.grad = None
            moefast.grouped_mm(a, b, offs).backward(grad)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    a.grad = b.grad = None
    with torch.cuda.graph(graph):
        out = moefast.grouped_mm(a, b, offs)
        out.backward(grad)
    for pattern in ("zipf", "empty_groups", "tail"):
        sizes = _sizes(pattern, N, E, gen)
        offs.copy_(_offs(sizes).cuda())
        graph.replay()
        torch.cuda.synchronize()
        want, ga, gb, _ = _reference_grads(
            a.detach().cpu(), b.detach().cpu(), offs.cpu(), None, grad.cpu()
        )
        _assert_close(out, want, TOL[dtype], f"{pattern} forward")
        _assert_close(a.grad, ga, TOL[dtype], f"{pattern} data gradient")
        _assert_close(b.grad, gb, TOL[dtype] * 4, f"{pattern} weight gradient")


def test_moe_layer_on_cuda_matches_cpu(gen):
    torch.backends.cuda.matmul.allow_tf32 = False
    layer = moefast.nn.MoE(64, 128, num_experts=8, k=2, activation="swiglu")
    x = torch.randn(300, 64, generator=gen)
    want = layer(x)
    want.square().sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    cuda_layer = layer.cuda()
    got = cuda_layer(x.cuda())
    got.square().sum().backward()
    _assert_close(got, want, 1e-4, "MoE forward")
    for p, g in zip(cuda_layer.parameters(), grads, strict=True):
        _assert_close(p.grad, g, 1e-4, "MoE gradient")
