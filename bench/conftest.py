"""pytest-benchmark set-up of the moefast CPU benchmarks: the timing loop and the ratio table.

- ``--bench-time SECONDS`` (default 0.4) is the time each benchmark aims to spend timing; the
  rounds and iterations follow from one untimed call (at least 3 rounds), so that the whole suite
  runs in a few minutes whatever the op costs.
- After a run, a table gives for each group the median time of ``moefast`` and the ratio of every
  other variant to it; with ``--benchmark-json`` the ratios are also written into each benchmark's
  ``extra_info`` and, per group, under the top-level key ``"moefast_ratios"``.
- With ``--benchmark-disable`` each benchmark body runs once (a smoke test) and nothing is printed.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_cases import VARIANTS_ORDER

MIN_ROUNDS = 3
MAX_ROUNDS = 50


def pytest_addoption(parser):
    parser.addoption(
        "--bench-time",
        type=float,
        default=0.4,
        help="moefast benches: seconds of timing per benchmark (default 0.4; at least 3 rounds).",
    )


@pytest.fixture
def bench(benchmark, request):
    """``bench(target, group=, variant=, info=, check=None, setup=None)`` times ``target``.

    ``target`` is called once untimed first (a warm-up) and its result passed to ``check``, then
    timed with ``benchmark.pedantic``; with benchmarks disabled it only runs once and is checked.
    ``setup``, if given, returns the positional arguments of ``target`` and runs untimed before
    every call. Returns the result of the first call.
    """
    seconds = request.config.getoption("--bench-time")

    def run(target, *, group, variant, info, check=None, setup=None):
        benchmark.group = group
        benchmark.extra_info.update(info, variant=variant)
        pedantic_setup = (lambda: (setup(), {})) if setup else None
        if benchmark.disabled:  # a smoke test: run the body once and check it
            result = benchmark.pedantic(target, setup=pedantic_setup)
            if check is not None:
                check(result)
            return result
        start = time.perf_counter()
        args = setup() if setup else ()
        mid = time.perf_counter()
        result = target(*args)
        end = time.perf_counter()
        if check is not None:
            check(result)
        call, total = max(end - mid, 1e-7), max(end - start, 1e-7)
        rounds = min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(seconds / total)))
        iterations = 1
        if setup is None and call * MAX_ROUNDS < seconds:
            iterations = max(1, int(seconds / (call * MAX_ROUNDS)))
        benchmark.pedantic(
            target,
            setup=pedantic_setup,
            rounds=rounds,
            iterations=iterations,
            warmup_rounds=1 if total * 10 < seconds else 0,
        )
        return result

    return run


# ----------------------------------------------------------------------------- ratios


def _medians(benchmarks) -> dict[str, dict[str, float]]:
    by_group: dict[str, dict[str, float]] = defaultdict(dict)
    for b in benchmarks:
        if b.has_error or not b.stats or "variant" not in b.extra_info:
            continue
        by_group[b.group][b.extra_info["variant"]] = b.stats.median
    return by_group


def _ratios(medians: dict[str, float]) -> dict[str, float]:
    """``"<variant> / moefast"`` for the baselines, ``"moefast / limit"`` for the roofline."""
    m = medians.get("moefast")
    if not m:
        return {}
    out = {}
    for v, t in medians.items():
        if v == "limit" and t > 0:
            out["moefast / limit"] = m / t
        elif v != "moefast":
            out[f"{v} / moefast"] = t / m
    return out


def pytest_benchmark_update_json(config, benchmarks, output_json):
    by_group = _medians(benchmarks)
    ratios = {g: _ratios(meds) for g, meds in by_group.items()}
    for b in output_json.get("benchmarks", []):
        variant = b.get("extra_info", {}).get("variant")
        r = ratios.get(b.get("group"), {})
        if variant == "limit" and "moefast / limit" in r:
            b["extra_info"]["moefast_over_limit"] = r["moefast / limit"]
        elif variant and variant != "moefast" and f"{variant} / moefast" in r:
            b["extra_info"]["ratio_to_moefast"] = r[f"{variant} / moefast"]
    output_json["moefast_device"] = _device()
    output_json["moefast_ratios"] = [
        {"group": g, "median_s": by_group[g], "ratios": ratios[g]} for g in by_group
    ]


def _device() -> str:
    """The machine the numbers come from: CPU model, torch threads, torch version."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    return (
        f"CPU {model}, {os.cpu_count()} logical cores, torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads"
    )


def _fmt_time(t: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if t >= scale:
            return f"{t / scale:.3g} {unit}"
    return f"{t / 1e-9:.3g} ns"


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or bs.disabled:
        return
    by_group = {g: m for g, m in _medians(bs.benchmarks).items() if "moefast" in m}
    if not by_group:
        return
    seen = {v for meds in by_group.values() for v in meds}
    others = sorted(seen - set(VARIANTS_ORDER))
    baselines = [
        v for v in (*VARIANTS_ORDER, *others) if v in seen and v not in ("moefast", "limit")
    ]
    columns = [f"{v} / moefast" for v in baselines]
    if "limit" in seen:
        columns.append("moefast / limit")
    width = max(len(g) for g in by_group)
    tr = terminalreporter
    tr.ensure_newline()
    tr.section("moefast ratios (median times)", sep="-", bold=True)
    tr.write_line(f"device: {_device()}")
    tr.write_line(
        "'X / moefast' > 1: moefast is that many times faster than X; "
        "'moefast / limit' near 1: moefast is at the dense-torch roofline."
    )
    cw = [max(len(c), 8) for c in columns]
    tr.write_line(
        f"{'group':<{width}}  {'moefast':>9}  "
        + "  ".join(f"{c:>{w}}" for c, w in zip(columns, cw, strict=True))
    )
    for g, meds in by_group.items():
        r = _ratios(meds)
        cells = []
        for c, w in zip(columns, cw, strict=True):
            if c in r:
                cells.append(f"{r[c]:>{w - 1}.2f}" + ("x" if c.endswith("/ moefast") else " "))
            else:
                cells.append(f"{'-':>{w}}")
        m = _fmt_time(meds["moefast"])
        tr.write_line(f"{g:<{width}}  {m:>9}  " + "  ".join(cells))
