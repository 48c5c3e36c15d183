"""Tests for raytrain.report.write_report and `raytrain report` (Markdown + self-contained HTML)."""

import base64
import io
import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer
from PIL import Image

import raytrain.report as report
from raytrain.cli import main
from raytrain.report import write_report
from raytrain.stats import compare_groups
from raytrain.tune.sweep import _column, load_space, save_space, trial_seed

NAN = math.nan
LABELS = {0: "0 (CLIP)", 1: "1 (RankCLIP)"}


def _trial(tid, order, seed, top1, r1, error=None, evaluated=True, status=None):
    """One trial row; an error makes it an ERROR trial with NaN metrics."""
    if error:
        top1 = r1 = NAN
    return {
        "trial_id": tid,
        "status": status or ("ERROR" if error else "TERMINATED"),
        "error": error,
        "order": order,
        "seed": seed,
        "evaluated": evaluated and not error and not status,
        "zs_top1": top1,
        "retr_r1": r1,
    }


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
    path = write_report(
        orders,
        tmp_path / "rep",
        group="order",
        metrics=["zs_top1", "retr_r1"],
        primary="zs_top1",
        title="Order sweep",
        group_label=LABELS,
        notes=["TensorBoard: `tensorboard --logdir ray_results/sweep`"],
    )
    assert path == tmp_path / "rep" / "report.md"
    md = path.read_text()
    assert md.startswith("# Order sweep\n\n12 trials: 8 finished and evaluated, 4 failed.\n")
    assert _row(md, "order") == ["order", "zs_top1", "retr_r1", "n"]

    # Hand-computed, std over seeds with ddof=1: order 1 top1 = 0.5, 0.6, 0.7 (std 0.1).
    assert _row(md, "1 (RankCLIP)") == ["1 (RankCLIP)", "0.600 ± 0.100", "0.400 ± 0.000", "3"]
    # The ERROR seed of order 0 is left out: 0.40, 0.44 (std 0.02·√2).
    assert _row(md, "0 (CLIP)") == ["0 (CLIP)", "0.420 ± 0.028", "0.320 ± 0.028", "2"]
    assert _row(md, "2") == ["2", "0.800 ± 0.100", "0.500 ± 0.000", "3"]
    assert _row(md, "3") == ["3", "failed", "failed", "0"]
    # Rows come out in ascending order: first cells of the summary table's body.
    table = md.split("| order |")[1].split("\n\n")[0].splitlines()[2:]
    assert [r.split("|")[1].strip() for r in table] == ["0 (CLIP)", "1 (RankCLIP)", "2", "3"]

    # No baseline: nothing compared, no row singled out.
    assert "No baseline order is set, so no order is compared with another and none is singled out" in md
    assert "Δ" not in md and "best" not in md.lower()

    failed = md.split("## Failed, unfinished and unevaluated trials")[1].split("##")[0]
    assert _row(failed, "t02") == ["t02", "0", "2", "failed", "CUDA out of memory"]
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
        "metrics_vs_order.png",
        "report.html",
        "report.md",
        "summary.json",
        "trials.csv",
    ]
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["trials"] == {
        "total": 12,
        "finished_and_evaluated": 8,
        "finished_not_evaluated": 0,
        "failed": 4,
        "unfinished": 0,
    }
    assert summary["groups"]["1"]["metrics"]["zs_top1"] == pytest.approx({"mean": 0.6, "std": 0.1, "n": 3})
    assert summary["groups"]["3"]["metrics"]["zs_top1"] == {"mean": None, "std": None, "n": 0}
    assert summary["comparison"] is None and summary["baseline"] is None


# methods × seeds: acc (primary); loss = 2 − acc (lower is better, but only acc is judged)
METHODS = {"clip": [0.50, 0.52, 0.51], "rankclip": [0.55, 0.58, 0.56], "distill": [0.49, 0.50, 0.52]}


def test_methods_with_baseline(tmp_path):
    """Hand-computed paired t (df = 2, two-sided p = 1 − t/√(t² + 2), t₀.₉₇₅ = 4.30265):
    rankclip − clip = 0.05, 0.06, 0.05: mean 0.05333, sd 0.005774, se 0.003333, t = 16, p = 0.003883;
    distill − clip = −0.01, −0.02, +0.01: mean −0.00667, sd 0.015275, se 0.008819, t² = 4/7, p = 0.5286;
    Holm over 2: rankclip 2·0.003883 = 0.00777, distill max(0.00777, 0.5286)."""
    trials, _ = _methods()
    md = write_report(
        trials, tmp_path, group="method", metrics=["acc", "loss"], primary="acc", title="Methods", baseline="clip"
    ).read_text()

    assert _row(md, "method") == ["method", "acc", "loss", "n"]
    assert _row(md, "distill") == ["distill", "0.503 ± 0.015", "1.497 ± 0.015", "3"]
    assert _row(md, "clip") == ["clip", "0.510 ± 0.010", "1.490 ± 0.010", "3"]
    assert (
        "**Verdict on `acc`:** Method rankclip is the best method: better than method clip beyond noise "
        "(+0.053, 95 % CI +0.039…+0.068, Holm p = 0.0078, 3 seeds)." in md
    )
    section = md.split("## Compared with method clip")[1].split("##")[0]
    assert "`acc` is higher-is-better (mode max)" in section and "minimum effect 0." in section
    assert _row(section, "vs clip") == ["vs clip", "seeds", "Δ acc", "95 % CI", "p", "Holm p", "verdict"]
    assert _row(section, "rankclip") == ["rankclip", "3", "+0.053", "+0.039 … +0.068", "0.0039", "0.0078", "best"]
    assert _row(section, "distill") == [
        "distill",
        "3",
        "-0.007",
        "-0.045 … +0.031",
        "0.53",
        "0.53",
        "no difference beyond noise",
    ]
    # every metric: diff ± CI half-width (4.30265·se), * where Holm p < 0.05
    assert _row(section, "method") == ["method", "Δ acc", "Δ loss"]
    assert _row(section.split("Every metric")[1], "rankclip") == ["rankclip", "+0.053 ± 0.014*", "-0.053 ± 0.014*"]
    assert _row(section.split("Every metric")[1], "distill") == ["distill", "-0.007 ± 0.038", "+0.007 ± 0.038"]
    assert "## Failed, unfinished and unevaluated trials\n\nNone." in md
    with Image.open(tmp_path / "metrics_vs_method.png") as im:
        assert im.format == "PNG"

    # summary.json: the same numbers, and the comparison dict of the primary metric
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["primary"], summary["mode"], summary["min_effect"], summary["baseline"]) == (
        "acc",
        "max",
        0,
        "clip",
    )
    values = {m: dict(enumerate(v)) for m, v in METHODS.items()}
    expected = compare_groups(values, "clip", noun="method")
    assert summary["comparison"]["best"] == "rankclip" and summary["comparison"]["verdict"] == expected["verdict"]
    assert summary["comparison"]["pairs"]["rankclip"] == expected["pairs"]["rankclip"]  # JSON floats round-trip
    assert summary["comparison"]["pairs"]["rankclip"]["p"] == pytest.approx(1 - math.sqrt(256 / 258))
    assert summary["comparison"]["pairs"]["distill"]["p"] == pytest.approx(1 - math.sqrt((4 / 7) / (4 / 7 + 2)))
    assert summary["comparisons"]["loss"]["rankclip"]["diff"] == pytest.approx(-0.05333, abs=1e-5)

    # mode min on the same acc: rankclip is worse, nothing is better; min_effect blocks a real gain
    md = write_report(
        trials, tmp_path, group="method", metrics=["acc"], primary="acc", title="M", baseline="clip", mode="min"
    ).read_text()
    assert "**Verdict on `acc`:** No method is better than method clip beyond noise; worse than method clip" in md
    md = write_report(
        trials, tmp_path, group="method", metrics=["acc"], primary="acc", title="M", baseline="clip", min_effect=0.1
    ).read_text()
    assert "No method is better than method clip by at least the declared minimum effect 0.1;" in md
    section = md.split("## Compared with")[1]
    assert _row(section, "rankclip")[-1] == "better by less than 0.1" and "best" not in md.lower()


def test_flat_sweep_names_no_best(tmp_path):
    """Issue 19's run: order 2 at 0.681 ± 0.018 against RankCLIP's 0.680 ± 0.017 is no finding."""
    r1 = {0: 0.662, 1: 0.681, 2: 0.697}
    diffs = {0: [0.004, -0.003, 0.002], 2: [0.006, -0.008, 0.005], 3: [-0.002, 0.010, -0.002]}
    rows = [_trial(f"t1{s}", 1, s, v, v) for s, v in r1.items()]
    rows += [_trial(f"t{o}{s}", o, s, r1[s] + d[s], r1[s]) for o, d in diffs.items() for s in r1]
    md = write_report(
        pd.DataFrame(rows),
        tmp_path,
        group="order",
        metrics=["zs_top1", "retr_r1"],
        primary="zs_top1",
        title="flat",
        group_label=LABELS,
        baseline=1,
        min_effect=0.01,
    ).read_text()
    # order 3: d = −0.002, 0.010, −0.002: mean 0.002, se 0.004, half-width 4.30265·0.004; t = 0.5, p = 2/3,
    # Holm 3·2/3 → 1 (and the other two, p 0.68 and 0.85, stay at 1)
    assert (
        "**Verdict on `zs_top1`:** No order differs from order 1 (RankCLIP) beyond noise (largest paired "
        "difference: order 3, +0.002, 95 % CI -0.015…+0.019, Holm p = 1, 3 seeds).\n" in md
    )
    assert "best" not in md.lower()
    section = md.split("## Compared with")[1]
    assert [_row(section, g)[-1] for g in ("0 (CLIP)", "2", "3")] == ["no difference beyond noise"] * 3
    assert _row(section, "3")[4:6] == ["0.67", "1"]
    # retr_r1 equal per seed: differences 0 on every seed, sign-flip p = 1, no bound at 3 seeds
    assert _row(md.split("Every metric")[1], "2") == ["2", "+0.001 ± 0.019", "+0.000 ± inf"]
    assert "± inf: the differences were equal on every seed, which so few seeds cannot bound." in md


def test_no_eval_dir_says_not_evaluated(tmp_path):
    """Data without eval/: the one trial finished but reported no evaluation metric (only a
    training one). Every sentence says so; none says failed or finished-without-a-trial."""
    trials = pd.DataFrame([{**_trial("t10", 1, 0, NAN, NAN, evaluated=False), "rank": 2.5}])
    md = write_report(
        trials,
        tmp_path,
        group="order",
        metrics=["zs_top1", "retr_r1", "rank"],
        primary="zs_top1",
        title="no eval",
        group_label=LABELS,
        baseline=1,
    ).read_text()
    assert md.split("\n\n")[1] == (
        "1 trial: 0 finished and evaluated, 1 finished but not evaluated (no evaluation metrics in the final "
        "result: the data has no `eval/` splits, or `train.eval` is false)."
    )
    assert _row(md, "1 (RankCLIP)") == ["1 (RankCLIP)", "not evaluated", "not evaluated", "2.500 (n=1)", "0"]
    assert "**Verdict on `zs_top1`:** none: no trial was evaluated, so nothing is compared." in md
    assert "| vs 1 (RankCLIP) |" not in md and "delta_vs" not in md  # no empty tables or plot: one row only
    listed = md.split("## Failed, unfinished and unevaluated trials")[1].split("##")[0]
    assert _row(listed, "t10") == ["t10", "1", "0", "finished, not evaluated", "(finished; no evaluation metrics)"]
    assert md.lower().count("failed") == 1 and "## Failed, unfinished" in md  # the heading alone
    assert "best" not in md.lower()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["trials"]["finished_not_evaluated"] == 1 and summary["trials"]["finished_and_evaluated"] == 0


def test_repeated_captions_and_skips_are_stated(tmp_path):
    """A digits-like split (200 images, 40 distinct captions) and per-reason skip counts reach
    the report, trials.csv and summary.json; two orders tied on every seed name no best."""
    rows = [
        {
            **_trial(f"t{o}{s}", o, s, 0.5 + s / 100, 0.3),
            "skipped_rows": 3,
            "skipped_bad_image": 1,
            "skipped_empty_caption": 2,
            "retrieval_images": 200,
            "retrieval_captions": 40,
        }
        for o in (1, 2)
        for s in range(3)
    ]
    rows.append({**_trial("t23", 2, 3, 0, 0, status="RUNNING"), "retrieval_images": NAN, "retrieval_captions": NAN})
    trials = pd.DataFrame(rows)
    md = write_report(
        trials, tmp_path, group="order", metrics=["zs_top1"], primary="zs_top1", title="digits", baseline=1
    ).read_text()
    assert "7 trials: 6 finished and evaluated, 1 unfinished (not ended when the sweep's state was last saved)." in md
    assert (
        "Retrieval split: 200 images and 40 distinct captions (fewer captions than images: a caption shared by "
        "several images is one query, and any of its images is a hit; image queries rank 40 captions)." in md
    )
    assert (
        "Training rows skipped, summed over the 6 finished trials: 6 with an image that did not decode, "
        "12 with an empty caption (per trial in trials.csv)." in md
    )
    assert "**Verdict on `zs_top1`:** No order differs from order 1 beyond noise" in md
    assert "best" not in md.lower()
    listed = md.split("## Failed, unfinished and unevaluated trials")[1].split("##")[0]
    assert _row(listed, "t23") == ["t23", "2", "3", "unfinished", "(did not finish)"]
    back = pd.read_csv(tmp_path / "trials.csv")
    assert list(back["skipped_bad_image"][:6]) == [1] * 6 and list(back["retrieval_captions"][:6]) == [40] * 6
    measured = json.loads((tmp_path / "summary.json").read_text())["measured"]
    assert measured == {
        "retrieval_images": [200],
        "retrieval_captions": [40],
        "skipped_bad_image": 6,
        "skipped_empty_caption": 12,
    }


def test_metric_a_row_does_not_report_is_na_not_failed(tmp_path):
    """A finished row without a metric (e.g. `inject_*` for an ablation without injection)
    says n/a; a row or baseline with no finished trial says failed."""
    trials, _ = _methods()
    trials["inject_acc"] = trials["acc"].where(trials["method"] != "distill")  # NaN for distill
    md = write_report(
        trials, tmp_path, group="method", metrics=["acc", "inject_acc"], primary="acc", title="Methods", baseline="clip"
    ).read_text()
    assert _row(md, "distill") == ["distill", "0.503 ± 0.015", "n/a", "3"]
    deltas = md.split("Every metric")[1].split("##")[0]
    assert _row(deltas, "distill") == ["distill", "-0.007 ± 0.038", "n/a"]
    trials.loc[trials["method"] == "clip", "status"] = "ERROR"
    md = write_report(
        trials, tmp_path, group="method", metrics=["acc", "inject_acc"], primary="acc", title="Methods", baseline="clip"
    ).read_text()
    deltas = md.split("Every metric")[1].split("##")[0]
    assert _row(deltas, "rankclip") == ["rankclip", "baseline failed", "baseline failed"]
    assert _row(md.split("## Compared with")[1], "rankclip")[-1] == "not tested: baseline failed"


def test_trial_seed_and_columns():
    """trials.csv's seed is the trial's own: the grid's, else its variant's, else the base seed."""
    variants = {"full": {}, "other_seed": {"seed": 9}}
    assert trial_seed({"variant": "full", "seed": 2}, variants, 0) == 2
    assert trial_seed({"variant": "other_seed", "seed": 2}, variants, 0) == 2  # the grid wins, as in trial_overrides
    assert trial_seed({"variant": "other_seed"}, variants, 0) == 9
    assert trial_seed({"loss.order": 1}, {}, 5) == 5
    grid = {"loss.order": [1], "seed": [0], "data.seed": [0, 1], "model.image.depth": [2], "model.text.depth": [2]}
    assert [_column(k, grid) for k in grid] == ["order", "seed", "data.seed", "model.image.depth", "model.text.depth"]


@pytest.mark.parametrize(
    "kw, col",
    [
        ({"group": "R"}, "R"),
        ({"metrics": ["zs_top1", "nope"]}, "nope"),
    ],
)
def test_missing_column(orders, tmp_path, kw, col):
    args = {"group": "order", "metrics": ["zs_top1"], "primary": "zs_top1", **kw}
    with pytest.raises(ValueError, match=col):
        write_report(orders, tmp_path, title="x", **args)
    assert not (tmp_path / "report.md").exists()


def test_unknown_baseline(orders, tmp_path):
    with pytest.raises(ValueError, match="baseline"):
        write_report(orders, tmp_path, group="order", metrics=["zs_top1"], primary="zs_top1", title="x", baseline=7)


# ---- HTML, deltas plot, training curves ------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
# Flags that work offline (see infra/test.sh, which installs it): without the networking ones Chromium waits on
# connections this machine refuses.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _progress(loss0, steps=4, lr=True):
    """A trial's progress.csv as Tune writes it: one row per report, Tune's own columns too."""
    rows = [
        {
            "loss": loss0 / s,
            "step": 16 * s,
            "epoch": s // 3,
            **({"lr": 1e-3 * s} if lr else {}),
            "training_iteration": s,
            "done": False,
            "trial_id": "x",
        }
        for s in range(1, steps + 1)
    ]
    return pd.DataFrame(rows).to_csv(index=False)


@pytest.fixture
def progress_files(tmp_path):
    """Fixture progress.csv per trial of `orders`: the failed t02 stopped after one report,
    the all-failed order 3 never reported; t10 repeats steps 32-48 (restored from a checkpoint)."""
    files = {f"t{o}{s}": _progress(3.0 + o + s / 10) for o in range(3) for s in range(3)}
    files["t02"] = _progress(3.2, steps=1)
    files["t10"] += _progress(4.0).split("\n", 2)[2]  # rows for steps 32.. once more, without the header
    root = tmp_path / "progress"
    for tid, text in files.items():
        (root / tid).mkdir(parents=True)
        (root / tid / "progress.csv").write_text(text)
    return root


def _curves(root):
    return {d.name: pd.read_csv(d / "progress.csv") for d in sorted(root.iterdir())}


def _images(html):
    """The decoded PNGs inlined in a page, in order; fails on any image that is not a data URI."""
    srcs = re.findall(r'<img [^>]*src="([^"]*)"', html)
    assert all(s.startswith("data:image/png;base64,") for s in srcs), "every image is inlined"
    return [Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))) for s in srcs]


def _methods():
    """METHODS: three methods x three seeds, baseline clip, with fixture progress for every trial."""
    trials = pd.DataFrame(
        [
            {
                "trial_id": f"{m}{s}",
                "status": "TERMINATED",
                "error": None,
                "method": m,
                "seed": s,
                "evaluated": True,
                "acc": v,
                "loss": 2.0 - v,
            }
            for m, vs in METHODS.items()
            for s, v in enumerate(vs)
        ]
    )
    curves = {t: pd.read_csv(io.StringIO(_progress(2.0 + i / 10))) for i, t in enumerate(trials["trial_id"])}
    return trials, curves


def test_html_report_inlines_every_plot(orders, progress_files, tmp_path):
    out = tmp_path / "rep"
    md = write_report(
        orders,
        out,
        group="order",
        metrics=["zs_top1", "retr_r1"],
        primary="zs_top1",
        title="Order <sweep>",
        group_label=LABELS,
        notes=["logs: `tensorboard --logdir x`"],
        curves=_curves(progress_files),
        curve_metrics=["loss", "lr", "missing"],
    ).read_text()
    page = (out / "report.html").read_text()
    # Same content as the Markdown: summary rows, failed trials, notes; text is escaped.
    assert "<title>Order &lt;sweep&gt;</title>" in page and "<h1>Order &lt;sweep&gt;</h1>" in page
    assert "<tr><td>1 (RankCLIP)</td><td>0.600 ± 0.100</td><td>0.400 ± 0.000</td><td>3</td></tr>" in page
    assert "<td>CUDA out of memory</td>" in page and "<p>12 trials: 8 finished and evaluated, 4 failed.</p>" in page
    assert "<li>logs: <code>tensorboard --logdir x</code></li>" in page
    # Self-contained: no link, stylesheet, script or image from anywhere else.
    assert not re.search(r'(src|href)="(?!data:)', page)
    imgs = _images(page)
    assert [im.format for im in imgs] == ["PNG", "PNG"] and all(im.width > 300 for im in imgs)
    # The inlined images are the PNG files report.md shows, byte for byte; no deltas plot without a baseline.
    names = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert names == ["metrics_vs_order.png", "training_curves.png"]
    inlined = [base64.b64decode(s.split(",", 1)[1]) for s in re.findall(r'src="([^"]*)"', page)]
    assert inlined == [(out / n).read_bytes() for n in names]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*names, "report.html", "report.md", "summary.json", "trials.csv"]
    )


def test_reports_are_written_atomically(orders, tmp_path, monkeypatch):
    args = dict(group="order", metrics=["zs_top1"], primary="zs_top1", title="first")
    write_report(orders, tmp_path, **args)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in tmp_path.iterdir()), "readable by others"

    def broken(*_):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "_html", broken)
    with pytest.raises(RuntimeError):
        write_report(orders, tmp_path, **{**args, "title": "second"})
    # The page that failed is still the old one whole, the Markdown too; no temp file is left.
    assert (tmp_path / "report.html").read_bytes() == before["report.html"]
    assert (tmp_path / "report.md").read_bytes() == before["report.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)


def test_deltas_plot_iff_baseline(tmp_path):
    trials, curves = _methods()
    args = dict(group="method", metrics=["acc", "loss"], primary="acc", title="Methods", curves=curves)
    md = write_report(trials, tmp_path / "b", baseline="clip", **args).read_text()
    assert "![difference vs clip](delta_vs_clip.png)" in md
    assert len(_images((tmp_path / "b" / "report.html").read_text())) == 3
    md = write_report(trials, tmp_path / "nob", **args).read_text()
    assert "delta_vs" not in md and not list((tmp_path / "nob").glob("delta_vs*"))
    assert len(_images((tmp_path / "nob" / "report.html").read_text())) == 2

    # The bars are the paired differences, the error bars their CIs, one subplot per metric.
    comparisons = {
        m: compare_groups({g: dict(zip(t["seed"], t[m])) for g, t in trials.groupby("method")}, "clip")
        for m in ("acc", "loss")
    }
    fig = report._delta_plot(comparisons, ["acc", "loss"], {g: g for g in METHODS}, "clip", "t")
    assert [ax.get_title() for ax in fig.axes] == ["Δ acc", "Δ loss"]
    ax = fig.axes[0]
    acc = {t.get_text(): bar.get_width() for t, bar in zip(ax.get_yticklabels(), ax.patches)}
    assert acc == pytest.approx({"distill": -0.02 / 3, "rankclip": 0.16 / 3})
    errorbars = next(c for c in ax.containers if isinstance(c, ErrorbarContainer))
    spans = [x for seg in errorbars.lines[2][0].get_segments() for x, _ in seg]
    cis = [x for t in ax.get_yticklabels() for x in comparisons["acc"]["pairs"][t.get_text()]["ci"]]
    assert spans == pytest.approx(cis)


def test_facet_splits_the_comparison(tmp_path):
    """The order control's report: one section, comparison and verdict per planted γ. At γ = 0
    the orders agree (rank_nll, lower is better); at γ = 4 orders 2 and 3 are both better than
    order 1 by 0.2, and neither is better than the other beyond noise."""
    rows = []
    for gamma, gain in ((0.0, 0.0), (4.0, 0.2)):
        for seed, base in enumerate((5.0, 5.1, 4.9)):
            for order, extra in ((1, 0.0), (2, gain), (3, gain)):
                noise = 0.01 * ((seed + order) % 3 - 1)  # not the same on every seed
                rows.append(
                    {
                        "trial_id": f"t{gamma:g}{order}{seed}",
                        "status": "TERMINATED",
                        "error": None,
                        "order": order,
                        "planted_gamma": gamma,
                        "seed": seed,
                        "evaluated": True,
                        "rank_nll": base - extra + noise,
                    }
                )
    trials = pd.DataFrame(rows)
    args = dict(group="order", metrics=["rank_nll"], primary="rank_nll", title="Control", mode="min")
    md = write_report(trials, tmp_path / "c", baseline=1, min_effect=0.05, facet="planted_gamma", **args).read_text()
    flat, planted = md.split("## `planted_gamma` = 0.0")[1].split("## `planted_gamma` = 4.0")
    assert "**Verdict on `rank_nll`:** No order differs from order 1 beyond noise" in flat
    assert (
        "**Verdict on `rank_nll`:** order 2 (-0.200" in planted
        and "order 3 (-0.200" in planted
        and "are better than order 1 beyond noise by at least the declared minimum effect 0.05, but none of them "
        "is better than the others beyond noise"
        in planted
    )
    assert "![metrics vs order, planted_gamma = 4.0](metrics_vs_order_planted_gamma_4.0.png)" in md
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["facet"] == "planted_gamma" and set(summary["facets"]) == {"0.0", "4.0"}
    assert summary["facets"]["4.0"]["comparison"]["better"] == [2, 3]
    assert summary["facets"]["0.0"]["groups"]["1"]["metrics"]["rank_nll"]["mean"] == pytest.approx(5.0)
    assert len(_images((tmp_path / "c" / "report.html").read_text())) == 4  # metrics and Δ per γ
    with pytest.raises(ValueError, match="no column 'gamma'"):
        write_report(trials, tmp_path / "x", facet="gamma", **args)


def test_training_curves_from_progress_files(orders, progress_files):
    fig = report._curve_plot(
        orders, _curves(progress_files), "order", {o: str(o) for o in range(4)}, ["loss", "lr", "grad_norm"], "t"
    )
    assert [ax.get_title() for ax in fig.axes] == ["loss", "lr"]  # grad_norm was never reported
    loss = fig.axes[0].lines
    assert len(loss) == 9  # the 9 trials with progress; order 3 never reported
    # One colour per order; a trial that did not finish is dashed and ends in an x.
    colours = [line.get_color() for line in loss]
    assert len(set(colours)) == 3 and colours[0] == colours[1] == colours[2]
    failed = loss[2]
    assert failed.get_linestyle() == "--" and failed.get_marker() == "x" and list(failed.get_xdata()) == [16]
    assert all(line.get_linestyle() == "-" for i, line in enumerate(loss) if i != 2)
    # t10 reported steps 16..64 and then 32..64 again: one point per step, in order.
    t10 = loss[3]
    assert list(t10.get_xdata()) == [16, 32, 48, 64] and t10.get_ydata()[-1] == pytest.approx(4.0 / 4)
    assert report._curve_plot(orders, {}, "order", {}, ["loss"], "t") is None


def _chromium(args, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run infra/test.sh (as root it installs Debian's chromium)")
    done = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _coloured(png):
    """Pixels of a screenshot in a saturated colour: plot lines and bars (text and tables are grey)."""
    with Image.open(png) as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    return int(((rgb.max(axis=2) - rgb.min(axis=2)) > 80).sum())


def test_html_renders_in_headless_chromium(tmp_path):
    trials, curves = _methods()
    write_report(
        trials,
        tmp_path / "rep",
        group="method",
        metrics=["acc", "loss"],
        primary="acc",
        title="Methods",
        baseline="clip",
        curves=curves,
    )
    page = tmp_path / "rep" / "report.html"
    # Copy with the first image's data broken: the check must tell the difference.
    broken = tmp_path / "broken.html"
    broken.write_text(re.sub(r"base64,[A-Za-z0-9+/]{40}", "base64,AAAA", page.read_text(), count=1))

    # The page's own script marks <html> once every image loaded and decoded (naturalWidth > 0).
    assert 'data-plots="3 ok"' in _chromium(["--dump-dom", page.as_uri()], tmp_path)
    assert 'data-plots="broken"' in _chromium(["--dump-dom", broken.as_uri()], tmp_path)

    shots = {}
    for name, html in (("page", page), ("broken", broken)):
        shots[name] = tmp_path / f"{name}.png"
        _chromium(
            ["--hide-scrollbars", "--window-size=1280,4000", f"--screenshot={shots[name]}", html.as_uri()], tmp_path
        )
    ok, bad = _coloured(shots["page"]), _coloured(shots["broken"])
    print(f"coloured pixels: {ok} (page), {bad} (one image broken)")
    assert ok > 20_000, f"only {ok} coloured pixels: plots not drawn"
    assert bad < ok - 5_000, "the broken image's plot is missing from its screenshot"


# ---- `raytrain report <experiment dir>` on a real Tune experiment ----------------------------


def test_saved_space_is_the_sweep_that_ran(tmp_path):
    """run_sweep's <experiment>/space.yaml: grid and config overrides applied, a space file
    that reruns the same trials, without S3 credentials."""
    root = Path(__file__).resolve().parents[1]
    over = ["grid.seed=[7]", "train.epochs=1", "data.s3.access_key=AKIAEXAMPLE", "data.s3.secret_key=s3cr3t"]
    space, base, trials = load_space(root / "tune_spaces/ablations.yaml", over)
    save_space(str(tmp_path), space, base)
    text = (tmp_path / "space.yaml").read_text()
    assert "AKIAEXAMPLE" not in text and "s3cr3t" not in text
    again, again_base, again_trials = load_space(tmp_path / "space.yaml")
    assert again_trials == trials and again.baseline == "full" and again.metrics == space.metrics
    assert again_base == base.override({"data.s3.access_key": None, "data.s3.secret_key": None})


SPACE = """name: mini
variants: {full: {}, no_gate: {dinorankclip.gate: false}}
grid: {seed: [0, 1]}
group: variant
baseline: full
min_effect: 0.01
metrics: [mean_r@1, zs_top1]
primary: mean_r@1
"""
SCORE = {"full": 0.5, "no_gate": 0.4}


def test_cli_report_from_a_tune_experiment(tmp_path, ray_local, capsys):
    from ray import tune

    # Defined here so Ray pickles it by value: Ray's workers cannot import this test module.
    def fake_trial(config):
        """Reports like the train loop (loss, step, lr per step, then the evaluation); one trial
        fails after its first report unless its marker file exists (so a resume can finish it)."""
        variant, seed = config["variant"], config["seed"]
        for step in (8, 16, 24):
            tune.report({"loss": 2.0 / step + seed, "step": step, "epoch": 0, "lr": 1e-3, "step_time": 0.1})
            if (variant, seed) == ("no_gate", 1) and not Path(config["marker"]).exists():
                raise FloatingPointError(f"loss became nan at step {step} (epoch 0); lower optim.lr?")
        tune.report(
            {
                "loss": 0.05,
                "step": 24,
                "epoch": 1,
                "mean_r@1": SCORE[variant] + seed * (0.01 if variant == "full" else 0.02),
                "zs_top1": 1 - SCORE[variant],
                "skipped_rows": seed,
                "skipped_bad_image": 0,
                "skipped_empty_caption": seed,
                "retrieval_images": 200,
                "retrieval_captions": 40,
                "eval_s": 0.2,  # evaluation ran
            }
        )

    (tmp_path / "mini.yaml").write_text(SPACE)
    space, base, _ = load_space(tmp_path / "mini.yaml")
    exp = tmp_path / "runs" / "mini-1"
    save_space(str(exp), space, base)  # as run_sweep does before fitting
    marker = tmp_path / "fixed"
    trainable = tune.with_resources(fake_trial, {"CPU": 0.5})
    param_space = {"marker": str(marker), **{k: tune.grid_search(v) for k, v in space.grid.items()}}
    tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(reuse_actors=True),  # no process per trial
        run_config=tune.RunConfig(name=exp.name, storage_path=str(exp.parent), verbose=0),
    ).fit()

    assert main(["report", str(exp)]) == 0
    assert f"report written to {exp / 'report.md'}" in capsys.readouterr().out
    md = (exp / "report.md").read_text()
    assert md.startswith("# mini: variant, seed")
    assert "\n\n4 trials: 3 finished and evaluated, 1 failed.\n\n" in md
    assert "Retrieval split: 200 images and 40 distinct captions (fewer captions than images" in md
    assert "summed over the 3 finished trials: 0 with an image that did not decode, 1 with an empty caption" in md
    assert _row(md, "full") == ["full", "0.505 ± 0.007", "0.500 ± 0.000", "2"]
    assert _row(md, "no_gate") == ["no_gate", "0.400", "0.600", "1"]
    assert (
        "**Verdict on `mean_r@1`:** No variant can be compared with variant full: none has 2 or more seeds "
        "evaluated in both (seeds in common with variant full: variant no_gate: 1)." in md
    )
    section = md.split("## Compared with variant full")[1].split("##")[0]
    assert _row(section, "no_gate") == ["no_gate", "1", "-0.100", "–", "–", "–", "not tested: 1 seed"]
    assert "the declared minimum effect 0.01" in section  # the space file's
    failed = md.split("## Failed, unfinished and unevaluated trials")[1].split("##")[0]
    [bad] = [line for line in failed.splitlines() if "no_gate" in line]
    assert "| 1 | failed | FloatingPointError: loss became nan at step 8 (epoch 0); lower optim.lr? |" in bad
    assert re.findall(r"!\[[^]]*\]\(([^)]+)\)", md) == [
        "metrics_vs_variant.png",
        "delta_vs_full.png",
        "training_curves.png",
    ]
    assert len(_images((exp / "report.html").read_text())) == 3
    trials = pd.read_csv(exp / "trials.csv")
    assert sorted(trials["status"]) == ["ERROR"] + ["TERMINATED"] * 3
    # each trial's own seed (the grid's), evaluated where its final result has eval_s
    assert sorted(zip(trials["variant"], trials["seed"], trials["evaluated"])) == [
        ("full", 0, True),
        ("full", 1, True),
        ("no_gate", 0, True),
        ("no_gate", 1, False),
    ]
    assert trials.loc[trials["status"] == "TERMINATED", "skipped_empty_caption"].sum() == 1

    # --out writes elsewhere; the report reads the same.
    assert main(["report", str(exp), "--out", str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "report.md").read_text() == md

    # After a resume that reruns the failed trial, the rebuilt report has it finished.
    marker.touch()
    tune.Tuner.restore(str(exp), trainable, restart_errored=True).fit()
    assert main(["report", str(exp)]) == 0
    md = (exp / "report.md").read_text()
    assert _row(md, "no_gate") == ["no_gate", "0.410 ± 0.014", "0.600 ± 0.000", "2"]
    assert "## Failed, unfinished and unevaluated trials\n\nNone." in md
    # d = −0.10, −0.09: mean −0.095, se 0.005, t = −19 at df = 1: p = 1 − (2/π)·atan(19) = 0.033
    assert (
        "**Verdict on `mean_r@1`:** No variant is better than variant full beyond noise; worse than variant "
        "full beyond noise: variant no_gate (-0.095, 95 % CI -0.159…-0.031, Holm p = 0.033, 2 seeds)." in md
    )

    # A sweep whose grid left out its baseline row (e.g. grid.variant=[no_gate]): no deltas, said so.
    (exp / "space.yaml").write_text((exp / "space.yaml").read_text().replace("baseline: full", "baseline: other"))
    assert main(["report", str(exp), "--out", str(tmp_path / "nobase")]) == 0
    md = (tmp_path / "nobase" / "report.md").read_text()
    assert "## Compared with" not in md and "No comparison: the baseline row 'other' is not in this sweep's grid." in md
    assert "No baseline variant is set, so no variant is compared with another and none is singled out" in md

    # A Tune experiment that `raytrain sweep` did not start: no space file to read.
    (exp / "space.yaml").unlink()
    assert main(["report", str(exp)]) == 2
    assert f"{exp / 'space.yaml'} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["empty", "missing", "file"])
def test_cli_report_refuses_what_is_not_an_experiment(tmp_path, capsys, kind):
    path = {"empty": tmp_path, "missing": tmp_path / "nope", "file": tmp_path / "x.txt"}[kind]
    if kind == "file":
        path.write_text("x")
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"raytrain: error: {path} is not a Ray Tune experiment directory") and "Traceback" not in err
    assert not (tmp_path / "report.md").exists()
