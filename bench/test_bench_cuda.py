"""CUDA benchmarks of the memory-bound kernels, each with its roofline beside it.

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
