"""The ``python -m moefast.bench`` command: cases, timing, the table, the JSON, the plot, --compare
and --profile. ``bench/README.md`` documents every option and figure."""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

import moefast

from . import baselines as bl
from .cases import (
    DTYPES,
    MODELS,
    QUICK_COMBOS,
    ROUTINGS,
    expert_ids,
    randn,
    shapes_for,
    zipf_probabilities,
)

SCHEMA = "moefast.bench/1"
OPS = (
    "route",
    "permute",
    "unpermute",
    "grouped_mm fwd",
    "grouped_mm dgrad",
    "grouped_mm wgrad",
    "mixture fwd",
    "moe layer fwd",
    "moe layer fwd+bwd",
)
# Table columns, in this order; "hf_*" baselines are compared with "hf_moefast" (same SwiGLU module).
BASELINES = (
    "loop",
    "torch_grouped_mm",
    "megablocks_gmm",
    "scattermoe",
    "hf_eager",
    "hf_grouped_mm",
)
NOT_IMPLEMENTED = ("no kernel", "not implemented", "notimplemented", "could not run")


# ----------------------------------------------------------------------------- timing


@dataclass
class Timing:
    times: list[float]

    def stats(self) -> dict:
        t = sorted(self.times)
        q = statistics.quantiles(t, n=4) if len(t) >= 2 else [t[0]] * 3
        return {
            "median_s": statistics.median(t),
            "q1_s": q[0],
            "q3_s": q[2],
            "min_s": t[0],
            "max_s": t[-1],
            "repeats": len(t),
        }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, budget: float, warmup: int) -> Timing:
    """Warm-up calls, then repeats until ``budget`` seconds (at least 3, at most 100): one
    ``perf_counter`` interval per call on the CPU, one pair of CUDA events per call on the GPU."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < 100):
        if device == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return Timing(times)


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large ``clone`` (read + write counted), the memory-bound limit."""
    n = (1 << 28) if device == "cuda" else (1 << 25)  # 1 GiB / 128 MiB of float32
    src = torch.ones(n, device=device)
    t = time_fn(lambda: src.clone(), device, budget=0.5, warmup=2).stats()["median_s"]
    return 2 * src.numel() * 4 / t


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One (op, shape, dtype, routing) with its variants: name -> a builder returning the timed
    callable (built lazily, so that large GPU inputs of one variant are freed before the next)."""

    op: str
    model: str
    shape: dict
    dtype: str
    routing: str | None
    flops: float | None = None
    bytes: float | None = None
    variants: dict[str, Callable[[], Callable[[], object]]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        label = " ".join(f"{k}{v}" for k, v in self.shape.items())
        parts = [self.op, f"{self.model} {label}", self.dtype] + (
            [self.routing] if self.routing else []
        )
        return " | ".join(parts)


def _grouped_gemm():
    try:
        import grouped_gemm  # MegaBlocks' grouped GEMM (CUDA, bfloat16)

        return grouped_gemm
    except Exception:
        return None


def _scattermoe():
    try:
        import scattermoe  # noqa: F401
        from scattermoe.parallel_experts import (
            ParallelExperts,
            flatten_and_sort,
            padded_block_indices,
        )

        return ParallelExperts, flatten_and_sort, padded_block_indices
    except Exception:
        return None


def _hf_experts_class():
    try:
        import transformers
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        import moefast.integrations.transformers as moefast_hf

        moefast_hf.register()
        return transformers, MixtralExperts
    except Exception:
        return None


@functools.lru_cache(maxsize=1)
def _weights(model: str, shape_key: tuple, dtype_name: str, device: str):
    """``w1 [E, d, h]`` and ``w2 [E, h, d]`` of one (model, dtype), kept while its cases run."""
    _T, d, h, E, _k = shape_key
    dtype = DTYPES[dtype_name]
    w1 = randn(E, d, h, dtype=dtype, scale=d**-0.5, seed=4, device=device)
    w2 = randn(E, h, d, dtype=dtype, scale=h**-0.5, seed=6, device=device)
    return w1, w2


def dispatch_cases(s, dtype_name: str, routing: str, device: str, ops: set[str]) -> list[Case]:
    """The op and layer cases of one (shape, dtype, routing)."""
    dtype = DTYPES[dtype_name]
    elt = torch.empty((), dtype=dtype).element_size()
    T, d, h, E, k = s.T, s.d, s.h, s.E, s.k
    ids = expert_ids(s, routing).to(device)
    weights = torch.softmax(randn(T, k, dtype=torch.float32, seed=1, device=device), -1).to(dtype)
    try:
        r = moefast.routing_from_ids(ids, E, weights)
    except Exception:  # no kernel on this device: plan on the CPU, then move
        r = moefast.routing_from_ids(ids.cpu(), E, weights.cpu())
        r = type(r)(*(t.to(device) for t in r))
    x = randn(T, d, dtype=dtype, seed=2, device=device)
    w1, w2 = _weights(s.name, (T, d, h, E, k), dtype_name, device)
    offs = r.offs
    try:
        a = moefast.permute(x, r)
    except Exception:
        a = bl.loop_permute(x, ids, E)
    g = randn(T * k, h, dtype=dtype, seed=5, device=device)
    common = dict(model=s.name, shape=s.info, dtype=dtype_name, routing=routing)
    gmm_flops = 2.0 * T * k * d * h
    cases = []

    def case(op, **kw):
        c = Case(op=op, **common, **kw)
        if op in ops:
            cases.append(c)
        return c

    # route: softmax + top-k + the routing plan (offsets, positions, order)
    bias = torch.zeros(E) if routing == "uniform" else zipf_probabilities(E).log()
    logits = (randn(T, E, dtype=torch.float32, seed=7) + bias).to(device=device, dtype=dtype)
    c = case("route", bytes=T * E * elt + T * k * (elt + 4) * 3)
    c.variants["moefast"] = lambda: lambda: moefast.route(logits, k)

    def loop_route():
        w, i = bl.loop_route(logits, k, "softmax_topk")
        return w, i, bl.loop_routing_plan(i, E)

    c.variants["loop"] = lambda: loop_route

    c = case("permute", bytes=2 * T * k * d * elt)
    c.variants["moefast"] = lambda: lambda: moefast.permute(x, r)
    c.variants["loop"] = lambda: lambda: bl.loop_permute(x, ids, E)

    y = randn(T * k, d, dtype=dtype, seed=3, device=device)
    c = case("unpermute", bytes=(T * k * d + T * d) * elt + T * k * (elt + 4))
    c.variants["moefast"] = lambda: lambda: moefast.unpermute(y, r)
    c.variants["loop"] = lambda: lambda: bl.loop_unpermute(y, ids, weights, E)

    # grouped_mm: forward, data gradient, weight gradient
    fwd = {
        "moefast": moefast.grouped_mm,
        "loop": bl.loop_grouped_mm,
        "torch_grouped_mm": bl.torch_grouped_mm,
    }
    tgm_why = bl.torch_grouped_mm_unavailable(dtype, device)
    c_f = case("grouped_mm fwd", flops=gmm_flops)
    c_d = case("grouped_mm dgrad", flops=gmm_flops)
    c_w = case("grouped_mm wgrad", flops=gmm_flops)
    for name, f in fwd.items():
        if name == "torch_grouped_mm" and tgm_why:
            for c in (c_f, c_d, c_w):
                c.skipped[name] = tgm_why
            continue
        c_f.variants[name] = functools.partial(lambda f: lambda: f(a, w1, offs), f)
        c_d.variants[name] = functools.partial(_backward_builder, f, a, w1, offs, g, 0)
        c_w.variants[name] = functools.partial(_backward_builder, f, a, w1, offs, g, 1)
    c_f.variants["limit"] = lambda: lambda: a @ w1[0]
    c_d.variants["limit"] = lambda: lambda: g @ w1[0].T
    c_w.variants["limit"] = lambda: lambda: a.T @ g
    gg = _grouped_gemm()
    if gg is None or device != "cuda":
        why = "not installed" if gg is None else "CUDA only"
        for c in (c_f, c_d, c_w):
            c.skipped["megablocks_gmm"] = f"MegaBlocks grouped_gemm: {why}"
    else:
        sizes = r.counts.to("cpu", torch.int64)

        def gmm(a_, b_, _offs):
            return gg.ops.gmm(a_, b_, sizes, trans_b=False)

        c_f.variants["megablocks_gmm"] = lambda: lambda: gmm(a, w1, None)
        c_d.variants["megablocks_gmm"] = functools.partial(
            _backward_builder, gmm, a, w1, offs, g, 0
        )
        c_w.variants["megablocks_gmm"] = functools.partial(
            _backward_builder, gmm, a, w1, offs, g, 1
        )
    sm = _scattermoe()
    if sm is None or device != "cuda":
        c_f.skipped["scattermoe"] = "ScatterMoE: " + (
            "not installed" if sm is None else "CUDA only"
        )
    else:
        c_f.variants["scattermoe"] = functools.partial(_scattermoe_builder, sm, x, ids, w1, k)

    # the whole layer (router + GELU experts), forward (no_grad) and forward + backward
    router_w = randn(d, E, dtype=torch.float32, scale=d**-0.5, seed=8, device=device)
    router_b = bias.to(device)
    layer = {
        "moefast": bl.moefast_moe,
        "loop": bl.loop_moe,
        "torch_grouped_mm": bl.torch_moe,
        "limit": bl.dense_moe_limit,
    }
    c_lf = case("moe layer fwd", flops=2 * gmm_flops)
    c_lb = case("moe layer fwd+bwd", flops=6 * gmm_flops)
    gy = randn(T, d, dtype=dtype, seed=9, device=device)
    for name, f in layer.items():
        if name == "torch_grouped_mm" and tgm_why:
            c_lf.skipped[name] = c_lb.skipped[name] = tgm_why
            continue
        c_lf.variants[name] = functools.partial(
            _layer_builder, f, x, router_w, router_b, w1, w2, k, None
        )
        c_lb.variants[name] = functools.partial(
            _layer_builder, f, x, router_w, router_b, w1, w2, k, gy
        )
    hf = _hf_experts_class() if ops & {c_lf.op, c_lb.op} else None
    for impl in ("eager", "grouped_mm", "moefast"):
        name = f"hf_{impl}"
        if hf is None:
            c_lf.skipped[name] = c_lb.skipped[name] = "transformers 5.x not installed"
            continue
        if impl == "grouped_mm" and tgm_why:
            c_lf.skipped[name] = c_lb.skipped[name] = tgm_why
            continue
        for c, grad in ((c_lf, None), (c_lb, gy)):
            c.variants[name] = functools.partial(
                _hf_builder, hf, impl, x, router_w, router_b, s, dtype, k, grad
            )
    return cases


def _backward_builder(f, a, b, offs, g, which: int):
    """Builds the graph of ``f(a, b, offs)`` once (untimed); the timed call is the gradient for
    ``a`` (which=0, the data gradient) or ``b`` (which=1, the weight gradient)."""
    a = a.detach().requires_grad_(which == 0)
    b = b.detach().requires_grad_(which == 1)
    out = f(a, b, offs)
    target = a if which == 0 else b
    return lambda: torch.autograd.grad(out, target, g, retain_graph=True)


def _layer_builder(f, x, router_w, router_b, w1, w2, k, grad):
    if grad is None:

        def fwd():
            with torch.no_grad():
                return f(x, router_w, router_b, w1, w2, k)

        return fwd
    xs, rw, w1s, w2s = (t.detach().requires_grad_() for t in (x, router_w, w1, w2))
    params = (xs, rw, w1s, w2s)

    def step():
        out = f(xs, rw, router_b, w1s, w2s, k)
        return torch.autograd.grad(out, params, grad, allow_unused=True)

    return step


def _hf_builder(hf, impl, x, router_w, router_b, s, dtype, k, grad):
    """transformers' Mixtral experts module (SwiGLU, weights ``[E, 2h, d]`` and ``[E, d, h]``)
    with ``experts_implementation`` = ``impl``, behind the same float32 softmax-top-k router."""
    transformers, experts_cls = hf
    cfg = transformers.MixtralConfig(
        hidden_size=s.d, intermediate_size=s.h, num_local_experts=s.E, num_experts_per_tok=k
    )
    cfg._experts_implementation = impl
    with torch.device("meta"):  # no float32 copy of the weights on the way to ``dtype``
        m = experts_cls(cfg).to(dtype)
    m = m.to_empty(device=x.device)
    with torch.no_grad():
        m.gate_up_proj.normal_(std=s.d**-0.5)
        m.down_proj.normal_(std=s.h**-0.5)

    def fwd(xs, rw):
        w, i = torch.softmax(xs.float() @ rw + router_b, dim=-1).topk(k, dim=-1)
        return m(xs, i, w.to(xs.dtype))

    if grad is None:

        def run():
            with torch.no_grad():
                return fwd(x, router_w)

        return run
    xs, rw = x.detach().requires_grad_(), router_w.detach().requires_grad_()
    params = (xs, rw, m.gate_up_proj, m.down_proj)
    return lambda: torch.autograd.grad(fwd(xs, rw), params, grad, allow_unused=True)


def _scattermoe_builder(sm, x, ids, w1, k):
    parallel_experts, flatten_and_sort, padded_block_indices = sm
    E, d, h = w1.shape
    pe = parallel_experts(E, d, h).to(device=x.device, dtype=x.dtype)
    with torch.no_grad():
        pe.weight.copy_(w1.transpose(1, 2))  # ScatterMoE keeps [E, out, in]
    sorted_ids, sorted_slots = flatten_and_sort(ids.long())
    blocks, expert_offs = padded_block_indices(sorted_ids, E)
    return lambda: pe(x, k, sorted_ids, sorted_slots, blocks, expert_offs, grouped_out=True)


def mixture_cases(m, dtype_name: str, device: str) -> list[Case]:
    dtype = DTYPES[dtype_name]
    elt = torch.empty((), dtype=dtype).element_size()
    gate = randn(m.B, m.E, dtype=dtype, seed=1, device=device)
    eo = randn(m.E, m.B, m.C, dtype=dtype, seed=2, device=device)
    c = Case(
        op="mixture fwd",
        model=m.name,
        shape=m.info,
        dtype=dtype_name,
        routing=None,
        bytes=(m.E * m.B * m.C + m.B * m.C + m.B * m.E) * elt,
    )
    c.variants["moefast"] = lambda: lambda: moefast.mixture(gate, eo)
    c.variants["loop"] = lambda: lambda: bl.loop_mixture(gate, eo)
    return [c]


def build_cases(args, device: str):
    """Yields the cases lazily, grouped by (model, dtype) so that one set of weights is alive."""
    shapes, mixture_shapes = shapes_for(device, args.quick)
    ops = set(args.ops)
    combos = [(dt, r) for dt in args.dtypes for r in args.routings]
    if args.quick and args.dtypes == list(DTYPES) and args.routings == list(ROUTINGS):
        combos = list(QUICK_COMBOS)  # neither chosen on the command line: two pairs, not four
    for model in args.models:
        for dtype_name, routing in combos:
            for c in dispatch_cases(shapes[model], dtype_name, routing, device, ops):
                if _selected(c, args):
                    yield c
    _weights.cache_clear()
    if "mixture fwd" in ops:
        for m in mixture_shapes.values():
            for dtype_name in args.dtypes:
                for c in mixture_cases(m, dtype_name, device):
                    if _selected(c, args):
                        yield c


def _selected(c: Case, args) -> bool:
    return not args.cases or any(s.lower() in c.name.lower() for s in args.cases)


# ----------------------------------------------------------------------------- running


def _is_not_implemented(exc: BaseException) -> bool:
    return isinstance(exc, NotImplementedError) or any(
        s in str(exc).lower() for s in NOT_IMPLEMENTED
    )


def run_case(c: Case, device: str, args, bandwidth: float, nvtx_mod) -> dict:
    results: dict[str, dict] = {}
    skipped = dict(c.skipped)
    for name, build in c.variants.items():
        rng = nvtx_mod.annotate(f"{c.name} / {name}") if nvtx_mod else nullcontext()
        try:
            with rng:
                fn = build()
                t = time_fn(fn, device, args.min_time, args.warmup)
            res = t.stats()
        except Exception as exc:
            if device == "cuda" and isinstance(exc, torch.cuda.OutOfMemoryError):
                skipped[name] = "out of GPU memory"
            elif _is_not_implemented(exc):
                skipped[name] = f"no {device} kernel: {type(exc).__name__}: {str(exc)[:120]}"
            else:
                skipped[name] = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
            res = None
        finally:
            fn = None
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        if res is None:
            continue
        med = res["median_s"]
        if c.flops and not name.startswith("hf_"):
            res["tflops"] = c.flops / med / 1e12
        elif c.flops:  # SwiGLU experts: 1.5x the GEMM FLOPs of the GELU layer
            res["tflops"] = 1.5 * c.flops / med / 1e12
        if c.bytes and name != "limit":
            res["gbps"] = c.bytes / med / 1e9
        results[name] = res
    if c.bytes and "limit" not in results:  # memory-bound: bytes over the measured copy bandwidth
        results["limit"] = {"median_s": c.bytes / bandwidth, "derived": "bytes / copy bandwidth"}
    return {
        "case": c.name,
        "op": c.op,
        "model": c.model,
        "shape": c.shape,
        "dtype": c.dtype,
        "routing": c.routing,
        "flops": c.flops,
        "bytes": c.bytes,
        "results": results,
        "skipped": skipped,
        "ratios": ratios(results),
    }


def ratios(results: dict) -> dict:
    """``"X / moefast"`` per baseline (``hf_*`` over ``hf_moefast``), ``"moefast / limit"``."""
    out = {}
    med = {v: r["median_s"] for v, r in results.items()}
    for v, t in med.items():
        ref = "hf_moefast" if v.startswith("hf_") else "moefast"
        if v in ("moefast", "hf_moefast", "limit") or ref not in med:
            continue
        out[f"{v} / {ref}"] = t / med[ref]
    if "moefast" in med and med.get("limit"):
        out["moefast / limit"] = med["moefast"] / med["limit"]
    return out


# ----------------------------------------------------------------------------- metadata


def device_info(device: str) -> dict:
    info = {"kind": device, "torch_threads": torch.get_num_threads(), "cpu_cores": os.cpu_count()}
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    info["cpu"] = model
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(
            name=p.name,
            capability=f"{p.major}.{p.minor}",
            multiprocessors=p.multi_processor_count,
            memory_gib=round(p.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    else:
        info["name"] = model
    return info


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    out["moefast"] = getattr(moefast, "__version__", None)
    for mod in ("transformers", "grouped_gemm", "scattermoe", "numpy", "matplotlib"):
        try:
            from importlib.metadata import version

            out[mod] = version(mod.replace("_", "-") if mod == "grouped_gemm" else mod)
        except Exception:
            pass
    return out


def git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or None
    except Exception:
        return None


# ----------------------------------------------------------------------------- output


def fmt_time(t: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if t >= scale:
            return f"{t / scale:.3g} {unit}"
    return f"{t / 1e-9:.3g} ns"


def print_table(records: list[dict], out=sys.stdout) -> None:
    present = {k for r in records for k in r["ratios"]}
    cols = [f"{b} / {'hf_moefast' if b.startswith('hf_') else 'moefast'}" for b in BASELINES]
    cols = [c for c in cols if c in present] + (
        ["moefast / limit"] if "moefast / limit" in present else []
    )
    width = max((len(r["case"]) for r in records), default=10)
    short = [c.replace(" / hf_moefast", "/hf_mf").replace(" / moefast", "/mf") for c in cols]
    short = [s.replace("moefast / limit", "mf/limit") for s in short]
    cw = [max(len(s), 7) for s in short]
    print(
        f"{'case':<{width}}  {'moefast':>9}  "
        + "  ".join(f"{s:>{w}}" for s, w in zip(short, cw, strict=True))
        + "  notes",
        file=out,
    )
    for r in records:
        m = r["results"].get("moefast")
        cells = []
        for c, w in zip(cols, cw, strict=True):
            v = r["ratios"].get(c)
            cells.append(f"{v:>{w - 1}.2f}x" if v is not None else f"{'-':>{w}}")
        notes = "; ".join(f"{k}: {v.split(':')[0]}" for k, v in r["skipped"].items())
        mt = fmt_time(m["median_s"]) if m else "skipped"
        print(f"{r['case']:<{width}}  {mt:>9}  " + "  ".join(cells) + f"  {notes}", file=out)


def plot(records: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [f"{b} / {'hf_moefast' if b.startswith('hf_') else 'moefast'}" for b in BASELINES]
    keys = [k for k in keys if any(k in r["ratios"] for r in records)] + ["moefast / limit"]
    n = len(records)
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.22 * n + 3), 12), sharex=True)
    xs = range(n)
    for key in keys[:-1]:
        pts = [(i, r["ratios"][key]) for i, r in enumerate(records) if key in r["ratios"]]
        if pts:
            axes[0].scatter(*zip(*pts, strict=True), label=key, s=18)
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("baseline time / moefast time\n(> 1: moefast faster)")
    axes[0].legend(fontsize=7, loc="best")
    axes[0].set_title(title, fontsize=9)
    pts = [
        (i, r["ratios"]["moefast / limit"])
        for i, r in enumerate(records)
        if r["ratios"].get("moefast / limit")
    ]
    if pts:
        axes[1].scatter(*zip(*pts, strict=True), color="black", s=18)
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("moefast time / limit\n(1: at the dense GEMM / copy limit)")
    axes[1].set_xticks(list(xs))
    axes[1].set_xticklabels([r["case"] for r in records], rotation=90, fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(path_a: str, path_b: str) -> int:
    with open(path_a) as f:
        a = json.load(f)
    with open(path_b) as f:
        b = json.load(f)
    old = {(r["case"], v): x["median_s"] for r in a["cases"] for v, x in r["results"].items()}
    print(f"A: {path_a} ({a['device'].get('name')}, {a.get('date')}, {a.get('commit')})")
    print(f"B: {path_b} ({b['device'].get('name')}, {b.get('date')}, {b.get('commit')})")
    print("B / A < 1: B is faster.")
    rows = []
    for r in b["cases"]:
        for v, x in r["results"].items():
            if (r["case"], v) in old:
                rows.append((r["case"], v, old[(r["case"], v)], x["median_s"]))
    width = max((len(c) for c, *_ in rows), default=4)
    print(f"{'case':<{width}}  {'variant':<18} {'A':>9}  {'B':>9}  {'B / A':>6}")
    for case, v, ta, tb in rows:
        print(f"{case:<{width}}  {v:<18} {fmt_time(ta):>9}  {fmt_time(tb):>9}  {tb / ta:>6.2f}")
    if not rows:
        print("no (case, variant) in both files")
    return 0


def profile(args, device: str) -> int:
    """Runs one case's variant under torch.profiler; prints the op table, optionally a trace."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    for c in build_cases(args, device):
        if args.profile_variant not in c.variants:
            continue
        fn = c.variants[args.profile_variant]()
        for _ in range(max(1, args.warmup)):
            fn()
        _sync(device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with tprofile(activities=acts, record_shapes=True) as prof:
            for _ in range(5):
                fn()
            _sync(device)
        print(f"profile of {c.name} / {args.profile_variant} (5 calls on {device})")
        sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.profile_rows))
        if args.trace:
            prof.export_chrome_trace(args.trace)
            print(f"chrome trace: {args.trace}")
        return 0
    print(f"no case matches --cases {args.cases} with a {args.profile_variant!r} variant")
    return 1


# ----------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m moefast.bench",
        description="moefast's ops and MoE layer side by side with the per-expert loop, torch's "
        "grouped GEMM, transformers' experts and other MoE libraries (see bench/README.md).",
    )
    p.add_argument("--quick", action="store_true", help="small shapes (the CPU set)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS, metavar="OP")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--routings", nargs="+", default=list(ROUTINGS), choices=ROUTINGS)
    p.add_argument("--cases", nargs="+", default=[], help="keep cases whose name has any of these")
    p.add_argument("--min-time", type=float, default=None, help="seconds timed per variant")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", default=None, help="JSON file (the PNG plot goes beside it)")
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    p.add_argument("--nvtx", action="store_true", help="an NVTX range around every variant")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"))
    p.add_argument("--profile", action="store_true", help="torch.profiler on the first case")
    p.add_argument("--profile-variant", default="moefast")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--trace", default=None, help="with --profile: chrome trace JSON to write")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.min_time is None:
        args.min_time = 0.25 if device == "cuda" else (0.05 if args.quick else 0.3)
    if args.warmup is None:
        args.warmup = 3 if device == "cuda" else 1
    if args.profile:
        return profile(args, device)
    nvtx_mod = None
    if args.nvtx:
        try:
            import nvtx as nvtx_mod
        except ImportError:
            print("--nvtx: the nvtx package is not installed; no ranges", file=sys.stderr)

    started = time.perf_counter()
    load_start = os.getloadavg()
    bandwidth = copy_bandwidth(device)
    info = device_info(device)
    print(
        f"moefast.bench on {info['name']} ({device}, {info['cpu_cores']} cores, "
        f"{info['torch_threads']} torch threads), load {load_start[0]:.1f}; "
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s",
        file=sys.stderr,
    )
    records = []
    for i, c in enumerate(build_cases(args, device), 1):
        t0 = time.perf_counter()
        rec = run_case(c, device, args, bandwidth, nvtx_mod)
        records.append(rec)
        m = rec["results"].get("moefast")
        print(
            f"[{i}] {c.name}: moefast {fmt_time(m['median_s']) if m else 'skipped'} "
            f"({time.perf_counter() - t0:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    elapsed = time.perf_counter() - started
    print()
    print(
        "'X/mf' = median(X) / median(moefast): > 1, moefast is that many times faster; "
        "'hf_*/hf_mf' against transformers' experts on moefast; 'mf/limit' = median(moefast) / "
        "dense GEMM (same FLOPs) or bytes / copy bandwidth."
    )
    print_table(records)
    doc = {
        "schema": SCHEMA,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": "python -m moefast.bench "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": info,
        "versions": versions(),
        "settings": {
            "quick": args.quick,
            "min_time_s": args.min_time,
            "warmup": args.warmup,
            "timer": "cuda events" if device == "cuda" else "time.perf_counter",
        },
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "copy_bandwidth_gbps": bandwidth / 1e9,
        "elapsed_s": elapsed,
        "cases": records,
    }
    print(f"\n{len(records)} cases in {elapsed:.0f} s", file=sys.stderr)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
        png = args.plot or os.path.splitext(args.out)[0] + ".png"
        title = f"moefast.bench, {info['name']} ({device}), {doc['date']}"
        plot(records, png, title)
        print(f"wrote {args.out} and {png}", file=sys.stderr)
    elif args.plot:
        plot(records, args.plot, f"moefast.bench, {info['name']} ({device})")
    return 0


__all__ = ["BASELINES", "OPS", "compare", "main", "ratios"]
