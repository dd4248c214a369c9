"""``python -m moefast.hardmoe.compare``: the side-by-side table and plot of result files."""

import json
from pathlib import Path

import pytest

from moefast.hardmoe import compare

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "hardmoe_tiles.json"


def _shifted(res: dict, gater: str, dp: float) -> dict:
    out = json.loads(json.dumps(res))
    for r in out["sweep"]:
        r["gater"] = gater
        r["precision_at_1"] += dp
    return out


def test_compare_table_has_one_row_per_size_and_file(tmp_path, capsys):
    res = json.loads(RESULTS.read_text())
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_shifted(res, "tree", 0.01)))
    compare.main([f"flat={RESULTS}", str(other)])
    lines = capsys.readouterr().out.strip().splitlines()
    sizes = [r["num_experts"] for r in res["sweep"]]
    assert len(lines) == 2 + 2 * len(sizes)
    for E, r in zip(sizes, res["sweep"], strict=True):
        rows = [ln for ln in lines[2:] if ln.startswith(f"| {E} |")]
        assert [ln.split("|")[2].strip() for ln in rows] == ["flat", "tree"]
        p1 = [float(ln.split("|")[3].split("±")[0]) for ln in rows]
        assert p1 == pytest.approx([r["precision_at_1"], r["precision_at_1"] + 0.01], abs=1e-4)


def test_compare_plot_and_bad_file(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "cmp.png"
    compare.main([str(RESULTS), "--plot", str(png)])
    assert png.stat().st_size > 10_000
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="no 'sweep'"):
        compare.load(str(bad))
