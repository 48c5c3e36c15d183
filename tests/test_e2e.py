"""End to end on a real local Ray cluster: `ray start --head`, then `ray job submit` of
jobs/order_sweep.py with a tiny space; the report has a row per order with finite metrics.
Half the trials train with DDP over gloo on 2 workers; every trial logs to TensorBoard and
to W&B (offline, no key)."""

import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster(tmp_path, no_inprocess_ray):
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    gcs, dash = free_port(), free_port()
    subprocess.run(
        [
            bin_dir / "ray",
            "start",
            "--head",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=2",
            "--disable-usage-stats",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        yield env, f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([bin_dir / "ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_order_sweep_through_ray_job_submit(cluster, tmp_path):
    env, address = cluster
    results = tmp_path / "results"
    work = tmp_path / "work"  # the job's working dir: the project without its virtualenv
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".venv", ".git", "results", "__pycache__"))
    cmd = [
        Path(sys.executable).parent / "ray",
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(work),
        "--",
        "python",
        "jobs/order_sweep.py",
        "grid.loss.order=[0,1,3]",
        "grid.seed=[0]",
        "grid.train.num_workers=[1,2]",
        "data.n_train=256",
        "data.n_eval=32",
        "run.max_concurrent_trials=1",
        "train.epochs=1",
        "train.batch_size=64",
        "train.report_every=2",
        f"data.root={tmp_path / 'data'}",
        f"run.storage_path={results}",
        "run.wandb=true",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    report = Path(re.search(r"report written to (\S+)", log).group(1))
    assert report.is_file() and report.parent.parent == results
    text = report.read_text()
    for label in ("0 (CLIP)", "1 (RankCLIP)", "3 (tuple)"):
        assert re.search(rf"^\| {re.escape(label)} \|", text, re.M), text
    assert "Failed trials\n\nNone." in text
    trials = pd.read_csv(report.parent / "trials.csv")
    assert len(trials) == 6 and set(trials["num_workers"]) == {1, 2}
    for metric in ("mean_r@1", "i2t_r@1", "t2i_r@1", "zs_top1", "binding", "ood_zs_top1"):
        assert trials[metric].map(math.isfinite).all(), metric
    assert (report.parent / "metrics_vs_order.png").stat().st_size > 0
    assert list(report.parent.glob("run_trial_*/events.out.tfevents.*")), "Tune wrote no TensorBoard files"
    assert len(list(report.parent.glob("run_trial_*/wandb/offline-run-*"))) == 6, "no offline W&B run per trial"
    # a trial's final checkpoint exports to a student that embeds without Ray
    from raytrain.cli import main
    from raytrain.export import ExportedStudent

    ckpt = sorted(results.glob("*/train_runs/*/checkpoint_2*"))[-1]
    assert main(["export", str(ckpt), "--out", str(tmp_path / "student")]) == 0
    assert math.isfinite(float(ExportedStudent.load(tmp_path / "student").embed_texts(["a red circle"]).sum()))
