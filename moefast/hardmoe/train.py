"""Training: the trunk, then each expert on its own cluster, independently.

Expert training is organised around a *work directory*:

- ``prep.pt`` (written by :func:`write_prep`): the training features, weak targets, each
  example's expert id, a train/validation split, the initial state of one expert (the trunk's
  upper layers), the frozen shared decoder and the hyper-parameters;
- ``experts/expert_NNNN.pt``: one checkpoint per finished expert, written atomically (a temporary
  file renamed into place), so a killed run leaves only whole checkpoints;
- ``times/rank_R.json``: what each worker trained and how long it took.

:func:`train_experts_worker` trains the experts that one rank owns and skips those whose
checkpoint exists, so re-running after a kill resumes without retraining finished experts. Ranks
never exchange gradients or parameters; under ``torchrun`` the only collective is a final barrier.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .model import GroupedExperts, TileFeatureBank, Trunk, feature_chunks, select_rows


def soft_target_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy against the target labels normalised to a distribution (as for hashtags)."""
    p = targets / targets.sum(1, keepdim=True).clamp(min=1)
    return -(p * F.log_softmax(logits, dim=1)).sum(1).mean()


def _bar(iterable, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, **kw)


def train_trunk(
    trunk: Trunk,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> Trunk:
    """Trains the whole trunk (convolutions, upper layers and head) on the weak targets."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(trunk.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(x.shape[0] / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    bar = _bar(range(epochs), desc="trunk", unit="epoch", disable=not progress)
    for _ in bar:
        trunk.train()
        perm = torch.randperm(x.shape[0], generator=gen)
        total = 0.0
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i : i + batch_size]
            loss = soft_target_loss(trunk(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * idx.numel()  # host-ok: training log
        bar.set_postfix(loss=f"{total / x.shape[0]:.3f}")
    trunk.eval()
    return trunk


@torch.no_grad()
def extract_features(trunk: Trunk, x: Tensor, batch_size: int = 512) -> Tensor:
    trunk.eval()
    return torch.cat([trunk.features(x[i : i + batch_size]) for i in range(0, x.shape[0], 512)])


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


# ----------------------------------------------------------------------------- one expert


def train_one_expert(
    expert: GroupedExperts,
    decoder: nn.Linear | None,
    x_tr: Tensor,
    y_tr: Tensor,
    x_va: Tensor,
    y_va: Tensor,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    max_steps: int | None = None,
    patience: int = 5,
    schedule: str = "constant",
) -> tuple[dict[str, Tensor], dict]:
    """Trains a 1-expert :class:`GroupedExperts` on its cluster's examples.

    The shared ``decoder`` (or ``None`` when the expert ends in its own decoder) is frozen: no
    gradient reaches it and it is not part of the returned state. Keeps the epoch with the lowest
    validation loss on the cluster's validation examples (the last epoch when there are none).

    Budget: ``epochs`` passes over the cluster (so ``E`` experts together cost what one expert
    costs on all the data), or, with ``max_steps``, up to that many optimizer steps, passing over
    the cluster as often as needed and stopping after ``patience`` passes without a better
    validation loss (every expert may train as long as one model on all the data would).

    ``x_tr`` and ``x_va`` are feature tensors or :class:`TileFeatureBank` s (rows made on
    demand). ``schedule``: ``"constant"`` learning rate, or ``"cosine"`` decay to zero over the
    whole budget (``max_steps``, else ``epochs`` passes).
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if decoder is not None:
        for p in decoder.parameters():
            p.requires_grad_(False)

    def run(x: Tensor) -> Tensor:
        offs = torch.tensor([x.shape[0]], dtype=torch.int32)
        h = expert(x, offs)
        return decoder(h) if decoder is not None else h

    def val_loss() -> float:
        total, start = 0.0, 0
        with torch.no_grad():
            for x in feature_chunks(x_va):
                y = y_va[start : start + x.shape[0]]
                total += soft_target_loss(run(x), y).item() * x.shape[0]  # host-ok: early stop
                start += x.shape[0]
        return total / start

    opt = torch.optim.AdamW(expert.parameters(), lr=lr, weight_decay=1e-4)
    n = x_tr.shape[0]
    sched = None
    if schedule == "cosine" and n > 0:
        total = step_budget(n, epochs=epochs, batch_size=batch_size, max_steps=max_steps)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
    best_state = {k: v.clone() for k, v in expert.state_dict().items()}
    best_loss = math.inf
    best_epoch = 0
    if x_va.shape[0] > 0:
        best_loss = val_loss()
    steps = 0
    epoch = 0
    while n > 0:
        epoch += 1
        if max_steps is None and epoch > epochs:
            break
        if max_steps is not None and (steps >= max_steps or epoch - best_epoch > patience):
            break
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            loss = soft_target_loss(run(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        if x_va.shape[0] > 0:
            va = val_loss()
        else:
            va = -float(epoch)  # no validation examples: keep the last epoch
        if va < best_loss:
            best_loss, best_epoch = va, epoch
            best_state = {k: v.clone() for k, v in expert.state_dict().items()}
    info = {
        "train_examples": n,
        "val_examples": int(x_va.shape[0]),
        "best_epoch": best_epoch,
        "epochs_run": epoch - 1,
        "steps": steps,
    }
    return best_state, info


# ----------------------------------------------------------------------------- work directory


def write_prep(
    work_dir: str | Path,
    *,
    features: Tensor,
    targets: Tensor,
    assignment: Tensor,
    num_experts: int,
    init_expert: GroupedExperts,
    decoder: nn.Linear | None,
    val_frac: float = 0.1,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    max_steps: int | None = None,
    patience: int = 5,
    schedule: str = "constant",
    data_file: str | Path | None = None,
) -> Path:
    """Writes ``prep.pt`` into ``work_dir`` (created), the input of every expert worker.

    With ``data_file``, a file that already holds ``{"features": ..., "targets": ...}`` equal to
    ``features`` and ``targets`` (e.g. the experiment's feature cache), ``prep.pt`` refers to it
    (by a path relative to ``work_dir``) instead of holding another copy of the training data:
    a sweep over many ``E`` then stores the features once. ``features`` may be a
    :class:`TileFeatureBank` (stored as its table and grid).
    """
    work = Path(work_dir)
    (work / "experts").mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed + 12345)
    is_val = torch.rand(features.shape[0], generator=gen) < val_frac
    if data_file is None:
        data = {"targets": targets.contiguous(), **features_state(features)}
    else:
        data = {"data_file": os.path.relpath(Path(data_file).resolve(), work.resolve())}
    prep = {
        **data,
        "assignment": assignment.long().contiguous(),
        "is_val": is_val,
        "num_experts": int(num_experts),
        "expert_dims": list(init_expert.dims),
        "init_expert": init_expert.state_dict(),
        "decoder": None if decoder is None else decoder.state_dict(),
        "config": {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "max_steps": max_steps,
            "patience": patience,
            "schedule": schedule,
        },
    }
    _atomic_save(prep, work / "prep.pt")
    return work


def features_state(features) -> dict[str, Tensor]:
    """How training features are stored: a tensor, or a bank's tile table and composite grid."""
    if isinstance(features, TileFeatureBank):
        return {"tile_table": features.table.contiguous(), "grid": features.grid.contiguous()}
    return {"features": features.contiguous()}


def features_from_state(data: dict):
    """The training features of :func:`features_state`'s dict (a tensor or a bank)."""
    if "tile_table" in data:
        return TileFeatureBank(data["tile_table"], data["grid"])
    return data["features"]


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def expert_path(work_dir: str | Path, e: int) -> Path:
    return Path(work_dir) / "experts" / f"expert_{e:04d}.pt"


def step_budget(n: int, *, epochs: int, batch_size: int, max_steps: int | None) -> int:
    """Optimizer steps budgeted for ``n`` training rows: ``max_steps`` under a step budget, else
    ``epochs`` passes of ``batch_size``; 0 without rows."""
    if n == 0:
        return 0
    return int(max_steps) if max_steps is not None else int(epochs) * math.ceil(n / int(batch_size))


def planned_steps(n_train: int, cfg: dict) -> int:
    """The optimizer steps an expert with ``n_train`` training rows is budgeted (what its training
    costs, early stopping aside), from a work directory's ``config``: :func:`step_budget`."""
    return step_budget(
        n_train, epochs=cfg["epochs"], batch_size=cfg["batch_size"], max_steps=cfg.get("max_steps")
    )


def owned_experts(costs: list[int], rank: int, world_size: int) -> list[int]:
    """The experts rank ``rank`` trains: the costliest first (``costs``, e.g. planned steps or
    cluster sizes), each to the least-loaded rank. Deterministic, so every rank computes the same
    split without talking to the others; equal costs spread the experts evenly by count."""
    load = [0] * world_size
    owner = {}
    for e in sorted(range(len(costs)), key=lambda e: (-costs[e], e)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[e] = r
        load[r] += max(costs[e], 1)
    return sorted(e for e, r in owner.items() if r == rank)


def load_prep(work_dir: str | Path) -> dict:
    """``prep.pt`` of ``work_dir``, with the training data loaded from its ``data_file`` (memory
    mapped, so that ranks on one machine share the pages) when it refers to one."""
    work = Path(work_dir)
    prep = torch.load(work / "prep.pt", weights_only=True)
    data = prep
    if "data_file" in prep:
        data = torch.load(work / prep["data_file"], weights_only=True, mmap=True)
    prep["features"], prep["targets"] = features_from_state(data), data["targets"]
    return prep


def _make_decoder(state: dict | None) -> nn.Linear | None:
    if state is None:
        return None
    out_f, in_f = state["weight"].shape
    dec = nn.Linear(in_f, out_f)
    dec.load_state_dict(state)
    dec.requires_grad_(False)
    return dec


def train_experts_worker(
    work_dir: str | Path,
    rank: int = 0,
    world_size: int = 1,
    *,
    progress: bool = True,
    pause_after_expert: float = 0.0,
) -> dict:
    """Trains this rank's experts that have no checkpoint yet; returns what it did."""
    work = Path(work_dir)
    prep = load_prep(work)
    cfg = prep["config"]
    E = prep["num_experts"]
    ids, is_val = prep["assignment"], prep["is_val"]
    n_train = torch.bincount(ids[~is_val], minlength=E).tolist()  # host-ok: the split below
    mine = owned_experts([planned_steps(n, cfg) for n in n_train], rank, world_size)
    decoder = _make_decoder(prep["decoder"])
    trained, skipped, info = [], [], {}
    t0 = time.perf_counter()
    bar = _bar(
        mine, desc=f"experts rank {rank}", unit="expert", position=rank, disable=not progress
    )
    for e in bar:
        path = expert_path(work, e)
        if path.exists():
            skipped.append(e)
            continue
        te = time.perf_counter()
        expert = GroupedExperts(1, prep["expert_dims"])
        expert.load_state_dict(prep["init_expert"])
        mask = ids == e
        tr, va = mask & ~is_val, mask & is_val
        state, inf = train_one_expert(
            expert,
            decoder,
            select_rows(prep["features"], tr),
            prep["targets"][tr],
            select_rows(prep["features"], va),
            prep["targets"][va],
            epochs=cfg["epochs"],
            batch_size=cfg["batch_size"],
            lr=cfg["lr"],
            seed=cfg["seed"] * 1000 + e,
            max_steps=cfg.get("max_steps"),
            patience=cfg.get("patience", 5),
            schedule=cfg.get("schedule", "constant"),
        )
        inf["seconds"] = time.perf_counter() - te
        _atomic_save({"expert": e, "state": state, "info": inf}, path)
        trained.append(e)
        info[e] = inf
        if pause_after_expert:
            time.sleep(pause_after_expert)
    report = {
        "rank": rank,
        "world_size": world_size,
        "owned": mine,
        "trained": trained,
        "skipped": skipped,
        "seconds": time.perf_counter() - t0,
        "threads": torch.get_num_threads(),
    }
    (work / "times").mkdir(exist_ok=True)
    (work / "times" / f"rank_{rank}.json").write_text(json.dumps(report))
    return report


def missing_experts(work_dir: str | Path) -> list[int]:
    prep = torch.load(Path(work_dir) / "prep.pt", weights_only=True)
    return [e for e in range(prep["num_experts"]) if not expert_path(work_dir, e).exists()]


def assemble_experts(work_dir: str | Path) -> GroupedExperts:
    """All experts' checkpoints stacked into one :class:`GroupedExperts`."""
    work = Path(work_dir)
    prep = torch.load(work / "prep.pt", weights_only=True)
    E = prep["num_experts"]
    experts = GroupedExperts(E, prep["expert_dims"])
    for e in range(E):
        path = expert_path(work, e)
        if not path.exists():
            raise FileNotFoundError(f"expert {e} has no checkpoint at {path}; train it first")
        experts.load_expert(e, torch.load(path, weights_only=True)["state"])
    return experts
