"""Command (a) end to end, exactly as the README gives it: `bash infra/quickstart.sh` on a smoke
grid, with an empty HOME (no Ray token, no caches: a machine that has never seen the project). It
starts its own Ray head, submits jobs/order_sweep.py with `ray job submit`, streams the job's log
and stops the head. The report has a row per order with finite metrics; the trials train with
DDP over gloo on 2 workers; every trial logs to TensorBoard and to W&B (offline, no key);
a trial's final checkpoint exports to a student that embeds without Ray."""

import json
import math
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pandas as pd
import psutil
import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e

SMOKE = [
    "grid.loss.order=[0,3]",
    "grid.seed=[0]",
    "train.num_workers=2",
    "data.n_train=256",
    "data.n_eval=32",
    "train.epochs=1",
    "train.batch_size=64",
    "train.report_every=2",
    "run.wandb=true",
]


def test_quickstart_from_an_empty_home(tmp_path, drivers):
    home, results, work = tmp_path / "home", tmp_path / "results", tmp_path / "work"
    home.mkdir()
    # a clone: the project's files without results or git history, and the environment that
    # `bash infra/test.sh` set up (command (a)'s setup step then finds it installed)
    ignore = shutil.ignore_patterns(".git", ".venv", "results", "__pycache__")
    shutil.copytree(ROOT, work, symlinks=True, ignore=ignore)
    (work / ".venv").symlink_to((ROOT / ".venv").resolve())
    gcs = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_"))},
        "HOME": str(home),
        "RAY_GCS_PORT": str(gcs),
        "RAY_DASHBOARD_PORT": str(free_port()),
        "RAYTRAIN_RESULTS": str(results),
    }
    script = drivers(
        ["bash", "infra/quickstart.sh", *SMOKE],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log, _ = script.communicate(timeout=600)
    assert script.returncode == 0, log[-5000:]

    token = home / ".ray/auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and token.read_text().strip() not in log  # never printed
    assert "created a Ray authentication token" in log
    # the job's log reads like a program's: a line per finished trial with the ETA, no progress bars
    finished = re.findall(r"^raytrain: \[(\d)/2\] loss\.order=\d seed=0: mean_r@1 [\d.]+ in ", log, re.M)
    assert sorted(finished) == ["1", "2"], log[-5000:]
    assert "ETA" in log and "\r" not in log and "MapBatches" not in log, log[-5000:]  # no progress-bar redraws

    report = Path(re.search(r"the sweep report is (\S+)", log).group(1))
    assert report.is_file() and report.parent.parent == results
    text = report.read_text()
    for label in ("0 (CLIP)", "3 (tuple)"):
        assert re.search(rf"^\| {re.escape(label)} \|", text, re.M), text
    trials = pd.read_csv(report.parent / "trials.csv")
    assert len(trials) == 2 and (trials["status"] == "TERMINATED").all()
    for metric in ("mean_r@1", "i2t_r@1", "t2i_r@1", "zs_top1", "binding", "ood_zs_top1"):
        assert trials[metric].map(math.isfinite).all(), metric
    assert (report.parent / "metrics_vs_order.png").stat().st_size > 0
    assert list(report.parent.glob("run_trial_*/events.out.tfevents.*")), "Tune wrote no TensorBoard files"
    last = [json.loads(p.read_text().splitlines()[-1]) for p in report.parent.glob("run_trial_*/result.json")]
    assert [r["world_size"] for r in last] == [2, 2], "every trial trains on 2 DDP workers"
    assert len(list(report.parent.glob("run_trial_*/wandb/offline-run-*"))) == 2, "no offline W&B run per trial"

    # the head it started is gone: no process of that cluster (they all name its GCS address)
    assert not [
        p.pid for p in psutil.process_iter(["cmdline"]) if f"127.0.0.1:{gcs}" in " ".join(p.info["cmdline"] or [])
    ]

    from raytrain.cli import main
    from raytrain.export import ExportedStudent

    ckpt = sorted(results.glob("*/train_runs/*/checkpoint_2*"))[-1]
    assert main(["export", str(ckpt), "--out", str(tmp_path / "student")]) == 0
    assert math.isfinite(float(ExportedStudent.load(tmp_path / "student").embed_texts(["a red circle"]).sum()))
