"""`python -m moefast.bench` end to end on one tiny case: the JSON schema, the PNG, --compare,
--profile. What CI runs so that the benchmark command keeps working (a few seconds)."""

import json

import pytest

pytest.importorskip("matplotlib")

from moefast.bench import main
from moefast.bench.cli import SCHEMA, ratios

TINY = [
    "--quick",
    "--device",
    "cpu",
    "--ops",
    "permute",
    "grouped_mm fwd",
    "--models",
    "mixtral-8x7b",
    "--dtypes",
    "float32",
    "--routings",
    "uniform",
    "--min-time",
    "0.01",
    "--warmup",
    "1",
]


def test_quick_tiny_case_writes_json_and_plot(tmp_path, capsys):
    out = tmp_path / "run.json"
    assert main([*TINY, "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == SCHEMA
    for key in ("date", "commit", "device", "versions", "settings", "load_average", "cases"):
        assert key in doc
    assert doc["device"]["kind"] == "cpu" and doc["device"]["cpu_cores"] >= 1
    assert doc["versions"]["torch"] and doc["versions"]["moefast"]
    assert doc["copy_bandwidth_gbps"] > 0
    ops = [c["op"] for c in doc["cases"]]
    assert ops == ["permute", "grouped_mm fwd"]
    for case in doc["cases"]:
        assert case["results"]["moefast"]["median_s"] > 0
        for res in case["results"].values():
            assert res["median_s"] > 0
        assert "loop / moefast" in case["ratios"]
        assert "moefast / limit" in case["ratios"]
    gmm = doc["cases"][1]
    assert gmm["flops"] > 0 and gmm["results"]["moefast"]["tflops"] > 0
    stats = gmm["results"]["moefast"]
    assert stats["min_s"] <= stats["q1_s"] <= stats["median_s"] <= stats["q3_s"] <= stats["max_s"]
    assert stats["repeats"] >= 3
    assert doc["cases"][0]["bytes"] > 0 and "gbps" in doc["cases"][0]["results"]["moefast"]
    # every variant is timed or skipped with a reason (MegaBlocks / ScatterMoE are CUDA-only)
    assert "megablocks_gmm" in gmm["results"] or gmm["skipped"]["megablocks_gmm"]
    assert (tmp_path / "run.png").stat().st_size > 0
    assert "moefast" in capsys.readouterr().out

    capsys.readouterr()
    assert main(["--compare", str(out), str(out)]) == 0
    assert "1.00" in capsys.readouterr().out


def test_profile_prints_the_op_table(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    assert main([*TINY, "--cases", "permute", "--profile", "--trace", str(trace)]) == 0
    assert "Self CPU" in capsys.readouterr().out
    assert trace.stat().st_size > 0


def test_ratios():
    r = ratios(
        {
            "moefast": {"median_s": 1.0},
            "loop": {"median_s": 3.0},
            "limit": {"median_s": 0.5},
            "hf_moefast": {"median_s": 2.0},
            "hf_eager": {"median_s": 8.0},
        }
    )
    assert r == {"loop / moefast": 3.0, "moefast / limit": 2.0, "hf_eager / hf_moefast": 4.0}
