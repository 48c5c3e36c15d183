"""Fault tolerance on a real local Ray cluster (started by the sweep driver in a subprocess):
(a) a training worker SIGKILLed mid-run resumes from its last checkpoint and ends with the
same metrics as its uninterrupted twin; (c) a trial whose loss turns NaN is reported as
failed and the sweep and report go on; (a killed sweep driver: tests/test_resume.py)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e

SMALL = [
    "data.n_train=512",
    "data.n_eval=32",
    "train.batch_size=32",
    "train.epochs=2",
    "model.image.patch=8",
    "model.image.width=32",
    "model.image.heads=2",
    "model.text.width=32",
    "model.text.heads=2",
    "loss.order=1",
]


def space(tmp_path, rows: str) -> Path:
    """A space with one trial per variant of `rows` (YAML: name -> overrides)."""
    path = tmp_path / "space.yaml"
    metrics = "[loss, mean_r@1, zs_top1, resumed_step]"
    path.write_text(
        f"name: fault\nvariants: {rows}\ngrid: {{seed: [0]}}\ngroup: variant\nmetrics: {metrics}\nprimary: mean_r@1\n"
    )
    return path


def sweep(drivers, space_path, *args):
    """The sweep driver as a subprocess with its own Ray cluster (conftest.Driver)."""
    # Tune saves its experiment state every second, so a killed driver loses no finished trial
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "token", "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    cmd = [sys.executable, ROOT / "jobs/order_sweep.py", "--space", space_path, *args]
    return drivers(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen):
    end = time.time() + timeout
    while time.time() < end:
        found = predicate()
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(
                f"the sweep exited ({proc.returncode}) before any {what}:\n{proc.stdout.read()[-4000:]}"
            )
        time.sleep(0.5)
    raise TimeoutError(f"no {what} within {timeout} s")


def registered_checkpoints(storage: Path) -> list[Path]:
    """Checkpoints Ray Train has registered (a directory appears on storage before its report
    is processed; a worker killed in between resumes from the one before)."""
    found = []
    for snapshot in storage.glob("*/train_runs/*/checkpoint_manager_snapshot.json"):
        try:
            found += [
                snapshot.parent / r["checkpoint_dir_name"]
                for r in json.loads(snapshot.read_text())["checkpoint_results"]
            ]
        except (OSError, ValueError, KeyError):  # being written
            pass
    return found


def report_of(out: str) -> Path:
    line = [x for x in out.splitlines() if "report written to" in x]
    assert line, out[-4000:]
    return Path(line[-1].split("report written to ")[1].strip())


def test_killed_worker_resumes_to_the_same_result_and_nan_trial_fails(tmp_path, drivers):
    # the first trial (max_failures 1) gets its worker killed; the second is its uninterrupted
    # twin; the third one's learning rate makes the loss NaN
    rows = "{killed: {train.max_failures: 1}, twin: {train.max_failures: 0}, diverges: {optim.lr: 1.0e+30}}"
    storage = tmp_path / "runs"
    proc = sweep(
        drivers,
        space(tmp_path, rows),
        *SMALL,
        "optim.lr=0.001",
        "train.report_every=4",
        "train.checkpoint_every=8",
        "run.max_concurrent_trials=1",
        f"run.storage_path={storage}",
        f"data.root={tmp_path / 'data'}",
    )
    # trials run one at a time in variant order, so the first checkpoint is the killed one's
    first = wait_for(lambda: registered_checkpoints(storage), 300, "checkpoint", proc)
    worker = wait_for(lambda: proc.ray_processes("RayTrainWorker"), 60, "worker", proc)
    os.kill(worker[0].pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    report = report_of(out)
    trials = pd.read_csv(report.parent / "trials.csv")
    ok = trials[trials["status"] == "TERMINATED"].set_index("variant")
    killed, twin = ok.loc["killed"], ok.loc["twin"]
    assert killed["resumed_step"] > 0 and twin["resumed_step"] == -1 and first  # it did resume mid-run
    for metric in ("loss", "mean_r@1", "zs_top1"):
        assert math.isclose(killed[metric], twin[metric], rel_tol=1e-4, abs_tol=1e-6), (
            metric,
            killed[metric],
            twin[metric],
        )
    failed = trials[trials["status"] == "ERROR"]
    assert (
        list(failed["variant"]) == ["diverges"]
        and failed["error"].str.match(r"FloatingPointError: loss became (nan|inf)").all()
    ), failed["error"]
    assert "loss became" in report.read_text()  # the report lists the failed trials with their error


def test_killed_worker_resumes_deepspeed_zero2_from_its_sharded_checkpoint(tmp_path, drivers):
    """DeepSpeed ZeRO-2 bf16 on 2 workers: the checkpoint holds both ranks' optimizer shards;
    after a worker is killed the trial loads them and ends where its uninterrupted twin does."""
    storage = tmp_path / "runs"
    proc = sweep(
        drivers,
        space(tmp_path, "{killed: {train.max_failures: 1}, twin: {train.max_failures: 0}}"),
        *SMALL,
        "train.engine=deepspeed",
        "train.num_workers=2",
        "train.cpus_per_worker=0.45",
        "train.deepspeed.zero_stage=2",
        "train.deepspeed.precision=bf16",
        "run.worker_logs=true",  # the engine's line, logged by a worker, is read below
        "train.report_every=4",
        "train.checkpoint_every=8",
        "run.max_concurrent_trials=1",
        f"run.storage_path={storage}",
        f"data.root={tmp_path / 'data'}",
    )
    first = wait_for(lambda: registered_checkpoints(storage), 300, "checkpoint", proc)
    shards = sorted(p.name for p in first[0].glob("deepspeed/global_step*/*optim_states.pt"))
    assert shards == [
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    worker = wait_for(lambda: proc.ray_processes("RayTrainWorker"), 60, "worker", proc)
    os.kill(worker[-1].pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    assert "engine=deepspeed world_size=2" in out
    trials = pd.read_csv(report_of(out).parent / "trials.csv")
    assert (trials["status"] == "TERMINATED").all(), trials["error"].tolist()
    killed, twin = (trials.set_index("variant").loc[v] for v in ("killed", "twin"))
    assert killed["resumed_step"] > 0 and twin["resumed_step"] == -1
    for metric in ("loss", "mean_r@1", "zs_top1"):
        assert math.isclose(killed[metric], twin[metric], rel_tol=1e-4, abs_tol=1e-6), (
            metric,
            killed[metric],
            twin[metric],
        )
    # the final checkpoint's consolidated fp32 weights export without Ray or DeepSpeed
    from raytrain.cli import main
    from raytrain.export import ExportedStudent

    ckpt = sorted(storage.glob("*/train_runs/*/checkpoint_2*"))[-1]
    assert (ckpt / "deepspeed" / "latest").is_file()
    assert main(["export", str(ckpt), "--out", str(tmp_path / "student")]) == 0
    assert math.isfinite(float(ExportedStudent.load(tmp_path / "student").embed_texts(["a red circle"]).sum()))
