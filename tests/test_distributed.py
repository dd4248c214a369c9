"""Expert parallelism (moefast.distributed, ExpertParallelMoE) on gloo with 2 and 4 processes.

Each multi-process test spawns its ranks (``torch.multiprocessing``, start method ``spawn``), which
rendezvous through a ``FileStore`` in the test's temporary directory (no port to pick). Every rank
builds the same single-process ``MoE`` holding all experts (same seed), takes its slice with
``ExpertParallelMoE.from_dense`` and checks, in float64 (one case in float32), against that layer:

- outputs, ``aux_loss`` and input gradients: the EP layer on rank ``r``'s tokens equals the
  single-process layer on the same tokens;
- expert weight gradients: rank ``r``'s local gradient (the sum over every rank's tokens) equals
  rows ``r * E / W : (r + 1) * E / W`` of the single-process layer's gradient of the summed loss
  of all ranks' batches;
- router gradients: after ``sync_gradients(average=False)`` (an all-reduce sum) they equal the
  single-process router gradient of that summed loss; with ``average=True`` every gradient is that
  of the mean of the ranks' losses, i.e. the single-process gradients divided by ``W``.

Routings include uneven load (one rank's experts take most rows), a rank whose experts receive no
rows at all, a rank with no tokens, a capacity factor, every router mode, a process subgroup and
the point-to-point fallback of all_to_all_single.
Processes use one thread, ``init_process_group`` has a 60 s timeout and the parent joins with a
deadline, so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moefast
from moefast import distributed as ep_dist
from moefast.nn import MoE
from moefast.nn.expert_parallel import ExpertParallelMoE

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)

JOIN_TIMEOUT_S = 150  # per spawned group; a normal run takes a few seconds plus start-up
D_MODEL, D_HIDDEN = 6, 10

# Cases: name -> options. ``tokens``: tokens per rank of the group (its length is the group
# size). ``skew``: None, "uneven" (the experts of group rank 0 get most rows) or "starve" (uneven,
# and the experts of the last rank get no rows at all).
CASES_2 = {
    "uneven_gelu": dict(E=4, k=2, tokens=[13, 4], skew="uneven", bias=True),
    "starve_swiglu": dict(E=8, k=2, tokens=[9, 11], skew="starve", activation="swiglu"),
    "hard_relu_avg": dict(E=4, k=1, router="hard", activation="relu", tokens=[7, 10], avg=True),
    "dense_silu": dict(E=2, k=2, router="dense", activation="silu", tokens=[5, 8], z_loss=0.1),
    "capacity": dict(E=4, k=2, tokens=[16, 6], skew="uneven", capacity=0.75),
    "float32": dict(E=4, k=2, tokens=[12, 12], dtype=torch.float32, count_collectives=True),
    # The fallback for backends without all_to_all_single: point-to-point sends.
    "p2p_fallback": dict(E=4, k=2, tokens=[3, 14], skew="starve", p2p=True),
}
CASES_4 = {
    "starve_topk_softmax": dict(
        E=8, k=3, router="topk_softmax", tokens=[10, 3, 14, 6], skew="starve", bias=True
    ),
    "uneven_normalize_empty_rank": dict(
        E=8, k=2, normalize=True, tokens=[11, 0, 9, 5], skew="uneven", avg=True
    ),
    "swiglu_capacity": dict(E=12, k=2, activation="swiglu", tokens=[8, 8, 3, 12], capacity=1.0),
}
CASES_4_SUBGROUPS = {  # ranks {0, 1} and {2, 3} each run these in their own group of 2
    "subgroup_starve": dict(E=4, k=1, router="softmax_topk", tokens=[9, 6], skew="starve"),
    "subgroup_p2p_fallback": dict(E=4, k=2, tokens=[5, 12], skew="uneven", p2p=True, avg=True),
}


# ----------------------------------------------------------------------------- spawning


def _spawn(world_size: int, tmp_path, cases: dict, subgroup_cases: dict | None = None) -> None:
    init_file = str(tmp_path / "store")
    ctx = mp.start_processes(
        _worker,
        args=(world_size, init_file, cases, subgroup_cases or {}),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"expert-parallel ranks still running after {JOIN_TIMEOUT_S} s (hang?)")


def _worker(rank: int, world_size: int, init_file: str, cases: dict, subgroup_cases: dict):
    torch.set_num_threads(1)
    moefast._C.set_poison_outputs(True)  # every kernel output element must be written
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        for name, case in cases.items():
            _run_case(name, case, group=None)
        if subgroup_cases:
            groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank makes both
            for name, case in subgroup_cases.items():
                _run_case(name, case, group=groups[rank // 2])
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- one case


def _seed(name: str) -> int:
    return sum(ord(c) * (i + 1) for i, c in enumerate(name)) % (2**31)


def _assert_close(actual, expected, what: str, dtype: torch.dtype) -> None:
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _run_case(name: str, case: dict, group) -> None:
    W, r = dist.get_world_size(group), dist.get_rank(group)
    tokens = case["tokens"]
    assert len(tokens) == W
    E, k = case["E"], case["k"]
    dtype = case.get("dtype", torch.float64)
    skew = case.get("skew")
    torch.manual_seed(_seed(name))
    full = MoE(
        D_MODEL,
        D_HIDDEN,
        E,
        k=k,
        router=case.get("router", "softmax_topk"),
        normalize=case.get("normalize", False),
        activation=case.get("activation", "gelu"),
        bias=case.get("bias", True),
        z_loss_coef=case.get("z_loss", 0.0),
        capacity_factor=case.get("capacity"),
        dtype=dtype,
    )
    xs = [torch.randn(t, D_MODEL, dtype=dtype) for t in tokens]
    gs = [torch.randn(t, D_MODEL, dtype=dtype) for t in tokens]
    n_local = E // W
    if skew:
        # Feature 0 is the constant 1 and its router column a per-expert bias.
        boost = torch.zeros(E, dtype=dtype)
        boost[:n_local] = 3.0
        if skew == "starve":
            boost[E - n_local :] = -40.0
        with torch.no_grad():
            full.router.weight[:, 0] = boost
        for x in xs:
            x[:, 0] = 1.0

    # The single-process layer, one call per rank's batch, one backward of the summed loss.
    ref_x = [x.clone().requires_grad_() for x in xs]
    ref_out, ref_aux, loss = [], [], 0.0
    for x, g in zip(ref_x, gs, strict=True):
        out = full(x)
        ref_out.append(out.detach())
        ref_aux.append(full.aux_loss.detach())
        loss = loss + (out * g).sum() + 0.5 * full.aux_loss
    loss.backward()
    ref_grads = {n: p.grad for n, p in full.named_parameters()}

    # The expert-parallel layer on this rank's batch.
    layer = ExpertParallelMoE.from_dense(full, process_group=group)
    assert list(layer.state_dict()) == list(full.state_dict())
    assert layer.num_local_experts == n_local and layer.w1.weight.shape[0] == n_local
    x = xs[r].clone().requires_grad_()
    if case.get("p2p"):
        ep_dist._NO_A2A_SINGLE.add(str(dist.get_backend(group)))
    calls = []
    if case.get("count_collectives"):
        original = dist.all_to_all_single

        def counting(out, inp, *args, **kwargs):
            calls.append(inp.dtype)
            return original(out, inp, *args, **kwargs)

        dist.all_to_all_single = counting
    try:
        out = layer(x)
        n_forward = len(calls)
        ((out * gs[r]).sum() + 0.5 * layer.aux_loss).backward()
    finally:
        ep_dist._NO_A2A_SINGLE.clear()
        if case.get("count_collectives"):
            dist.all_to_all_single = original
    if case.get("count_collectives"):
        # Forward: the counts, the rows there, the rows back; backward: the reverse row exchanges.
        assert n_forward == 3 and calls[0] == torch.int64, calls
        assert len(calls) == 5 and calls[1:] == [dtype] * 4, calls

    what = f"{name} (rank {r} of {W})"
    _assert_close(out, ref_out[r], f"{what} output", dtype)
    _assert_close(layer.aux_loss, ref_aux[r], f"{what} aux_loss", dtype)
    _assert_close(x.grad, ref_x[r].grad, f"{what} input gradient", dtype)

    # The premise of the skewed cases: who received how many rows (global counts summed).
    counts = layer.last_routing.counts.to(torch.int64)
    dist.all_reduce(counts, group=group)
    per_rank = counts.view(W, n_local).sum(1)
    if skew:
        assert per_rank[0] > per_rank.sum() / 2, per_rank
    if skew == "starve":
        assert per_rank[-1] == 0, per_rank

    average = case.get("avg", False)
    ep_dist.sync_gradients(layer, group=group, average=average)
    scale = 1.0 / W if average else 1.0
    lo, hi = r * n_local, (r + 1) * n_local
    for pname, p in layer.named_parameters():
        want = ref_grads[pname]
        if pname.startswith(("w1.", "w2.")):
            want = want[lo:hi]
        _assert_close(p.grad, want * scale, f"{what} gradient of {pname}", dtype)

    # Gathering the experts back gives the single-process state dict, also inside a model, and
    # loading that dense state dict gives back this rank's slice.
    dense = layer.dense_state_dict()
    for key, value in full.state_dict().items():
        assert torch.equal(dense[key], value), key
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), layer)
    dense = ep_dist.dense_state_dict(model)
    assert list(dense) == ["0.weight", "0.bias"] + [f"1.{key}" for key in full.state_dict()]
    assert all(torch.equal(dense[f"1.{key}"], v) for key, v in full.state_dict().items())
    fresh = torch.nn.Sequential(torch.nn.Linear(2, 2), ExpertParallelMoE.from_dense(full, group))
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    ep_dist.load_dense_state_dict(fresh, dense)
    for (key, got), want in zip(
        fresh.state_dict().items(), model.state_dict().values(), strict=True
    ):
        assert torch.equal(got, want), key


# ----------------------------------------------------------------------------- tests


def test_expert_parallel_2_processes(tmp_path):
    _spawn(2, tmp_path, CASES_2)


def test_expert_parallel_4_processes_and_subgroups(tmp_path):
    _spawn(4, tmp_path, CASES_4, CASES_4_SUBGROUPS)


def test_needs_an_initialized_process_group():
    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoE(D_MODEL, D_HIDDEN, 4, k=2)


def test_bad_arguments_are_checked_before_the_process_group():
    with pytest.raises(ValueError, match="router"):
        ExpertParallelMoE(D_MODEL, D_HIDDEN, 4, k=2, router="nope")


def test_shard_range():
    assert ep_dist.shard_range(8, 4, 0) == (0, 2)
    assert ep_dist.shard_range(8, 4, 3) == (6, 8)
    with pytest.raises(ValueError, match="divisible"):
        ep_dist.shard_range(6, 4, 0)
    with pytest.raises(ValueError, match="rank"):
        ep_dist.shard_range(8, 4, 4)


if __name__ == "__main__":  # a quick manual run: python tests/test_distributed.py
    import pathlib
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        _spawn(int(os.environ.get("WORLD_SIZE", "2")), pathlib.Path(d), CASES_2)
