"""The hard-MoE inference benchmark: its MAC counts and the JSON / plot it writes."""

import json

import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")
from moefast.hardmoe import infer_bench


def test_module_macs_counts_convolutions_and_linear_layers():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, groups=1),  # 8x8 output: 64 * 8 * (3*3*3) MACs
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4),  # 4x4: 16 * 8 * (2*3*3)
        nn.Flatten(),
        nn.Linear(128, 5),  # 128 * 5
    )
    x = torch.randn(3, 3, 8, 8)
    want = 64 * 8 * 27 + 16 * 8 * 18 + 128 * 5
    assert infer_bench.module_macs(net, x) == want


def test_infer_bench_writes_rows_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "infer.json", tmp_path / "infer.png"
    argv = ["--batch", "64", "--experts", "1", "4", "--threads", "1", "--reps", "1"]
    argv += ["--out", str(out), "--plot", str(png), "--no-progress"]
    infer_bench.main(argv)
    res = json.loads(out.read_text())
    assert res["expert_dims"] == [infer_bench.FEATURES, 8, 64]
    rows = res["rows"]
    assert [(r["gater"], r["num_experts"]) for r in rows] == [
        (g, E) for g in ("hash", "kmeans", "tree") for E in (1, 4)
    ]
    by = {(r["gater"], r["num_experts"]): r for r in rows}
    d = infer_bench.FEATURES
    assert by["kmeans", 4]["gater_macs"] == 4 * d
    assert by["tree", 4]["gater_macs"] == 2 * d  # two levels for four leaves
    assert by["tree", 1]["gater_macs"] == 0 and by["hash", 4]["gater_macs"] == 0
    for r in rows:
        assert r["expert_macs"] == d * 8 + 8 * 64
        assert r["trunk_macs"] > 100 * r["expert_macs"]  # the convolutions dominate
        assert r["total_macs"] == sum(
            v for k, v in r.items() if k.endswith("_macs") and k != "total_macs"
        )
        for k in ("gater", "moe", "grouped_mm", "dense_mm", "trunk"):
            assert r[f"{k}_us_per_example"] > 0
        assert r["pipeline_us_per_example"] == pytest.approx(
            r["trunk_us_per_example"] + r["moe_us_per_example"]
        )
    assert png.stat().st_size > 10_000
