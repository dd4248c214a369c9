"""A small driver that runs every moefast CUDA kernel once, forward and backward, in every dtype,
on sizes that do not divide the block sizes: the program that compute-sanitizer (memcheck,
racecheck) watches in bench/gpu_check.sh. It checks results against the CPU path too, so that a
kernel that runs clean but computes garbage still fails.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python bench/sanitizer_driver.py
"""

from __future__ import annotations

import sys

import torch

import moefast


def _check(name, got, want, tol):
    err = (got.detach().cpu().double() - want.detach().double()).abs().max().item()  # host-ok
    if not err <= tol:
        raise AssertionError(f"{name}: max abs error {err} > {tol}")


def run(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    T, E, k, d = 67, 9, 3, 136  # d * 2 bytes is a multiple of 16: the vectorised path
    for d_model in (d, 33):  # and 33: the element-wise path
        logits = torch.randn(T, E, generator=gen).to(dtype)
        x = torch.randn(T, d_model, generator=gen).to(dtype)
        for mode, kk, norm in (
            ("softmax_topk", k, True),
            ("topk_softmax", k, False),
            ("hard", 1, False),
            ("dense", E, False),
        ):
            lc = logits.clone().requires_grad_()
            lg = logits.cuda().requires_grad_()
            xc = x.clone().requires_grad_()
            xg = x.cuda().requires_grad_()
            rc = moefast.route(lc, kk, mode=mode, normalize=norm)
            rg = moefast.route(lg, kk, mode=mode, normalize=norm)
            yc = moefast.unpermute(moefast.permute(xc, rc) * 2, rc)
            yg = moefast.unpermute(moefast.permute(xg, rg) * 2, rg)
            _check(f"pipeline {mode} {dtype} d={d_model}", yg, yc, tol * 4)
            yc.sum().backward()
            yg.sum().backward()
            _check(f"grad x {mode} {dtype}", xg.grad, xc.grad, tol * 4)
            if mode != "hard":
                _check(f"grad logits {mode} {dtype}", lg.grad, lc.grad, tol * 4)
        gate = torch.randn(T, 5, generator=gen).to(dtype)
        eo = torch.randn(5, T, d_model, generator=gen).to(dtype)
        gc, ec = gate.clone().requires_grad_(), eo.clone().requires_grad_()
        gg, eg = gate.cuda().requires_grad_(), eo.cuda().requires_grad_()
        oc, og = moefast.mixture(gc, ec), moefast.mixture(gg, eg)
        _check(f"mixture {dtype}", og, oc, tol)
        oc.square().sum().backward()
        og.square().sum().backward()
        _check(f"mixture grad {dtype}", eg.grad, ec.grad, tol * 4)
        h = (torch.randn(3, T, 2 * d_model + 2, generator=gen) * 3).to(dtype)
        hc, hg = h.clone().requires_grad_(), h.cuda().requires_grad_()
        oc, og = moefast.swiglu(hc), moefast.swiglu(hg)
        _check(f"swiglu {dtype}", og, oc, tol)
        oc.square().sum().backward()
        og.square().sum().backward()
        _check(f"swiglu grad {dtype}", hg.grad, hc.grad, tol * 4)
        grad = torch.randn(T * k, d_model, generator=gen).to(dtype)
        offs = torch.tensor([0, 50, 50, 120, 150], dtype=torch.int32)
        _check(
            f"grouped_bias_grad {dtype}",
            torch.ops.moefast.grouped_bias_grad(grad.cuda(), offs.cuda()),
            torch.ops.moefast.grouped_bias_grad(grad, offs),
            tol * 10,
        )
    # The grouped GEMM: aligned (tensor-core kernels for bf16 / fp16) and unaligned (CUDA cores)
    # shapes, with an empty group and an unused tail; forward, data and weight gradients, bias and
    # each fused activation.
    for K, M in ((64, 136), (33, 50)):
        offs = torch.tensor([40, 40, 170, 171, 190], dtype=torch.int32)
        a = torch.randn(201, K, generator=gen).to(dtype)
        b = (torch.randn(5, K, M, generator=gen) * K**-0.5).to(dtype)
        bias = torch.randn(5, M, generator=gen).to(dtype)
        ac, bc, biasc = (t.clone().requires_grad_() for t in (a, b, bias))
        ag, bg, biasg = (t.cuda().requires_grad_() for t in (a, b, bias))
        oc = moefast.grouped_mm(ac, bc, offs, biasc)
        og = moefast.grouped_mm(ag, bg, offs.cuda(), biasg)
        _check(f"grouped_mm {dtype} K={K}", og, oc, tol * 4)
        go = torch.randn(201, M, generator=gen).to(dtype)
        oc.backward(go)
        og.backward(go.cuda())
        _check(f"grouped_mm grad a {dtype} K={K}", ag.grad, ac.grad, tol * 4)
        _check(f"grouped_mm grad b {dtype} K={K}", bg.grad, bc.grad, tol * 10)
        _check(f"grouped_mm grad bias {dtype} K={K}", biasg.grad, biasc.grad, tol * 10)
        for act in ("relu", "gelu", "silu", "swiglu"):
            _check(
                f"grouped_mm_act {act} {dtype} K={K}",
                moefast.grouped_mm_act(a.cuda(), b.cuda(), offs.cuda(), bias.cuda(), act),
                moefast.grouped_mm_act(a, b, offs, bias, act),
                tol * 4,
            )
    torch.cuda.synchronize()


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitizer_driver: no CUDA device", file=sys.stderr)
        return 1
    moefast._C.set_poison_outputs(True)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        run(dtype)
        print(f"sanitizer_driver: {dtype} ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
