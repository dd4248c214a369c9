"""Tests of the tile-wise trunk and the feature bank of moefast.hardmoe: composites described by
their cells, features made on demand from a tile table, and everything downstream (gater, expert
training, work directories, the command) giving what it gives on the materialised features."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", reason="moefast.hardmoe's k-means gater needs scikit-learn")
pytest.importorskip("tqdm", reason="moefast.hardmoe's progress bars need tqdm")

from moefast.hardmoe import (
    ClusterGater,
    GroupedExperts,
    TileFeatureBank,
    Trunk,
    assemble_experts,
    train_experts_worker,
    train_one_expert,
    write_prep,
)
from moefast.hardmoe import data as hm_data
from moefast.hardmoe.train import load_prep


def base_images(n=23, s=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 256, size=(n, s, s), dtype=np.uint8)  # never blank
    y = rng.integers(0, 5, size=n)
    return x, y


def tile_trunk(seed=0, hidden=6):
    torch.manual_seed(seed)
    return Trunk(5, width=4, hidden=hidden, embed=7, tiles=True).eval()


def bank_for(trunk, x, grid):
    base = torch.tensor(x, dtype=torch.float32).div_(255.0).unsqueeze(1)
    return TileFeatureBank.build(trunk, base, grid, batch_size=5)


def test_specs_and_rendering_are_the_same_draw_as_make_composites():
    x, y = base_images()
    spec = hm_data.composite_specs(y, 300, 5, label_drop=0.4, seed=3)
    made = hm_data.make_composites(x, y, 300, 5, label_drop=0.4, seed=3)
    assert torch.equal(spec.grid, made.grid)
    assert torch.equal(spec.y, made.y) and torch.equal(spec.y_clean, made.y_clean)
    assert torch.equal(hm_data.render_composites(x, spec.grid), made.x)
    tiles = (spec.grid >= 0).sum(1)
    assert tiles.min() >= 2 and tiles.max() <= 4
    # the clean labels are the union of the classes of the cells' base images
    for i in range(40):
        cls = {int(y[j]) for j in spec.grid[i].tolist() if j >= 0}
        assert cls == set(spec.y_clean[i].nonzero().flatten().tolist())
    # the cells hold the base images they name, row-major
    img = made.x[0, 0]
    for cell, j in enumerate(spec.grid[0].tolist()):
        r, c = (cell // 2) * 8, (cell % 2) * 8
        want = torch.zeros(8, 8) if j < 0 else torch.from_numpy(x[j]).float() / 255
        assert torch.equal(img[r : r + 8, c : c + 8], want)


def test_bank_rows_equal_the_tile_trunks_features_of_the_rendered_composites():
    x, y = base_images()
    trunk = tile_trunk()
    spec = hm_data.composite_specs(y, 64, 5, seed=1)
    bank = bank_for(trunk, x, spec.grid)
    with torch.no_grad():
        want = trunk.features(hm_data.render_composites(x, spec.grid))
    assert bank.shape == want.shape == (64, trunk.feature_dim)
    assert len(bank) == 64 and bank.dtype == torch.float32
    rows = torch.tensor([5, 0, 63, 5])
    torch.testing.assert_close(bank[rows], want[rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat(list(bank.chunks(10))), want, rtol=1e-5, atol=1e-6)
    sub = bank.select(torch.arange(64) % 3 == 0)
    torch.testing.assert_close(sub[torch.arange(len(sub))], want[::3], rtol=1e-5, atol=1e-6)


def test_tile_trunk_cells_are_independent():
    """Changing one cell of a composite changes only that cell's quarter of the features."""
    x, _ = base_images()
    trunk = tile_trunk()
    grid = torch.tensor([[0, 1, -1, 2], [0, 1, 7, 2]])
    img = hm_data.render_composites(x, grid)
    with torch.no_grad():
        f = trunk.features(img)
    q = trunk.feature_dim // 4
    assert torch.equal(f[0, : 2 * q], f[1, : 2 * q]) and torch.equal(f[0, 3 * q :], f[1, 3 * q :])
    assert not torch.allclose(f[0, 2 * q : 3 * q], f[1, 2 * q : 3 * q])
    with pytest.raises(RuntimeError, match="tiles=True"):
        Trunk(5, width=4, hidden=6, embed=7).tile_features(img[:, :, :8, :8])
    with pytest.raises(ValueError, match="grid"):
        TileFeatureBank(torch.zeros(3, 4), torch.zeros(5, 3, dtype=torch.long))


@pytest.mark.parametrize("method", ["kmeans", "balanced", "tree", "hash"])
@pytest.mark.parametrize("E", [1, 3])
def test_gater_fits_a_bank_like_its_features(method, E):
    x, y = base_images()
    trunk = tile_trunk()
    spec = hm_data.composite_specs(y, 200, 5, seed=2)
    bank = bank_for(trunk, x, spec.grid)
    bank.chunk_rows = 37  # several blocks: the chunked paths must agree with one pass
    dense = bank[torch.arange(len(bank))]
    a = ClusterGater(E, trunk.feature_dim, method=method, seed=0, fit_rows=150)
    b = ClusterGater(E, trunk.feature_dim, method=method, seed=0, fit_rows=150)
    ids_bank, ids_dense = a.fit(bank), b.fit(dense)
    assert torch.equal(ids_bank, ids_dense)
    torch.testing.assert_close(a.centroids, b.centroids, rtol=1e-5, atol=1e-6)
    assert torch.equal(a.assign(bank), b(dense))


def test_expert_training_on_a_bank_equals_training_on_its_rows():
    x, y = base_images()
    trunk = tile_trunk()
    spec = hm_data.composite_specs(y, 300, 5, label_drop=0.3, seed=4)
    bank = bank_for(trunk, x, spec.grid)
    bank.chunk_rows = 16
    dense = bank[torch.arange(len(bank))]
    tr, va = torch.arange(300) < 250, torch.arange(300) >= 250

    def run(feats_tr, feats_va, schedule):
        expert = GroupedExperts.from_linears(1, [trunk.upper[0], trunk.upper[2]])
        return train_one_expert(
            expert,
            trunk.head,
            feats_tr,
            spec.y[tr],
            feats_va,
            spec.y[va],
            epochs=3,
            batch_size=32,
            lr=3e-3,
            max_steps=20,
            schedule=schedule,
        )

    for schedule in ("constant", "cosine"):
        s_bank, i_bank = run(bank.select(tr), bank.select(va), schedule)
        s_dense, i_dense = run(dense[tr], dense[va], schedule)
        assert i_bank == i_dense and i_bank["steps"] == 20
        for k in s_bank:
            torch.testing.assert_close(s_bank[k], s_dense[k], rtol=1e-5, atol=1e-6)
    cos, _ = run(dense[tr], dense[va], "cosine")
    const, _ = run(dense[tr], dense[va], "constant")
    assert not torch.allclose(cos["layers.0.weight"], const["layers.0.weight"])
    with pytest.raises(ValueError, match="schedule"):
        run(dense[tr], dense[va], "linear")


def test_work_directory_with_a_bank_trains_and_resumes(tmp_path):
    x, y = base_images()
    trunk = tile_trunk()
    spec = hm_data.composite_specs(y, 240, 5, label_drop=0.2, seed=5)
    bank = bank_for(trunk, x, spec.grid)
    dense = bank[torch.arange(len(bank))]
    g = ClusterGater(3, trunk.feature_dim, seed=0)
    ids = g.fit(bank)
    init = GroupedExperts.from_linears(1, [trunk.upper[0], trunk.upper[2]])
    common = dict(
        targets=spec.y,
        assignment=ids,
        num_experts=3,
        init_expert=init,
        decoder=trunk.head,
        epochs=2,
        batch_size=32,
        schedule="cosine",
    )
    work_bank = write_prep(tmp_path / "bank", features=bank, **common)
    work_dense = write_prep(tmp_path / "dense", features=dense, **common)
    stored = torch.load(work_bank / "prep.pt", weights_only=True)
    assert "features" not in stored and stored["tile_table"].shape == bank.table.shape
    assert stored["config"]["schedule"] == "cosine"
    assert isinstance(load_prep(work_bank)["features"], TileFeatureBank)
    # a worker that stops after one expert, then a second run finishing the rest
    train_experts_worker(work_bank, 0, 2, progress=False)
    first = {p.name for p in (work_bank / "experts").glob("*.pt")}
    assert 0 < len(first) < 3
    report = train_experts_worker(work_bank, 0, 1, progress=False)
    assert sorted(report["skipped"]) == sorted(int(n[7:11]) for n in first)
    train_experts_worker(work_dense, progress=False)
    for a, b in zip(
        assemble_experts(work_bank).parameters(),
        assemble_experts(work_dense).parameters(),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_command_with_a_tile_trunk(tmp_path):
    from moefast.hardmoe.__main__ import main

    out = tmp_path / "res.json"
    argv = [
        "--quick",
        "--source",
        "sklearn-digits",
        "--trunk",
        "tiles",
        "--n-train",
        "400",
        "--n-expert-train",
        "3000",
        "--n-test",
        "200",
        "--n-val",
        "100",
        "--trunk-epochs",
        "1",
        "--hidden",
        "8",
        "--expert-steps",
        "12",
        "--expert-schedule",
        "cosine",
        "--expert-batch-size",
        "64",
        "--experts",
        "1",
        "3",
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(out),
        "--no-progress",
    ]
    main(argv)
    res = json.loads(out.read_text())
    assert res["dataset"]["expert_train_composites"] == 3000
    assert res["config"]["trunk"] == "tiles"
    for key in ("baseline", "single_expert", "hard_moe"):
        assert 0.0 <= res[key]["precision_at_1"] <= 1.0
    assert max(res["sweep_runs"][1]["expert_steps"]) <= 12
    cache = torch.load(tmp_path / "work" / "features.pt", weights_only=True)
    assert "features" not in cache and cache["grid"].shape == (3000, 4)
    main([*argv, "--resume"])
    again = json.loads(out.read_text())
    assert again["hard_moe"]["precision_at_1"] == res["hard_moe"]["precision_at_1"]
    assert again["baseline"]["mAP"] == res["baseline"]["mAP"]
