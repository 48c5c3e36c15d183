"""Tests for raytrain.report.write_report."""

import math

import pandas as pd
import pytest
from PIL import Image

from raytrain.report import write_report

NAN = math.nan
LABELS = {0: "0 (CLIP)", 1: "1 (RankCLIP)"}


def _trial(tid, order, seed, top1, r1, error=None):
    """One trial row; an error makes it an ERROR trial with NaN metrics."""
    if error:
        top1 = r1 = NAN
    return {"trial_id": tid, "status": "ERROR" if error else "TERMINATED", "error": error,
            "order": order, "seed": seed, "zs_top1": top1, "retr_r1": r1}


@pytest.fixture
def orders():
    """Orders 0..3 x seeds 0..2: one ERROR in order 0, order 3 entirely failed."""
    rows = [
        _trial("t00", 0, 0, 0.40, 0.30),
        _trial("t01", 0, 1, 0.44, 0.34),
        _trial("t02", 0, 2, 0, 0, error="CUDA out of memory\nTraceback (most recent call last): ..."),
        _trial("t10", 1, 0, 0.50, 0.40),
        _trial("t11", 1, 1, 0.60, 0.40),
        _trial("t12", 1, 2, 0.70, 0.40),
        _trial("t20", 2, 0, 0.70, 0.50),
        _trial("t21", 2, 1, 0.80, 0.50),
        _trial("t22", 2, 2, 0.90, 0.50),
    ] + [_trial(f"t3{s}", 3, s, 0, 0, error=f"NCCL timeout on rank {s}") for s in range(3)]
    return pd.DataFrame(rows)


def _row(md, first_cell):
    """Cells of the first Markdown table row starting with `first_cell`."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row for {first_cell!r}")


def test_order_sweep(orders, tmp_path):
    path = write_report(orders, tmp_path / "rep", group="order", metrics=["zs_top1", "retr_r1"],
                        primary="zs_top1", title="Order sweep", group_label=LABELS,
                        notes=["TensorBoard: `tensorboard --logdir ray_results/sweep`"])
    assert path == tmp_path / "rep" / "report.md"
    md = path.read_text()
    assert md.startswith("# Order sweep")
    assert _row(md, "order") == ["order", "zs_top1", "retr_r1", "n"]

    # Hand-computed, std over seeds with ddof=0: order 1 top1 = 0.5, 0.6, 0.7.
    assert _row(md, "1 (RankCLIP)") == ["1 (RankCLIP)", "0.600 ± 0.082", "0.400 ± 0.000", "3"]
    # The ERROR seed of order 0 is left out: mean of 0.40, 0.44.
    assert _row(md, "0 (CLIP)") == ["0 (CLIP)", "0.420 ± 0.020", "0.320 ± 0.020", "2"]
    assert _row(md, "2") == ["2", "0.800 ± 0.082", "0.500 ± 0.000", "3"]
    assert _row(md, "3") == ["3", "failed", "failed", "0"]
    # Rows come out in ascending order: first cells of the summary table's body.
    table = md.split("| order |")[1].split("\n\n")[0].splitlines()[2:]
    assert [r.split("|")[1].strip() for r in table] == ["0 (CLIP)", "1 (RankCLIP)", "2", "3"]

    assert "Best order by `zs_top1`: **2** (0.800 ± 0.082, n=3)." in md
    assert "Δ" not in md  # no baseline, no delta table

    failed = md.split("## Failed trials")[1].split("##")[0]
    assert _row(failed, "t02") == ["t02", "0", "2", "ERROR", "CUDA out of memory"]
    assert "Traceback" not in failed  # first line only
    for s in range(3):
        assert _row(failed, f"t3{s}")[-1] == f"NCCL timeout on rank {s}"

    assert "![metrics vs order](metrics_vs_order.png)" in md
    assert "- TensorBoard: `tensorboard --logdir ray_results/sweep`" in md

    png = tmp_path / "rep" / "metrics_vs_order.png"
    assert png.stat().st_size > 0
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100

    back = pd.read_csv(tmp_path / "rep" / "trials.csv")
    pd.testing.assert_frame_equal(back, orders, check_dtype=False)
    # No temp files left behind by the atomic writes.
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == [
        "metrics_vs_order.png", "report.md", "trials.csv"]


def test_methods_with_baseline(tmp_path):
    vals = {"clip": [0.50, 0.52], "rankclip": [0.55, 0.57], "distill": [0.48, 0.50]}
    trials = pd.DataFrame([
        {"trial_id": f"{m}{s}", "status": "TERMINATED", "error": None, "method": m, "seed": s,
         "acc": v, "loss": 2.0 - v}
        for m, vs in vals.items() for s, v in enumerate(vs)])
    md = write_report(trials, tmp_path, group="method", metrics=["acc", "loss"], primary="acc",
                      title="Methods", baseline="clip").read_text()

    assert _row(md, "method") == ["method", "acc", "loss", "n"]
    assert _row(md, "distill") == ["distill", "0.490 ± 0.010", "1.510 ± 0.010", "2"]
    assert "Best method by `acc`: **rankclip**" in md

    deltas = md.split("## Difference vs clip")[1].split("##")[0]
    assert _row(deltas, "method") == ["method", "Δ acc", "Δ loss"]
    assert _row(deltas, "rankclip") == ["rankclip", "+0.050", "-0.050"]
    assert _row(deltas, "distill") == ["distill", "-0.020", "+0.020"]
    assert _row(deltas, "clip") == ["clip", "+0.000", "+0.000"]
    assert "## Failed trials\n\nNone." in md
    with Image.open(tmp_path / "metrics_vs_method.png") as im:
        assert im.format == "PNG"


@pytest.mark.parametrize("kw, col", [
    ({"group": "R"}, "R"),
    ({"metrics": ["zs_top1", "nope"]}, "nope"),
])
def test_missing_column(orders, tmp_path, kw, col):
    args = {"group": "order", "metrics": ["zs_top1"], "primary": "zs_top1", **kw}
    with pytest.raises(ValueError, match=col):
        write_report(orders, tmp_path, title="x", **args)
    assert not (tmp_path / "report.md").exists()


def test_unknown_baseline(orders, tmp_path):
    with pytest.raises(ValueError, match="baseline"):
        write_report(orders, tmp_path, group="order", metrics=["zs_top1"], primary="zs_top1",
                     title="x", baseline=7)
