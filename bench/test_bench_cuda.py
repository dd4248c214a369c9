"""CUDA benchmarks: the memory-bound kernels with their roofline beside them, and the grouped GEMM
against dense cuBLAS, torch's grouped GEMM and a per-expert loop.

- permute and unpermute (bfloat16, T=16384, d=4096, k=2) in GB/s (bytes read plus bytes written)
  against the device's measured copy bandwidth;
- the router (T=16384, E in {8, 64, 256}, top-2 and top-8) against torch's softmax + topk;
- mixture (B=16384, E=4, C=1024, bfloat16) against the copy bandwidth.

Times come from CUDA events (median of many runs after a warm-up); pytest-benchmark records the
same calls with a device synchronisation at the end of each. Skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch

import moefast

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _event_median_ms(fn, reps=50, warmup=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


@pytest.fixture(scope="module")
def copy_gbps():
    """Measured device-to-device copy bandwidth, bytes read plus bytes written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _event_median_ms(lambda: dst.copy_(src), reps=20)
    return 2 * src.numel() / ms / 1e6


def _record(benchmark, fn, **info):
    benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=20, warmup_rounds=3)
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("op", ["permute", "unpermute"])
def test_permute_unpermute_bandwidth(benchmark, copy_gbps, op):
    T, d, k, E = 16384, 4096, 2, 8
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    routing = moefast.route(torch.randn(T, E, device="cuda"), k)
    y = moefast.permute(x, routing)
    if op == "permute":
        fn = lambda: moefast.permute(x, routing)  # noqa: E731
    else:
        fn = lambda: moefast.unpermute(y, routing)  # noqa: E731
    # Each token row is read once and written k times (permute), or the reverse (unpermute).
    nbytes = (T * d + T * k * d) * x.element_size()
    ms = _event_median_ms(fn)
    gbps = nbytes / ms / 1e6
    _record(
        benchmark,
        fn,
        op=op,
        median_ms=ms,
        gbps=gbps,
        copy_gbps=copy_gbps,
        fraction_of_copy=gbps / copy_gbps,
    )
    print(f"\n{op}: {gbps:.0f} GB/s = {gbps / copy_gbps:.2f} of copy bandwidth ({copy_gbps:.0f})")


@pytest.mark.parametrize("E", [8, 64, 256])
@pytest.mark.parametrize("k", [2, 8])
def test_router_against_torch(benchmark, E, k):
    T = 16384
    logits = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)

    def ours():
        return torch.ops.moefast.router(logits, k, "softmax_topk", True)

    def theirs():
        p = torch.softmax(logits.float(), dim=-1)
        w, i = torch.topk(p, k, dim=-1)
        return (w / w.sum(dim=-1, keepdim=True)).to(logits.dtype), i.to(torch.int32)

    got, want = ours(), theirs()
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=2e-2, atol=2e-2)
    ms_ours, ms_theirs = _event_median_ms(ours), _event_median_ms(theirs)
    _record(
        benchmark,
        ours,
        E=E,
        k=k,
        median_ms=ms_ours,
        torch_ms=ms_theirs,
        speedup=ms_theirs / ms_ours,
    )
    print(f"\nrouter E={E} k={k}: {ms_theirs / ms_ours:.2f}x faster than softmax + topk")


def test_mixture_bandwidth(benchmark, copy_gbps):
    B, E, C = 16384, 4, 1024
    gate = torch.randn(B, E, device="cuda", dtype=torch.bfloat16)
    eo = torch.randn(E, B, C, device="cuda", dtype=torch.bfloat16)
    fn = lambda: moefast.mixture(gate, eo)  # noqa: E731
    nbytes = (E * B * C + B * C + B * E) * eo.element_size()
    ms = _event_median_ms(fn)
    gbps = nbytes / ms / 1e6
    _record(
        benchmark,
        fn,
        median_ms=ms,
        gbps=gbps,
        copy_gbps=copy_gbps,
        fraction_of_copy=gbps / copy_gbps,
    )
    print(f"\nmixture: {gbps:.0f} GB/s = {gbps / copy_gbps:.2f} of copy bandwidth")


# ----------------------------------------------------------------------------- grouped GEMM goals
# The tensor-core grouped GEMM on the shapes, bfloat16: Mixtral-8x7B-like (d=4096,
# h=14336, E=8, top-2) and Qwen3-30B-A3B-like (d=2048, h=768, E=128, top-8), 16k tokens, with
# uniform and Zipf-skewed routing. Each pass (forward a @ w[e], data gradient g @ w[e]^T, weight
# gradient a_e^T @ g_e) is timed side by side with
#   - cuBLAS on one dense problem of the same total FLOPs (torch.matmul), the limit;
#   - torch's grouped GEMM (torch._grouped_mm / F.grouped_mm), where it runs;
#   - a per-expert loop of torch.matmul over views.
# The goals: >= 0.75 of the dense limit, at least as fast as torch's grouped GEMM, faster than the
# loop. Ratios are recorded in extra_info (and printed), never asserted.
GEMM_SHAPES = {
    "mixtral-8x7b": dict(T=16384, d=4096, h=14336, E=8, k=2),
    "qwen3-30b-a3b": dict(T=16384, d=2048, h=768, E=128, k=8),
}


def _group_sizes(N: int, E: int, routing: str) -> list[int]:
    if routing == "uniform":
        w = torch.ones(E, dtype=torch.float64)
    else:
        w = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
    sizes = torch.floor(w / w.sum() * N).long()
    sizes[0] += N - int(sizes.sum())
    return sizes.tolist()


def _backend(gemm: str, a, w, g) -> str:
    """Which moefast implementation the pass ran on (see moefast._C.grouped_mm_backend)."""
    if gemm == "fwd":
        return moefast._C.grouped_mm_backend(a, w)
    if gemm == "dgrad":
        return moefast._C.grouped_mm_backend(g, w.transpose(1, 2))
    return moefast._C.grouped_mm_backend(a, g, weight_grad=True)


def _torch_grouped():
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@pytest.mark.parametrize("routing", ["uniform", "zipf"])
@pytest.mark.parametrize("model", list(GEMM_SHAPES))
@pytest.mark.parametrize("gemm", ["fwd", "dgrad", "wgrad"])
def test_grouped_gemm_goals(benchmark, model, routing, gemm):
    s = GEMM_SHAPES[model]
    N, K, M, E = s["T"] * s["k"], s["d"], s["h"], s["E"]
    sizes = _group_sizes(N, E, routing)
    offs = torch.tensor(sizes, device="cuda").cumsum(0).to(torch.int32)
    starts = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    dt = torch.bfloat16
    a = torch.randn(N, K, device="cuda", dtype=dt)
    w = torch.randn(E, K, M, device="cuda", dtype=dt) * K**-0.5
    g = torch.randn(N, M, device="cuda", dtype=dt)
    flops = 2.0 * N * K * M
    tgm = _torch_grouped()
    if gemm == "fwd":
        ours = lambda: torch.ops.moefast.grouped_mm(a, w, offs)  # noqa: E731
        dense = lambda: torch.matmul(a, w[0])  # noqa: E731
        theirs = (lambda: tgm(a, w, offs=offs)) if tgm else None

        def loop():
            return [a[starts[e] : starts[e + 1]] @ w[e] for e in range(E)]
    elif gemm == "dgrad":
        wt = w.transpose(1, 2)
        ours = lambda: torch.ops.moefast.grouped_mm(g, wt, offs)  # noqa: E731
        dense = lambda: torch.matmul(g, wt[0])  # noqa: E731
        theirs = (lambda: tgm(g, wt, offs=offs)) if tgm else None

        def loop():
            return [g[starts[e] : starts[e + 1]] @ wt[e] for e in range(E)]
    else:
        ours = lambda: torch.ops.moefast.grouped_mm_weight_grad(a, g, offs)  # noqa: E731
        dense = lambda: torch.matmul(a.T, g)  # noqa: E731
        theirs = (lambda: tgm(a.T, g, offs=offs)) if tgm else None

        def loop():
            return [a[starts[e] : starts[e + 1]].T @ g[starts[e] : starts[e + 1]] for e in range(E)]

    ms = {"moefast": _event_median_ms(ours, reps=20), "dense": _event_median_ms(dense, reps=20)}
    ms["loop"] = _event_median_ms(loop, reps=10)
    why_not = None
    if theirs is not None:
        try:
            theirs()
            ms["torch_grouped_mm"] = _event_median_ms(theirs, reps=20)
        except RuntimeError as err:  # e.g. a layout or device torch's kernel does not take
            why_not = str(err).splitlines()[0]
    tflops = {k: flops / v / 1e9 for k, v in ms.items()}
    info = dict(
        model=model,
        routing=routing,
        gemm=gemm,
        N=N,
        K=K,
        M=M,
        E=E,
        median_ms=ms,
        tflops=tflops,
        fraction_of_dense=ms["dense"] / ms["moefast"],
        speedup_vs_loop=ms["loop"] / ms["moefast"],
        device=torch.cuda.get_device_name(),
        backend=_backend(gemm, a, w, g),
    )
    if "torch_grouped_mm" in ms:
        info["speedup_vs_torch_grouped_mm"] = ms["torch_grouped_mm"] / ms["moefast"]
    elif why_not:
        info["torch_grouped_mm_skipped"] = why_not
    _record(benchmark, ours, **info)
    line = (
        f"\n{model} {routing} {gemm} [{info['backend']}]: {tflops['moefast']:.0f} TFLOP/s = "
        f"{info['fraction_of_dense']:.2f} of dense cuBLAS, {info['speedup_vs_loop']:.2f}x the loop"
    )
    if "speedup_vs_torch_grouped_mm" in info:
        line += f", {info['speedup_vs_torch_grouped_mm']:.2f}x torch grouped_mm"
    print(line)
