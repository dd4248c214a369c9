"""The expert-parallel MoE layer (``ExpertParallelMoE``) against the single-process ``MoE``.

One step is the layer's forward and backward on a global batch of ``T`` tokens:

- ``moefast``: the single-process ``MoE`` holding all ``E`` experts on all ``T`` tokens, with
  torch's default threads (all cores);
- ``moefast_1thread``: the same with one thread, the compute one rank of ``ep_gloo_w2`` has;
- ``ep_gloo_w2``: ``ExpertParallelMoE`` on 2 processes of this machine (gloo, CPU, one thread
  each), ``T / 2`` tokens and ``E / 2`` experts per rank, with both all-to-all exchanges each way;
- ``ep_nccl_wN``: the same on the ``N >= 2`` GPUs of a CUDA machine (nccl), when there are at
  least two and moefast's ops run on CUDA; skipped otherwise.

The ranks are spawned once per variant and kept waiting on a pipe; the timed call tells every rank
to run one step and waits for all of them (a pipe round trip, some 0.1 ms, is included). Both
variants start from the same weights and tokens, and the check compares the summed loss.
"""

from __future__ import annotations

import datetime
import functools
import multiprocessing.connection
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_cases import MoeShape, group_name, rel_tol

from moefast.nn import MoE

SHAPE = MoeShape("ep", T=2048, d=256, h=512, E=8, k=2)
DTYPE = torch.float32
REPLY_TIMEOUT_S = 300  # start-up included; a hang fails the benchmark instead of blocking


def _dense_and_batch(shape: MoeShape, device="cpu"):
    torch.manual_seed(0)
    moe = MoE(shape.d, shape.h, shape.E, k=shape.k, dtype=DTYPE, device=device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape.T, shape.d, generator=gen, dtype=DTYPE).to(device)
    g = torch.randn(shape.T, shape.d, generator=gen, dtype=DTYPE).to(device)
    return moe, x, g


def _step(layer, x, g) -> float:
    out = layer(x)
    loss = (out * g).sum()
    loss.backward()
    layer.zero_grad(set_to_none=True)
    return loss.item()


def _worker(rank, world_size, init_file, backend, shape, conns):
    from moefast.nn.expert_parallel import ExpertParallelMoE

    conn = conns[rank]
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=REPLY_TIMEOUT_S),
    )
    try:
        dense, x, g = _dense_and_batch(shape, device)
        layer = ExpertParallelMoE.from_dense(dense)
        del dense
        x, g = x.chunk(world_size)[rank], g.chunk(world_size)[rank]
        conn.send("ready")
        while conn.recv() == "step":
            loss = _step(layer, x, g)
            if backend == "nccl":
                torch.cuda.synchronize()
            conn.send(loss)
    finally:
        dist.destroy_process_group()


class _Ranks:
    """``world_size`` spawned ranks that run one step each time :meth:`step` is called."""

    def __init__(self, world_size: int, backend: str, shape: MoeShape) -> None:
        self._dir = tempfile.TemporaryDirectory()
        pipes = [mp.Pipe() for _ in range(world_size)]
        self.conns = [parent for parent, _ in pipes]
        self.ctx = mp.start_processes(
            _worker,
            args=(
                world_size,
                os.path.join(self._dir.name, "store"),
                backend,
                shape,
                [child for _, child in pipes],
            ),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        self._replies()

    def _replies(self) -> list:
        ready = multiprocessing.connection.wait(self.conns, timeout=REPLY_TIMEOUT_S)
        out = []
        for c in self.conns:
            if c not in ready and not c.poll(REPLY_TIMEOUT_S):
                self.close()
                pytest.fail(f"an expert-parallel rank gave no reply in {REPLY_TIMEOUT_S} s")
            out.append(c.recv())
        return out

    def step(self) -> float:
        for c in self.conns:
            c.send("step")
        return sum(self._replies())

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send("stop")
            except (BrokenPipeError, OSError):
                pass
        for p in self.ctx.processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        self._dir.cleanup()


@functools.lru_cache(maxsize=1)
def _dense_loss() -> float:
    moe, x, g = _dense_and_batch(SHAPE)
    return _step(moe, x, g)


def _nccl_world() -> int | str:
    """The number of GPUs for the nccl variant, or why it cannot run."""
    if not (torch.cuda.is_available() and dist.is_nccl_available()):
        return "needs CUDA and nccl"
    if torch.cuda.device_count() < 2:
        return f"needs 2 GPUs, found {torch.cuda.device_count()}"
    try:
        import moefast

        moefast.route(torch.zeros(1, 2, device="cuda"), 1)
    except (NotImplementedError, RuntimeError) as exc:
        return f"moefast's ops do not run on CUDA here ({type(exc).__name__})"
    return torch.cuda.device_count()


@pytest.mark.parametrize("variant", ["moefast", "moefast_1thread", "ep_gloo_w2", "ep_nccl"])
def test_expert_parallel_moe_forward_backward(bench, variant):
    if variant == "ep_gloo_w2" and not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    world, backend = 1, None
    if variant == "ep_gloo_w2":
        world, backend = 2, "gloo"
    elif variant == "ep_nccl":
        world = _nccl_world()
        if isinstance(world, str):
            pytest.skip(world)
        backend = "nccl"
    want = _dense_loss()

    def check(got):
        assert abs(got - want) <= rel_tol(DTYPE) * max(1.0, abs(want)), (got, want)

    info = dict(op="expert_parallel_moe", phase="forward+backward", dtype="float32", **SHAPE.info)
    group = group_name("ep moe layer fwd+bwd", SHAPE.label, "float32")
    if backend is None:
        moe, x, g = _dense_and_batch(SHAPE)
        threads = 1 if variant == "moefast_1thread" else torch.get_num_threads()

        def target():
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                return _step(moe, x, g)
            finally:
                torch.set_num_threads(previous)

        bench(target, group=group, variant=variant, info=dict(info, threads=threads), check=check)
        return
    ranks = _Ranks(world, backend, SHAPE)
    try:
        bench(
            ranks.step,
            group=group,
            variant=f"ep_{backend}_w{world}",
            info=dict(info, backend=backend, world_size=world, threads_per_rank=1),
            check=check,
        )
    finally:
        ranks.close()
