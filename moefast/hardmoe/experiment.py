"""The end-to-end experiment behind ``python -m moefast.hardmoe``.

1. Build the multilabel task (:mod:`moefast.hardmoe.data`) and train the CNN trunk on it; the
   trunk with its own head is the baseline.
2. Cache the trunk's features. For each number of experts ``E`` (and seed): fit the gater on the
   training features, write the work directory, train every expert on its cluster only (in this
   process or with ``torchrun``, one process per worker), stack the checkpoints into a
   :class:`~moefast.hardmoe.model.HardMoE` and score the held-out set. ``E = 1`` is the single
   expert of the same per-example cost: the trunk's upper layers fine-tuned on all the data with
   the same recipe.
3. Ablations at one ``E``: hash instead of k-means, balanced k-means, per-expert decoders.
4. Optionally the timing of expert training on 1 worker and on ``N`` workers.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from .data import build_task, composite_specs, make_composites
from .metrics import evaluate
from .model import ClusterGater, GroupedExperts, HardMoE, TileFeatureBank, Trunk
from .train import (
    assemble_experts,
    expert_path,
    extract_features,
    features_from_state,
    features_state,
    load_prep,
    missing_experts,
    predict,
    soft_target_loss,
    train_experts_worker,
    train_trunk,
    write_prep,
)

METRICS = ("precision_at_1", "precision_at_k", "mAP")
SUMMARY = (
    *METRICS,
    *(f"val_{m}" for m in METRICS),
    "fit_train_loss",
    "fit_heldout_loss",
    "infer_us_per_example",
    "expert_train_seconds",
)


def state_digest(module: nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names, shapes and bytes)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().contiguous().cpu().numpy().tobytes())  # host-ok: cache key, once
    return h.hexdigest()


def _log(msg: str) -> None:
    print(f"[hardmoe] {msg}", file=sys.stderr, flush=True)


def launch_workers(work: Path, workers: int, threads: int, progress: bool) -> float:
    """Trains the missing experts of ``work`` with ``torchrun --nproc-per-node workers``;
    returns the wall-clock seconds of the whole launch."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={workers}",
        "-m",
        "moefast.hardmoe.worker",
        str(work),
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    if not progress:
        cmd.append("--no-progress")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads or 1))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


class Experiment:
    def __init__(self, args) -> None:
        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.progress = not args.no_progress
        self.cache: dict[str, dict] = {}

    # ------------------------------------------------------------------ trunk and features

    def setup(self) -> dict:
        a = self.args
        torch.manual_seed(a.seed)
        t0 = time.perf_counter()
        self.train, self.test, base = build_task(
            a.source, a.n_train, a.n_test, label_drop=a.label_drop, seed=a.seed
        )
        self.num_labels = self.train.y.shape[1]
        self.data_info = {
            "source": base.name,
            "classes": list(base.class_names),
            "train_composites": int(self.train.y.shape[0]),
            "test_composites": int(self.test.y.shape[0]),
            "image_size": list(self.train.x.shape[1:]),
            "tiles_per_image": [2, 4],
            "label_drop_train": a.label_drop,
            "mean_labels_test": float(self.test.y_clean.sum(1).mean()),
        }
        _log(f"data: {self.data_info}")
        trunk = Trunk(
            self.num_labels,
            width=a.width,
            hidden=a.hidden,
            embed=a.embed,
            tiles=a.trunk == "tiles",
        )
        path = self.work / "trunk.pt"
        if a.resume and path.exists():
            trunk.load_state_dict(torch.load(path, weights_only=True))
            _log(f"trunk loaded from {path}")
        else:
            train_trunk(
                trunk,
                self.train.x,
                self.train.y,
                epochs=a.trunk_epochs,
                lr=a.trunk_lr,
                seed=a.seed,
                progress=self.progress,
            )
            torch.save(trunk.state_dict(), path)
        self.trunk = trunk.eval()
        self.trunk_seconds = time.perf_counter() - t0
        self.load_or_extract_features(base)
        self.data_info["expert_train_composites"] = int(self.f_tr.shape[0])
        self.data_info["val_composites"] = int(self.f_va.shape[0])
        scores = predict(trunk, self.test.x)
        baseline = evaluate(scores, self.test.y_clean, a.k)
        baseline.update(self.evaluate_val(nn.Sequential(trunk.upper, trunk.head)))
        baseline["expert_macs_per_example"] = GroupedExperts.macs_per_example(trunk.dims)
        _log(f"baseline (trunk + own head): {baseline}")
        return baseline

    def load_or_extract_features(self, base) -> None:
        """Trunk features of the training composites (plus ``n_expert_train - n_train`` fresh
        ones for the gater and the experts), of the validation and of the test composites.

        They are cached in ``WORK/features.pt`` together with a key (data settings and a digest
        of the trunk's weights) and reused when the key matches, so a resumed run or a timing run
        on the same trunk does not recompute them. Every work directory of the sweep refers to
        this one file for its training data (see :func:`write_prep`).
        """
        a = self.args
        key = {
            "source": base.name,
            "seed": a.seed,
            "label_drop": a.label_drop,
            "n_train": a.n_train,
            "n_expert_train": max(a.n_expert_train, a.n_train),
            "n_val": a.n_val,
            "n_test": a.n_test,
            "trunk_kind": a.trunk,
            "trunk": state_digest(self.trunk),
        }
        self.features_path = self.work / "features.pt"
        if self.features_path.exists():
            cached = torch.load(self.features_path, weights_only=True, mmap=True)
            if cached.get("key") == key:
                _log(f"features loaded from {self.features_path}")
                self.f_tr, self.y_tr = features_from_state(cached), cached["targets"]
                self.f_va, self.y_va = cached["val_features"], cached["val_targets"]
                self.f_te = cached["test_features"]
                return
        trunk = self.trunk
        L = self.num_labels
        t0 = time.perf_counter()
        if a.trunk == "tiles":
            self.f_tr, self.y_tr = self._training_bank(base)
        else:
            self.f_tr, self.y_tr = self._training_features(base)
        # Validation composites: fresh ones tiled from the training base images, scored against
        # their clean labels; for choosing settings (the test composites are for reporting).
        if a.n_val > 0:
            val = make_composites(
                base.x_train, base.y_train, a.n_val, L, label_drop=a.label_drop, seed=a.seed + 500
            )
            self.f_va, self.y_va = extract_features(trunk, val.x), val.y_clean
        else:
            self.f_va = torch.zeros(0, self.f_tr.shape[1])
            self.y_va = self.y_tr[:0].clone()
        self.f_te = extract_features(trunk, self.test.x)
        _log(f"features of {self.f_tr.shape[0]} composites in {time.perf_counter() - t0:.0f} s")
        cache = {
            "key": key,
            **features_state(self.f_tr),
            "targets": self.y_tr,
            "val_features": self.f_va,
            "val_targets": self.y_va,
            "test_features": self.f_te,
        }
        tmp = self.features_path.with_name(f".features.{os.getpid()}.tmp")
        torch.save(cache, tmp)
        os.replace(tmp, self.features_path)

    def _training_features(self, base) -> tuple[Tensor, Tensor]:
        """Trunk features of the trunk's training composites plus ``n_expert_train - n_train``
        fresh weakly labelled ones, tiled from the training base images (the trunk never saw
        them) and run through the trunk in chunks."""
        a, L = self.args, self.num_labels
        feats, ys = [extract_features(self.trunk, self.train.x)], [self.train.y]
        extra = a.n_expert_train - a.n_train
        for j, start in enumerate(range(0, max(extra, 0), 10000)):
            more = make_composites(
                base.x_train,
                base.y_train,
                min(10000, extra - start),
                L,
                label_drop=a.label_drop,
                seed=a.seed + 1000 + j,
            )
            feats.append(extract_features(self.trunk, more.x))
            ys.append(more.y)
        return torch.cat(feats), torch.cat(ys)

    def _training_bank(self, base) -> tuple[TileFeatureBank, Tensor]:
        """The same composites for a tile-wise trunk, as a :class:`TileFeatureBank`: a composite's
        features are its tiles' features put together, so millions of composites cost one trunk
        pass over the base images. The fresh composites are drawn in one go."""
        a = self.args
        grids, ys = [self.train.grid], [self.train.y]
        extra = a.n_expert_train - a.n_train
        if extra > 0:
            more = composite_specs(
                base.y_train, extra, self.num_labels, label_drop=a.label_drop, seed=a.seed + 1000
            )
            grids.append(more.grid)
            ys.append(more.y)
        base_x = torch.tensor(base.x_train, dtype=torch.float32).div_(255.0).unsqueeze(1)
        return TileFeatureBank.build(self.trunk, base_x, torch.cat(grids)), torch.cat(ys)

    def evaluate_val(self, model: nn.Module) -> dict:
        """Metrics of ``model`` (trunk features -> label scores) on the validation composites,
        as ``val_*`` keys (none without validation composites)."""
        if self.f_va.shape[0] == 0:
            return {}
        r = evaluate(predict(model, self.f_va), self.y_va, self.args.k)
        return {f"val_{m}": r[m] for m in METRICS}

    @torch.no_grad()
    def fit_losses(self, moe: nn.Module, work: Path, max_rows: int = 100000) -> dict:
        """Mean training loss of the MoE on the rows its experts trained on and on the rows they
        held out for early stopping (weak targets), to tell under- from overfitting. Over at
        most ``max_rows`` rows of each (a fixed random sample when there are more)."""
        prep = load_prep(work)
        is_val = prep["is_val"]
        out = {}
        gen = torch.Generator().manual_seed(4321)
        for name, mask in (("fit_train_loss", ~is_val), ("fit_heldout_loss", is_val)):
            rows = mask.nonzero().squeeze(1)
            if rows.numel() > max_rows:
                rows = rows[torch.randperm(rows.numel(), generator=gen)[:max_rows]].sort().values
            x, y = self.f_tr[rows], self.y_tr[rows]
            if not x.shape[0]:
                out[name] = math.nan
                continue
            loss = soft_target_loss(predict(moe, x), y)
            out[name] = loss.item()  # host-ok: a diagnostic for the results JSON, not in an op
        return out

    # ------------------------------------------------------------------ one hard MoE

    def moe_run(
        self,
        E: int,
        *,
        gater: str = "kmeans",
        decoder: str = "shared",
        seed: int = 0,
        workers: int = 0,
        threads: int = 0,
        tag: str | None = None,
        fresh: bool = False,
    ) -> dict:
        a = self.args
        tag = tag or f"E{E}_{gater}_{decoder}_s{seed}" + (
            "_steps" if a.expert_budget == "steps" else ""
        )
        if tag in self.cache and not fresh:
            return self.cache[tag]
        work = self.work / tag
        if (fresh or not a.resume) and work.exists():
            shutil.rmtree(work)  # never mix checkpoints of an earlier run into this one
        trunk = self.trunk
        linears = [trunk.upper[0], trunk.upper[2]]
        if decoder == "per_expert":
            linears.append(trunk.head)
            shared = None
        else:
            shared = copy.deepcopy(trunk.head).requires_grad_(False)
        g = ClusterGater(
            E,
            self.f_tr.shape[1],
            method=gater,
            balance=a.balance,
            seed=seed,
            fit_rows=a.gater_fit_rows,
        )
        t0 = time.perf_counter()
        if a.resume and (work / "prep.pt").exists() and (work / "gater.pt").exists():
            g.load_state_dict(torch.load(work / "gater.pt", weights_only=True))
            ids = torch.load(work / "prep.pt", weights_only=True)["assignment"]
        else:
            ids = g.fit(self.f_tr)
            write_prep(
                work,
                features=self.f_tr,
                targets=self.y_tr,
                assignment=ids,
                num_experts=E,
                init_expert=GroupedExperts.from_linears(1, linears),
                decoder=shared,
                epochs=a.expert_epochs,
                batch_size=a.expert_batch_size,
                lr=a.expert_lr,
                seed=seed,
                max_steps=self.max_steps(),
                patience=a.expert_patience,
                schedule=a.expert_schedule,
                data_file=self.features_path,
            )
            torch.save(g.state_dict(), work / "gater.pt")
        gater_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        if missing_experts(work):
            if workers <= 1 and not threads:
                # Expert layers are small: one thread per expert-trainer is the fastest on a
                # shared CPU (and what each torchrun worker uses in the timing runs).
                previous = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    train_experts_worker(work, 0, 1, progress=self.progress)
                finally:
                    torch.set_num_threads(previous)
            else:
                launch_workers(work, max(workers, 1), threads, self.progress)
        train_seconds = time.perf_counter() - t0
        experts = assemble_experts(work)
        moe = HardMoE(g.eval(), experts, shared).eval()
        scores = predict(moe, self.f_te)
        res = evaluate(scores, self.test.y_clean, a.k)
        res.update(self.evaluate_val(moe))
        res.update(self.fit_losses(moe, work))
        infos = [torch.load(expert_path(work, e), weights_only=True)["info"] for e in range(E)]
        sizes = torch.bincount(ids, minlength=E)
        test_sizes = torch.bincount(g(self.f_te), minlength=E)
        res.update(
            num_experts=E,
            gater=gater,
            decoder=decoder,
            seed=seed,
            train_cluster_min=int(sizes.min()),
            train_cluster_max=int(sizes.max()),
            test_cluster_min=int(test_sizes.min()),
            test_cluster_max=int(test_sizes.max()),
            gater_fit_seconds=gater_seconds,
            expert_train_seconds=train_seconds,
            expert_macs_per_example=GroupedExperts.macs_per_example(experts.dims),
            gater_macs_per_example=g.macs_per_example(),
            infer_us_per_example=self.time_inference(moe),
            expert_best_epochs=[i["best_epoch"] for i in infos],
            expert_steps=[i["steps"] for i in infos],
        )
        self.cache[tag] = res
        return res

    def max_steps(self) -> int | None:
        """With ``--expert-budget steps``: ``--expert-steps``, or else the steps of
        ``expert_epochs`` passes over all the training data (what the single expert gets),
        allowed to every expert."""
        a = self.args
        if a.expert_budget != "steps":
            return None
        if a.expert_steps > 0:
            return a.expert_steps
        n_train = round(0.9 * self.f_tr.shape[0])
        return a.expert_epochs * math.ceil(n_train / a.expert_batch_size)

    @torch.no_grad()
    def time_inference(self, moe: nn.Module, reps: int = 5) -> float:
        """Median wall time of the MoE part (gater + experts + decoder) per held-out example."""
        x = self.f_te
        moe(x)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            moe(x)
            times.append(time.perf_counter() - t0)
        return 1e6 * statistics.median(times) / x.shape[0]

    # ------------------------------------------------------------------ the whole study

    def run(self) -> dict:
        a = self.args
        t_start = time.perf_counter()
        out: dict = {
            "command": "python -m moefast.hardmoe " + " ".join(a.argv),
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
                "note": "shared with other processes while measured",
            },
            "config": {k: v for k, v in vars(a).items() if k not in ("argv",)},
        }
        out["baseline"] = self.setup()
        out["dataset"] = self.data_info
        out["trunk_train_seconds"] = self.trunk_seconds

        sweep = []
        runs = [(E, s) for E in a.experts for s in a.seeds]
        from tqdm.auto import tqdm

        for E, s in tqdm(runs, desc="hard MoE sweep", unit="run", disable=not self.progress):
            r = self.moe_run(E, gater=a.gater, decoder=a.decoder, seed=s)
            val = f" val p@1={r['val_precision_at_1']:.4f}" if "val_precision_at_1" in r else ""
            _log(f"E={E} seed={s}: p@1={r['precision_at_1']:.4f} mAP={r['mAP']:.4f}{val}")
            sweep.append(r)
        out["sweep"] = summarize(sweep)
        out["sweep_runs"] = sweep
        E_main = a.main_experts or max(a.experts)
        by_e = {row["num_experts"]: row for row in out["sweep"]}
        if 1 in by_e:
            out["single_expert"] = by_e[1]
        if E_main in by_e:
            out["hard_moe"] = by_e[E_main]
        out["num_experts"] = E_main

        if a.ablations:
            abl_runs = []
            variants = [
                ("kmeans", "shared"),
                ("balanced", "shared"),
                ("hash", "shared"),
                ("kmeans", "per_expert"),
            ]
            jobs = [(g, d, s) for g, d in variants for s in a.seeds]
            for g, d, s in tqdm(jobs, desc="ablations", unit="run", disable=not self.progress):
                r = self.moe_run(E_main, gater=g, decoder=d, seed=s)
                _log(f"ablation {g}/{d} seed={s}: p@1={r['precision_at_1']:.4f}")
                abl_runs.append(r)
            out["ablations"] = {
                f"{row['gater']}+{row['decoder']}_decoder": row
                for row in summarize(abl_runs, key=("gater", "decoder"))
            }
            # The reference for the per-expert decoders: one expert that also fine-tunes its own
            # copy of the trunk's head, on all the data (the same per-example cost).
            single = []
            for s in a.seeds:
                r = self.moe_run(1, gater="kmeans", decoder="per_expert", seed=s)
                _log(f"ablation single expert/per_expert seed={s}: p@1={r['precision_at_1']:.4f}")
                single.append(r)
                abl_runs.append(r)
            out["ablations"]["single_expert+own_decoder"] = summarize(single)[0]
            out["ablation_runs"] = abl_runs

        if a.timing:
            out["timing"] = self.timing(E_main)
        out["total_seconds"] = time.perf_counter() - t_start
        return out

    def timing(self, E: int) -> dict:
        """Claim (c): the same experts trained by 1 worker and by ``N`` workers (1 thread each)."""
        a = self.args
        res = {"num_experts": E, "threads_per_worker": 1, "runs": []}
        for workers in a.timing_workers:
            for rep in range(a.timing_reps):
                tag = f"timing_E{E}_w{workers}_r{rep}"
                work = self.work / tag
                if work.exists():
                    shutil.rmtree(work)
                r = self.moe_run(E, seed=0, workers=workers, threads=1, tag=tag, fresh=True)
                ranks = [json.loads(p.read_text()) for p in sorted((work / "times").glob("*.json"))]
                row = {
                    "workers": workers,
                    "rep": rep,
                    "wall_seconds": r["expert_train_seconds"],
                    "slowest_rank_train_seconds": max(x["seconds"] for x in ranks),
                    "rank_train_seconds": [x["seconds"] for x in ranks],
                    "precision_at_1": r["precision_at_1"],
                }
                _log(f"timing: {row}")
                res["runs"].append(row)
        base = [x for x in res["runs"] if x["workers"] == min(a.timing_workers)]
        for w in a.timing_workers:
            rows = [x for x in res["runs"] if x["workers"] == w]
            for key in ("wall_seconds", "slowest_rank_train_seconds"):
                m = statistics.median(x[key] for x in rows)
                b = statistics.median(x[key] for x in base)
                res[f"workers_{w}_{key}"] = m
                res[f"workers_{w}_{key}_speedup"] = b / m
        return res


def summarize(rows: list[dict], key: tuple[str, ...] = ("num_experts",)) -> list[dict]:
    """Mean (and standard deviation over seeds) of the metrics of runs sharing ``key``."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in key), []).append(r)
    out = []
    for _, rs in groups.items():
        row = {k: rs[0][k] for k in key}
        row.update(
            {
                k: rs[0][k]
                for k in ("num_experts", "gater", "decoder", "k", "expert_macs_per_example")
            }
        )
        row["gater_macs_per_example"] = rs[0]["gater_macs_per_example"]
        row["seeds"] = [r["seed"] for r in rs]
        for m in SUMMARY:
            if m not in rs[0]:
                continue
            vals = [r[m] for r in rs]
            row[m] = statistics.fmean(vals)
            row[m + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        row["train_cluster_min"] = min(r["train_cluster_min"] for r in rs)
        row["train_cluster_max"] = max(r["train_cluster_max"] for r in rs)
        out.append(row)
    return out
