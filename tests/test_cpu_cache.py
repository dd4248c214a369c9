"""The caching allocator behind moefast's large CPU outputs (csrc/cpu_cache.cpp)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from moefast_testing import randn

import moefast
from moefast import reference as ref

_C = moefast._C
MiB = 1 << 20


@pytest.fixture
def fresh_cache():
    stats = _C.cpu_cache_stats()
    _C.cpu_cache_empty()
    yield
    _C.cpu_cache_set_limit(stats["limit_bytes"])
    _C.cpu_cache_empty()


def test_large_outputs_are_reused_and_correct(fresh_cache, gen):
    """A freed large output goes back to the cache and the next output of its size reuses it;
    the reused memory is fully rewritten (poisoned first in tests), so results stay exact."""
    h = randn(1024, 2 * 512, gen=gen)  # swiglu output: 1024 x 512 float32 = 2 MiB
    first = moefast.swiglu(h)
    ptr = first.data_ptr()
    del first
    s0 = _C.cpu_cache_stats()
    assert s0["idle_bytes"] >= 2 * MiB
    h2 = randn(1024, 2 * 512, gen=gen)
    second = moefast.swiglu(h2)
    s1 = _C.cpu_cache_stats()
    assert s1["hits"] == s0["hits"] + 1 and second.data_ptr() == ptr
    torch.testing.assert_close(second, ref.swiglu(h2))
    # Storages from the cache stay resizable.
    second.resize_(2048, 1024)
    assert second.shape == (2048, 1024)


def test_small_outputs_bypass_the_cache(fresh_cache, gen):
    before = _C.cpu_cache_stats()
    out = moefast.swiglu(randn(8, 6, gen=gen))
    del out
    after = _C.cpu_cache_stats()
    assert (after["hits"], after["misses"], after["idle_bytes"]) == (
        before["hits"],
        before["misses"],
        before["idle_bytes"],
    )


def test_limit_caps_idle_bytes_and_zero_disables(fresh_cache, gen):
    h = randn(1024, 2 * 512, gen=gen)
    _C.cpu_cache_set_limit(3 * MiB)  # room for one 2 MiB block, not two
    a, b = moefast.swiglu(h), moefast.swiglu(h)
    del a, b
    assert _C.cpu_cache_stats()["idle_bytes"] == 2 * MiB
    _C.cpu_cache_set_limit(0)  # over the new cap: the idle block is freed
    assert _C.cpu_cache_stats()["idle_bytes"] == 0
    out = moefast.swiglu(h)
    del out
    assert _C.cpu_cache_stats()["idle_bytes"] == 0
    with pytest.raises(ValueError, match="bytes must be >= 0"):
        _C.cpu_cache_set_limit(-1)


def test_env_sets_the_limit_and_rejects_garbage():
    code = textwrap.dedent(
        """
        import moefast
        print(moefast._C.cpu_cache_stats()["limit_bytes"])
        """
    )
    run = lambda v: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code],
        env={**__import__("os").environ, "MOEFAST_CPU_CACHE_MB": v},
        capture_output=True,
        text=True,
    )
    ok = run("16")
    assert ok.returncode == 0 and ok.stdout.strip() == str(16 * MiB)
    bad = run("lots")
    assert bad.returncode != 0 and "MOEFAST_CPU_CACHE_MB must be a number" in bad.stderr


def test_concurrent_allocations_and_frees(fresh_cache, gen):
    """Python threads running ops at once share the cache (its free list is locked): every result
    stays right and the counters add up."""
    import threading

    inputs = [randn(600, 2 * 512, gen=gen) for _ in range(4)]
    wants = [ref.swiglu(h) for h in inputs]
    errors = []

    def work(i):
        try:
            for _ in range(20):
                out = moefast.swiglu(inputs[i])
                torch.testing.assert_close(out, wants[i])
        except Exception as exc:  # reported below, from the main thread
            errors.append(exc)

    before = _C.cpu_cache_stats()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = _C.cpu_cache_stats()
    assert not errors, errors
    calls = (after["hits"] - before["hits"]) + (after["misses"] - before["misses"])
    assert calls == 4 * 20  # 600 x 512 float32 = 1.17 MiB: every output went through the cache
    assert after["hits"] - before["hits"] >= 4 * 20 - 8
