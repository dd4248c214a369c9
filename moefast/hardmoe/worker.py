"""One expert-training worker; launched by ``torchrun`` (one process per rank) or run alone.

    torchrun --standalone --nproc-per-node 2 -m moefast.hardmoe.worker WORK_DIR [--threads 1]
    python -m moefast.hardmoe.worker WORK_DIR            # one process trains every expert

Each rank reads ``WORK_DIR/prep.pt``, trains the experts it owns (see
:func:`moefast.hardmoe.train.owned_experts`) that have no checkpoint yet and writes one checkpoint
per expert. Ranks exchange nothing while they train: the process group (gloo on CPU, nccl when
CUDA is available) is used only for a barrier at the end, so that rank 0 returns after everyone.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from .train import train_experts_worker


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m moefast.hardmoe.worker", description=__doc__)
    p.add_argument("work_dir")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: default)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--pause-after-expert", type=float, default=0.0, help="seconds to sleep after each expert"
    )
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dist = None
    if world > 1:
        import torch.distributed as dist

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    report = train_experts_worker(
        args.work_dir,
        rank,
        world,
        progress=not args.no_progress,
        pause_after_expert=args.pause_after_expert,
    )
    if dist is not None:
        dist.barrier()
        dist.destroy_process_group()
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main()
