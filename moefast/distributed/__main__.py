"""Expert-parallel smoke test and training loop, to launch with torchrun (see docs/distributed.md).

    torchrun --standalone --nproc-per-node=2 -m moefast.distributed --experts 8

Each rank joins the default process group (nccl on CUDA machines, gloo otherwise), builds the
same single-process ``MoE`` (same seed), keeps its slice with ``ExpertParallelMoE.from_dense``,
checks the expert-parallel output on its own tokens against the single-process layer, then trains
the layer for a few steps to fit a fixed random teacher (``sync_gradients``, then Adam) and prints
the loss and the time per step from rank 0.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from moefast import distributed as ep_dist
from moefast.nn import MoE
from moefast.nn.expert_parallel import ExpertParallelMoE


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m moefast.distributed", description=__doc__)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--d-hidden", type=int, default=128)
    p.add_argument("--experts", type=int, default=8, help="global number of experts")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank and step")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--backend", default=None, help="default: nccl with CUDA, else gloo")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    backend = args.backend or ("nccl" if cuda else "gloo")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        torch.manual_seed(0)  # the same dense layer and teacher on every rank
        dense = MoE(args.d_model, args.d_hidden, args.experts, k=args.k, device=device)
        teacher = torch.nn.Linear(args.d_model, args.d_model, device=device)
        layer = ExpertParallelMoE.from_dense(dense)
        gen = torch.Generator(device).manual_seed(1000 + rank)  # each rank its own tokens

        x = torch.randn(args.tokens, args.d_model, device=device, generator=gen)
        with torch.no_grad():
            err = (layer(x) - dense(x)).abs().max()
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
        if rank == 0:
            print(
                f"{world} ranks ({backend}, {device.type}), {args.experts} experts, "
                f"{layer.num_local_experts} per rank; max |EP - single process| = "
                f"{err.item():.2e}"  # host-ok: printed check
            )

        opt = torch.optim.Adam(layer.parameters(), lr=args.lr)
        times = []
        for step in range(args.steps):
            x = torch.randn(args.tokens, args.d_model, device=device, generator=gen)
            with torch.no_grad():
                target = teacher(x)
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss = torch.nn.functional.mse_loss(layer(x), target) + 0.01 * layer.aux_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            ep_dist.sync_gradients(layer)  # router all-reduced; expert grads stay local
            opt.step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            loss = loss.detach()
            dist.all_reduce(loss)
            if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
                print(f"step {step:3d}  loss {loss.item() / world:.5f}")  # host-ok: log line
        if rank == 0 and times:
            steady = sorted(times[1:] or times)
            print(
                f"median step {steady[len(steady) // 2] * 1e3:.2f} ms ({args.tokens} tokens/rank)"
            )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
