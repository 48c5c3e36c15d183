"""`--resume` runs the experiment's own space: every trial's config rebuilt from its space.yaml
equals the original (order sweep, ablations' variants, DCLIP's two phases, a machine profile),
overrides that would change a trial are refused by name; and a sweep whose driver is SIGKILLed
after its first trial, resumed with no overrides, trains its second trial exactly like the
first (same config, data and step count), with no unregistered checkpoint directory left."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raytrain.cli import main
from raytrain.config import ConfigError
from raytrain.methods import method_class
from raytrain.tune.sweep import load_space, prune_checkpoints, resume_space, save_space, trial_overrides

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "tune_spaces"
ORDER = ["data.path=/tmp/digits", "train.epochs=2", "grid.loss.order=[0,1]", "run.max_concurrent_trials=1"]


def started(tmp_path, space, overrides=(), profiles=()):
    """A sweep as `run_sweep` starts it: (space, base, trials) and its experiment directory."""
    loaded = load_space(space, overrides, profiles)
    exp = str(tmp_path / "exp")
    save_space(exp, loaded[0], loaded[1])
    return loaded, exp


def configs(space, base, trials) -> list:
    """Every trial's config, and for a method that declares a run before it (DCLIP) that one's."""
    out = []
    for params in trials:
        cfg = trial_overrides(params, space.variants, base)
        declare = getattr(method_class(cfg.method), "preceding_stage", None)
        out.append((cfg, declare(cfg) if declare else None))
    return out


@pytest.mark.parametrize(
    "space, overrides, profiles",
    [
        ("order_sweep.yaml", ORDER, []),
        ("ablations.yaml", ["grid.seed=[0]", "train.epochs=2", "data.path=/tmp/digits"], []),
        ("dclip_ablations.yaml", ["grid.seed=[0,1]", "dclip.teacher_epochs=3", "train.max_steps=7"], []),
        ("baselines.yaml", ["grid.seed=[1]"], [SPACES / "profiles/h100x8-trials.yaml"]),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_resume_rebuilds_every_trial_from_the_saved_space(tmp_path, space, overrides, profiles):
    original, exp = started(tmp_path, SPACES / space, overrides, profiles)
    resumed = resume_space(exp)  # no overrides, no profile: the saved space holds them all
    assert resumed[2] == original[2] and resumed[0].variants == original[0].variants
    assert configs(*resumed) == configs(*original)
    if space == "dclip_ablations.yaml":  # phase 1 is declared, and rebuilt the same
        assert sum(stage is not None for _, stage in configs(*resumed)) == 10
    # repeating the original command line changes nothing either
    assert configs(*resume_space(exp, overrides, profiles)) == configs(*original)


def test_resume_refuses_overrides_that_change_a_trial(tmp_path, caplog):
    original, exp = started(tmp_path, SPACES / "order_sweep.yaml", ORDER)
    with pytest.raises(ConfigError, match=r"data\.path, train\.epochs would change what the experiment's trials"):
        resume_space(exp, ["train.epochs=8", "data.path=embedded", "run.log_level=INFO"])
    with pytest.raises(ConfigError, match=r"grid\.seed would change"):
        resume_space(exp, ["grid.seed=[5]"])
    with pytest.raises(ConfigError, match=r"run\.max_concurrent_trials would change"):  # Tune keeps its own
        resume_space(exp, ["run.max_concurrent_trials=4"])
    with pytest.raises(ConfigError, match=r"train\.use_gpu, .*would change"):
        resume_space(exp, [], [SPACES / "profiles/h100x8-trials.yaml"])
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'"):
        resume_space(exp, ["train.epoch=2"])
    # allowed: storage credentials and endpoint, log level; they reach every trial
    space, base, trials = resume_space(
        exp, ["run.log_level=DEBUG", "data.s3.endpoint_url=http://127.0.0.1:9", "data.s3.access_key=k"]
    )
    assert base.run.log_level == "DEBUG" and base.data.s3.access_key == "k" and base.train.epochs == 2
    assert base.override({"run.log_level": "INFO", "data.s3": original[1].data.s3.model_dump()}) == original[1]
    # the job's space file: the experiment's own by name is not read; another space is refused
    with caplog.at_level("INFO", logger="raytrain"):
        assert resume_space(exp, space_path=SPACES / "order_sweep.yaml")[2] == original[2]
    assert "resuming with the experiment's own space" in caplog.text
    with pytest.raises(ConfigError, match=r"a sweep of space 'order_sweep', not of .*ablations\.yaml \('ablations'\)"):
        resume_space(exp, space_path=SPACES / "ablations.yaml")
    # the command line says so before anything starts
    assert main(["sweep", "--resume", exp, "train.epochs=3"]) == 2
    assert main(["sweep", "--space", str(SPACES / "baselines.yaml"), "--resume", exp]) == 2


def test_prune_keeps_registered_checkpoints_only(tmp_path):
    """A run directory as Ray Train leaves it: two registered checkpoints in its snapshot, a
    half-written one (a worker killed while writing it); and one with no snapshot at all."""
    import ray

    run = tmp_path / "run"
    names = ["checkpoint_2026-01-01_00-00-01.000000", "checkpoint_2026-01-01_00-00-02.000000"]
    for n in names + ["checkpoint_2026-01-01_00-00-03.000000"]:
        (run / n).mkdir(parents=True)
        (run / n / "model.pt").write_bytes(b"x")
    results = [{"checkpoint_dir_name": n, "metrics": {"step": i}} for i, n in enumerate(names)]
    snapshot = {
        "ray_version": ray.__version__,
        "checkpoint_results": results,
        "checkpoint_report_indices": [0, 1],
        "latest_checkpoint_result": results[1],
        "pending_training_results": [],
        "pending_validation_specs": [],
        "current_report_index": 2,
        "validated_checkpoint_dir_names": [],
        "timed_out_validation_checkpoint_dir_names": [],
        "failed_validation_checkpoint_dir_names": [],
    }
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    assert prune_checkpoints(str(run)) == ["checkpoint_2026-01-01_00-00-03.000000"]
    assert sorted(p.name for p in run.glob("checkpoint_2*")) == names
    assert prune_checkpoints(str(run)) == [] and prune_checkpoints(str(tmp_path / "none")) == []
    (run / "checkpoint_manager_snapshot.json").unlink()  # killed before its first registration
    assert prune_checkpoints(str(run)) == names and not list(run.glob("checkpoint_2*"))


# ---- a real sweep: driver killed after its first trial, resumed ------------------------------

SPACE = """name: resume_check
config:
  data: {{n_train: 64, n_eval: 16, root: {root}}}
  model: {{embed_dim: 8, image: {{width: 16, heads: 2, patch: 8}}, text: {{width: 16, heads: 2}}}}
  loss: {{order: 1}}
  train: {{epochs: 1, batch_size: 16, report_every: 2, checkpoint_every: 2, keep_checkpoints: 2, cpus_per_worker: 0.45}}
  run: {{max_concurrent_trials: 1}}
grid: {{seed: [0, 0]}}
group: seed
metrics: [loss, mean_r@1]
primary: mean_r@1
"""
JUNK = "checkpoint_2000-01-01_00-00-00.000000"  # what a worker killed mid-write leaves


def driver(drivers, tmp_path, *args):
    """The order sweep job in its own session (conftest.Driver), with a private local Ray cluster
    (RAY_ADDRESS=local: never one another process started); its output to driver-<n>.log."""
    env = {**os.environ, "RAY_ADDRESS": "local", "TUNE_GLOBAL_CHECKPOINT_S": "1", "RAY_DISABLE_USAGE_STATS": "1"}
    log = open(tmp_path / f"driver-{len(list(tmp_path.glob('driver-*')))}.log", "w")
    cmd = [sys.executable, ROOT / "jobs/order_sweep.py", "--space", tmp_path / "space.yaml", *args]
    return drivers(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen, log: Path):
    end = time.time() + timeout
    while time.time() < end:
        if found := predicate():
            return found
        if proc.poll() is not None:
            raise AssertionError(f"the sweep exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)
    raise TimeoutError(f"no {what} within {timeout} s:\n{log.read_text()[-4000:]}")


def final(run: Path) -> tuple[dict, dict, list[str]]:
    """(final config, final metrics, checkpoint directories on disk) of a Ray Train run."""
    from ray.train import Result

    result = Result.from_path(str(run))
    cfg = json.loads(Path(result.checkpoint.path, "config.json").read_text())["config"]
    registered = sorted(Path(c.path).name for c, _ in result.best_checkpoints)
    assert sorted(p.name for p in run.glob("checkpoint_2*")) == registered  # nothing unregistered left
    return cfg, result.metrics, registered


@pytest.mark.e2e
def test_killed_driver_resumes_the_same_sweep(tmp_path, drivers):
    from raytrain.data.synthetic import make_dataset

    digits = tmp_path / "digits"  # not the space's data: 48 rows, 3 epochs (9 steps; the space's: 4)
    make_dataset(digits, n_train=48, n_eval=16, seed=1)
    (tmp_path / "space.yaml").write_text(SPACE.format(root=tmp_path / "embedded"))
    runs = tmp_path / "runs"
    proc = driver(drivers, tmp_path, f"data.path={digits}", "train.epochs=3", f"run.storage_path={runs}")
    log = tmp_path / "driver-0.log"
    # one trial at a time: kill once the second trial has registered its first checkpoint
    snapshots = lambda: sorted(runs.glob("*/train_runs/*/checkpoint_manager_snapshot.json"))  # noqa: E731
    snapshot = wait_for(
        lambda: len(snapshots()) == 2 and snapshots()[1], 600, "the second trial's checkpoint", proc, log
    )
    proc.kill()
    second = snapshot.parent
    first_result = next(runs.glob("resume_check-*/run_trial_*00000*/result.json"))
    before = first_result.read_text()
    (second / JUNK).mkdir()  # removed when the trial resumes
    t0 = time.time()
    proc = driver(drivers, tmp_path, "--resume", str(next(runs.glob("resume_check-*"))))
    log = tmp_path / "driver-1.log"
    # once the resumed trial registers a checkpoint, plant another: removed when it ends
    wait_for(lambda: snapshot.stat().st_mtime > t0, 600, "a checkpoint after resuming", proc, log)
    (second / JUNK).mkdir()
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    assert first_result.read_text() == before  # the finished trial was not run again
    out = log.read_text()
    assert "2 trials of resume_check" in out and f"data {digits}" in out, out[-4000:]
    first, second = sorted(runs.glob("resume_check-*/train_runs/*"))
    (cfg1, m1, kept1), (cfg2, m2, kept2) = final(first), final(second)
    assert cfg2 == cfg1 and cfg1["data"]["path"] == str(digits) and cfg1["train"]["epochs"] == 3
    assert m1["step"] == m2["step"] == 9 and m1["resumed_step"] == -1 and m2["resumed_step"] >= 2
    assert len(kept1) == len(kept2) == 2  # train.keep_checkpoints, on disk
    for metric in ("loss", "mean_r@1"):
        assert math.isclose(m1[metric], m2[metric], rel_tol=1e-4, abs_tol=1e-6), (metric, m1[metric], m2[metric])
