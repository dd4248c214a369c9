"""Tests of moefast.hardmoe: gater, experts, shared decoder, HardMoE, parallel and resumable
expert training, the data task, the metrics and a tiny end-to-end run of the command."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("sklearn", reason="moefast.hardmoe's k-means gater needs scikit-learn")
pytest.importorskip("tqdm", reason="moefast.hardmoe's progress bars need tqdm")

from moefast.hardmoe import (
    ClusterGater,
    GroupedExperts,
    HardMoE,
    ModuleExperts,
    assemble_experts,
    balanced_assignment,
    mean_average_precision,
    missing_experts,
    owned_experts,
    planned_steps,
    precision_at_k,
    train_experts_worker,
    train_one_expert,
    write_prep,
)
from moefast.hardmoe import data as hm_data

REPO = Path(__file__).resolve().parents[1]


def blobs(sizes, dim=8, spread=0.05, seed=0):
    """Well-separated clusters on different axes; returns points and their true cluster."""
    gen = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c, n in enumerate(sizes):
        center = torch.zeros(dim)
        center[c % dim] = 1.0 if c < dim else -1.0
        xs.append(center + spread * torch.randn(n, dim, generator=gen))
        ys.append(torch.full((n,), c))
    return torch.cat(xs), torch.cat(ys)


# ----------------------------------------------------------------------------- gater


def test_kmeans_gater_recovers_clusters():
    x, truth = blobs([60, 40, 50, 30])
    g = ClusterGater(4, 8, method="kmeans", seed=0)
    ids = g.fit(x)
    assert ids.shape == (180,) and ids.dtype == torch.int64
    # each true cluster maps to exactly one expert, and different clusters to different experts
    mapping = {int(c): set(ids[truth == c].tolist()) for c in truth.unique()}
    assert all(len(v) == 1 for v in mapping.values())
    assert len({next(iter(v)) for v in mapping.values()}) == 4
    # new points go to the expert of their cluster
    x_new, t_new = blobs([5, 5, 5, 5], seed=1)
    pred = g(x_new)
    for c in range(4):
        assert set(pred[t_new == c].tolist()) == mapping[c]


def test_kmeans_gater_fit_on_a_sample():
    x, truth = blobs([300, 200, 250, 150])
    g = ClusterGater(4, 8, method="kmeans", seed=0, fit_rows=60)
    ids = g.fit(x)
    # k-means saw 60 rows, yet every row is assigned, and each true cluster to one expert
    assert ids.shape == (900,)
    groups = [set(ids[truth == c].tolist()) for c in range(4)]
    assert all(len(s) == 1 for s in groups) and len(set.union(*groups)) == 4
    assert torch.equal(ids, g(x))


def test_balanced_gater_caps_every_expert():
    x, _ = blobs([300, 20, 20, 20])  # one cluster holds most examples
    E = 4
    plain = ClusterGater(E, 8, method="kmeans", seed=0).fit(x)
    balanced = ClusterGater(E, 8, method="balanced", seed=0).fit(x)
    cap = math.ceil(x.shape[0] / E)
    assert torch.bincount(plain, minlength=E).max() > cap  # plain k-means is unbalanced here
    counts = torch.bincount(balanced, minlength=E)
    assert counts.max() <= cap and counts.min() > 0 and counts.sum() == x.shape[0]


def test_balanced_assignment_properties():
    gen = torch.Generator().manual_seed(0)
    d = torch.rand(101, 7, generator=gen)
    # ample capacity: every row takes its nearest column
    assert torch.equal(balanced_assignment(d, 101), d.argmin(1))
    ids = balanced_assignment(d, 15)
    assert (ids >= 0).all() and torch.bincount(ids, minlength=7).max() <= 15
    with pytest.raises(ValueError):
        balanced_assignment(d, 14)


def nested_blobs(n, seed=0):
    """Four clusters in two well-separated pairs (a hierarchy a 2-way tree can follow)."""
    gen = torch.Generator().manual_seed(seed)
    eye = torch.eye(8)
    centers = torch.stack([2 * eye[g] + 0.5 * s * eye[2] for g in (0, 1) for s in (1, -1)])
    truth = torch.arange(4).repeat_interleave(n)
    return centers[truth] + 0.03 * torch.randn(4 * n, 8, generator=gen), truth


def test_tree_gater_recovers_nested_clusters():
    x, truth = nested_blobs(50)
    g = ClusterGater(4, 8, method="tree", seed=0)
    ids = g.fit(x)
    assert g.depth == 2 and g.macs_per_example() == 2 * 8
    groups = [set(ids[truth == c].tolist()) for c in range(4)]
    assert all(len(s) == 1 for s in groups) and len(set.union(*groups)) == 4
    x_new, t_new = nested_blobs(5, seed=1)
    pred = g(x_new)
    for c in range(4):
        assert set(pred[t_new == c].tolist()) == groups[c]


def route_by_hand(g, x):
    """Walks the split tree of a ``"tree"`` gater one example at a time."""
    x = torch.nn.functional.normalize(x.float(), dim=1)
    out = []
    for row in x:
        node = 0
        while node >= 0:
            side = int(row @ g.node_w[node] > g.node_b[node])
            node = int(g.node_child[node, side])
        out.append(-node - 1)
    return torch.tensor(out)


@pytest.mark.parametrize("E", [2, 3, 5, 8, 11])
def test_tree_gater_routes_like_its_tree(E):
    gen = torch.Generator().manual_seed(E)
    x = (
        torch.randn(600, 6, generator=gen)
        + 2 * torch.randn(12, 6, generator=gen)[torch.randint(0, 12, (600,), generator=gen)]
    )
    g = ClusterGater(E, 6, method="tree", seed=1)
    ids = g.fit(x)
    assert g.depth == math.ceil(math.log2(E))
    assert g.macs_per_example() == g.depth * 6 and g.macs_per_example() <= E * 6
    # training rows follow the same path as new rows; every leaf is one expert and none is empty
    assert torch.equal(ids, g(x)) and torch.equal(ids, route_by_hand(g, x))
    assert torch.bincount(ids, minlength=E).min() > 0 and ids.max() == E - 1
    # every leaf is reached by exactly one path: each expert appears once among the children
    leaves = g.node_child[g.node_child < 0]
    assert sorted((-leaves - 1).tolist()) == list(range(E))
    x_new = torch.randn(50, 6, generator=gen)
    assert torch.equal(g(x_new), route_by_hand(g, x_new))
    again = ClusterGater(E, 6, method="tree")
    again.load_state_dict(g.state_dict())
    assert torch.equal(again(x_new), g(x_new))


def test_tree_gater_needs_enough_rows():
    with pytest.raises(ValueError, match="rows"):
        ClusterGater(8, 4, method="tree").fit(torch.randn(5, 4))


def test_hash_gater_is_deterministic_and_spreads():
    x = torch.randn(2000, 16, generator=torch.Generator().manual_seed(0))
    g = ClusterGater(8, 16, method="hash", seed=3)
    ids = g.fit(x)
    assert torch.equal(ids, g(x)) and ids.min() >= 0 and ids.max() < 8
    counts = torch.bincount(ids, minlength=8).float()
    assert counts.min() > 0.5 * counts.mean()


# ----------------------------------------------------------------------------- HardMoE


def random_experts(E, dims, seed=0):
    torch.manual_seed(seed)
    experts = GroupedExperts(E, dims)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.3)
    return experts


def test_hardmoe_equals_each_examples_own_expert():
    x, _ = blobs([30, 25, 20, 35, 10], dim=12, spread=0.3)
    E, L = 5, 7
    g = ClusterGater(E, 12, method="kmeans", seed=0)
    g.fit(x)
    experts = random_experts(E, (12, 16, 6))
    decoder = nn.Linear(6, L)
    moe = HardMoE(g, experts, decoder).eval()
    with torch.no_grad():
        out = moe(x)
        ids = g(x)
        by_hand = torch.stack(
            [
                decoder(experts.single(int(e))(x[i : i + 1], torch.tensor([1], dtype=torch.int32)))[
                    0
                ]
                for i, e in enumerate(ids)
            ]
        )
    assert out.shape == (x.shape[0], L)
    torch.testing.assert_close(out, by_hand, rtol=1e-5, atol=1e-5)
    # the grouped path and the per-module escape hatch agree
    mods = []
    for e in range(E):
        one = experts.single(e)
        mods.append(lambda t, one=one: one(t, torch.tensor([t.shape[0]], dtype=torch.int32)))

    class Wrap(nn.Module):
        def __init__(self, f):
            super().__init__()
            self.f = f

        def forward(self, t):
            return self.f(t)

    moe2 = HardMoE(g, ModuleExperts([Wrap(f) for f in mods]), decoder).eval()
    with torch.no_grad():
        torch.testing.assert_close(moe2(x), out, rtol=1e-5, atol=1e-5)


def test_from_linears_copies_the_trunk_layers():
    lin1, lin2 = nn.Linear(5, 4), nn.Linear(4, 3)
    experts = GroupedExperts.from_linears(3, [lin1, lin2])
    x = torch.randn(6, 5)
    ref = lin2(torch.relu(lin1(x)))
    for e in range(3):
        one = experts.single(e)
        torch.testing.assert_close(one(x, torch.tensor([6], dtype=torch.int32)), ref)


# ----------------------------------------------------------------------------- training


def make_work(tmp_path, E=4, N=400, d=12, L=5, epochs=2, decoder=True, seed=0, data_file=False):
    gen = torch.Generator().manual_seed(seed)
    x, truth = blobs([N // E] * E, dim=d, spread=0.3, seed=seed)
    y = (torch.rand(x.shape[0], L, generator=gen) < 0.3).float()
    y[torch.arange(x.shape[0]), truth % L] = 1.0
    g = ClusterGater(E, d, method="kmeans", seed=seed)
    ids = g.fit(x)
    torch.manual_seed(seed)
    lin1, lin2 = nn.Linear(d, 16), nn.Linear(16, 8)
    dec = nn.Linear(8, L) if decoder else None
    init = GroupedExperts.from_linears(
        1, [lin1, lin2] if decoder else [lin1, lin2, nn.Linear(8, L)]
    )
    data = None
    if data_file:  # the training data in a separate file, as the experiment's feature cache
        data = tmp_path / "features.pt"
        torch.save({"features": x, "targets": y}, data)
    work = write_prep(
        tmp_path / "work",
        features=x,
        targets=y,
        assignment=ids,
        num_experts=E,
        init_expert=init,
        decoder=dec,
        epochs=epochs,
        seed=seed,
        data_file=data,
    )
    return work, g, dec, x


def test_shared_decoder_is_shared_and_frozen(tmp_path):
    work, g, dec, x = make_work(tmp_path)
    before = {k: v.clone() for k, v in dec.state_dict().items()}
    train_experts_worker(work, progress=False)
    # the decoder is not part of any expert checkpoint, and it is the same in every expert's view
    for e in range(4):
        ck = torch.load(work / "experts" / f"expert_{e:04d}.pt", weights_only=True)
        assert all(k.startswith("layers.") for k in ck["state"])
    prep = torch.load(work / "prep.pt", weights_only=True)
    for k, v in before.items():
        assert torch.equal(prep["decoder"][k], v)
    moe = HardMoE(g, assemble_experts(work), dec)
    dec_params = [n for n, _ in moe.named_parameters() if n.startswith("decoder")]
    assert sorted(dec_params) == ["decoder.bias", "decoder.weight"]
    assert moe.decoder.weight.shape == dec.weight.shape  # one [L, d] matrix, no expert axis
    # training one expert sends no gradient into the decoder and leaves it unchanged
    expert = GroupedExperts.from_linears(1, [nn.Linear(12, 16), nn.Linear(16, 8)])
    y = torch.zeros(x.shape[0], 5)
    y[:, 0] = 1
    train_one_expert(expert, dec, x, y, x[:0], y[:0], epochs=1)
    assert dec.weight.grad is None
    for k, v in before.items():
        assert torch.equal(dec.state_dict()[k], v)
    # the experts did move away from their common initial state
    experts = assemble_experts(work)
    assert not torch.allclose(experts.layers[0].weight[0], experts.layers[0].weight[1])


def test_prep_with_data_file_trains_the_same_experts(tmp_path):
    work, _, dec, x = make_work(tmp_path / "a", E=3)
    prep = torch.load(work / "prep.pt", weights_only=True)
    data = tmp_path / "features.pt"
    torch.save({"features": prep["features"], "targets": prep["targets"], "other": x[:3]}, data)
    init = GroupedExperts(1, prep["expert_dims"])
    init.load_state_dict(prep["init_expert"])
    ref = write_prep(
        tmp_path / "b" / "work",
        features=prep["features"],
        targets=prep["targets"],
        assignment=prep["assignment"],
        num_experts=3,
        init_expert=init,
        decoder=dec,
        epochs=2,
        seed=0,
        data_file=data,
    )
    small = torch.load(ref / "prep.pt", weights_only=True)
    assert "features" not in small and small["data_file"] == "../../features.pt"
    train_experts_worker(work, progress=False)
    train_experts_worker(ref, progress=False)
    pairs = zip(
        assemble_experts(work).parameters(), assemble_experts(ref).parameters(), strict=True
    )
    for a, b in pairs:
        torch.testing.assert_close(a, b)


def test_owned_experts_partition():
    sizes = [50, 10, 40, 5, 30, 0, 20]
    parts = [owned_experts(sizes, r, 3) for r in range(3)]
    flat = sorted(e for p in parts for e in p)
    assert flat == list(range(len(sizes)))
    loads = [sum(sizes[e] for e in p) for p in parts]
    assert max(loads) - min(loads) <= max(sizes)
    # equal costs (a step budget): the experts spread evenly by count
    counts = [len(owned_experts([4000] * 10, r, 3)) for r in range(3)]
    assert sorted(counts) == [3, 3, 4]


def test_planned_steps_follows_the_budget():
    steps = {"max_steps": 4000, "epochs": 20, "batch_size": 512}
    epochs = {"max_steps": None, "epochs": 20, "batch_size": 512}
    assert planned_steps(100_000, steps) == planned_steps(600, steps) == 4000
    assert planned_steps(0, steps) == planned_steps(0, epochs) == 0
    assert planned_steps(1025, epochs) == 20 * 3


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _worker_cmd(work: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "moefast.hardmoe.worker", str(work), "--no-progress", *extra]


def test_resume_after_kill_keeps_finished_experts(tmp_path):
    work = make_work(tmp_path, E=4)[0]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        _worker_cmd(work, "--threads", "1", "--pause-after-expert", "30"),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(missing_experts(work)) == 4:
            assert proc.poll() is None, "the worker exited before finishing an expert"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = [e for e in range(4) if e not in missing_experts(work)]
    assert len(done) == 1  # killed while pausing after its first expert
    stamps = {e: (_digest(p), p.stat().st_mtime_ns) for e in done for p in [_ckpt(work, e)]}
    report = train_experts_worker(work, progress=False)
    assert sorted(report["skipped"]) == done
    assert sorted(report["trained"]) == sorted(set(range(4)) - set(done))
    assert missing_experts(work) == []
    for e, st in stamps.items():
        assert (_digest(_ckpt(work, e)), _ckpt(work, e).stat().st_mtime_ns) == st
    # a second resume has nothing left to do
    assert train_experts_worker(work, progress=False)["trained"] == []


def _ckpt(work: Path, e: int) -> Path:
    return work / "experts" / f"expert_{e:04d}.pt"


def test_torchrun_two_gloo_workers_match_one_process(tmp_path):
    work = make_work(tmp_path, E=5, data_file=True)[0]  # ranks memory-map the shared data file
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "moefast.hardmoe.worker",
        str(work),
        "--threads",
        "1",
        "--no-progress",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, cwd=REPO, env=env, check=True, timeout=120, capture_output=True)
    reports = [json.loads((work / "times" / f"rank_{r}.json").read_text()) for r in (0, 1)]
    owned = [set(r["owned"]) for r in reports]
    assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == set(range(5))
    assert all(r["world_size"] == 2 and set(r["trained"]) == set(r["owned"]) for r in reports)
    parallel = assemble_experts(work)
    # experts are independent, so one process training all of them gives the same weights
    for p in (work / "experts").glob("*.pt"):
        p.unlink()
    train_experts_worker(work, progress=False)
    serial = assemble_experts(work)
    for a, b in zip(parallel.parameters(), serial.parameters(), strict=True):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- data, metrics


def test_composites_label_union():
    x = torch.arange(6 * 4 * 4, dtype=torch.uint8).reshape(6, 4, 4).numpy() % 200 + 20
    y = torch.tensor([0, 1, 2, 3, 4, 5]).numpy()
    s = hm_data.make_composites(x, y, 200, 6, seed=0)
    assert s.x.shape == (200, 1, 8, 8)
    n_labels = s.y.sum(1)
    assert n_labels.min() >= 1 and n_labels.max() <= 4
    # every non-blank tile carries one of the labels; each tile's class is a label
    for i in range(20):
        img = (s.x[i, 0] * 255).round().to(torch.uint8)
        tiles = [img[r : r + 4, c : c + 4] for r in (0, 4) for c in (0, 4)]
        present = {
            int(j)
            for t in tiles
            if t.any()
            for j in range(6)
            if torch.equal(t, torch.from_numpy(x[j]))
        }
        assert 2 <= sum(int(t.any()) for t in tiles) <= 4
        assert present == set(s.y[i].nonzero().flatten().tolist())
    weak = hm_data.make_composites(x, y, 500, 6, label_drop=0.5, seed=0)
    assert torch.all(weak.y <= weak.y_clean) and weak.y.sum() < weak.y_clean.sum()
    assert weak.y.sum(1).min() >= 1


def test_fallback_source_sklearn_digits():
    base = hm_data.load_base_images("sklearn-digits")
    assert base.x_train.shape[1:] == (8, 8) and len(base.class_names) == 10
    assert len(set(base.y_test.tolist())) == 10


def test_fashion_mnist_source():
    if not hm_data.source_available("fashion-mnist"):
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    base = hm_data.load_base_images("fashion-mnist")
    assert base.x_train.shape == (60000, 28, 28) and base.x_test.shape == (10000, 28, 28)


def test_metrics():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.7]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert precision_at_k(scores, targets, 1) == pytest.approx(0.5)
    assert precision_at_k(scores, targets, 2) == pytest.approx(0.5)
    assert mean_average_precision(targets * 2 + 0.1, targets) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- the command


def test_command_tiny_end_to_end(tmp_path, capsys):
    from moefast.hardmoe.__main__ import main

    out = tmp_path / "res.json"
    argv = [
        "--quick",
        "--source",
        "sklearn-digits",
        "--n-train",
        "500",
        "--n-test",
        "200",
        "--trunk-epochs",
        "1",
        "--expert-epochs",
        "1",
        "--experts",
        "1",
        "3",
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(out),
        "--no-progress",
    ]
    argv += ["--n-val", "100", "--hidden", "8", "--expert-batch-size", "64"]
    main(argv)
    res = json.loads(out.read_text())
    assert res["num_experts"] == 3
    for key in ("baseline", "single_expert", "hard_moe"):
        assert 0.0 <= res[key]["precision_at_1"] <= 1.0
        assert 0.0 <= res[key]["val_precision_at_1"] <= 1.0
    assert res["hard_moe"]["num_experts"] == 3
    assert res["hard_moe"]["expert_macs_per_example"] == 1024 * 8 + 8 * 64
    assert res["dataset"]["source"] == "sklearn-digits"
    assert res["dataset"]["val_composites"] == 100
    assert res["sweep_runs"][1]["fit_train_loss"] > 0
    assert len(res["sweep_runs"][1]["expert_best_epochs"]) == 3
    # the sweep's work directories share the cached features instead of copying them
    work = tmp_path / "work"
    (prep_path,) = work.glob("E3_kmeans_shared_s0*/prep.pt")
    assert "data_file" in torch.load(prep_path, weights_only=True)
    # a resumed run reuses the trunk, the features and the experts, and scores the same
    stamp = (work / "features.pt").stat().st_mtime_ns
    main([*argv, "--resume"])
    again = json.loads(out.read_text())
    assert (work / "features.pt").stat().st_mtime_ns == stamp
    for key in ("baseline", "hard_moe"):
        assert again[key]["precision_at_1"] == res[key]["precision_at_1"]
        assert again[key]["val_mAP"] == res[key]["val_mAP"]
    # the sweep with per-expert decoders: the experts end in their own copy of the head
    own = tmp_path / "own.json"
    main([*argv, "--resume", "--decoder", "per_expert", "--experts", "2", "--out", str(own)])
    own_res = json.loads(own.read_text())
    assert own_res["hard_moe"]["decoder"] == "per_expert"
    assert own_res["hard_moe"]["expert_macs_per_example"] == 1024 * 8 + 8 * 64 + 64 * 10


def test_step_budget_and_early_stopping():
    torch.manual_seed(0)
    x, y = torch.randn(300, 6), torch.zeros(300, 3)
    y[:, 1] = 1.0
    expert = GroupedExperts.from_linears(1, [nn.Linear(6, 8), nn.Linear(8, 3)])
    _, info = train_one_expert(expert, None, x, y, x[:50], y[:50], epochs=1, max_steps=7)
    assert info["steps"] == 7  # 3 steps per pass: the budget, not the epochs, decides
    _, info = train_one_expert(expert, None, x, y, x[:50], y[:50], epochs=4)
    assert info["steps"] == 12 and info["epochs_run"] == 4
