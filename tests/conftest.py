"""Shared pytest set-up for the moefast tests.

- Every test runs with moefast's poisoned outputs switched on (``moefast._C.set_poison_outputs``):
  each kernel fills its outputs with NaN (INT32_MIN for int32 outputs) before writing them, so a
  test that compares a result with the reference proves that every element was written. Mark a
  test ``no_poison`` to run it with the switch off. The switch goes back to its previous state
  after each test.
- The ``gen`` fixture gives each test its own seeded generator (``MOEFAST_TEST_SEED`` shifts it).
- Tests marked ``cuda`` are skipped when no CUDA device is available.
"""

from __future__ import annotations

import os

import pytest
import torch

import moefast


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "no_poison: run with moefast's poisoned outputs switched off"
    )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def poison_outputs(request):
    """Turns poisoned kernel outputs on for the test (off for ``no_poison`` tests), then restores."""
    on = request.node.get_closest_marker("no_poison") is None
    previous = moefast._C.poison_outputs()
    moefast._C.set_poison_outputs(on)
    try:
        yield on
    finally:
        moefast._C.set_poison_outputs(previous)


@pytest.fixture
def gen(request):
    """A generator seeded from the test's name, so that every test gets its own fresh inputs.

    MOEFAST_TEST_SEED=<int> shifts every seed, to run the suite on other random inputs.
    """
    base = int(os.environ.get("MOEFAST_TEST_SEED", "0"))
    seed = (base + sum(ord(c) * (i + 1) for i, c in enumerate(request.node.nodeid))) % (2**31)
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def restore_threads():
    """Restores torch's intra-op thread count after a test that changes it."""
    n = torch.get_num_threads()
    yield n
    torch.set_num_threads(n)
