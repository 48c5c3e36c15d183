"""Sweeps: a Tune space file (tune_spaces/*.yaml) → one Ray Train run per grid point → report.

A space file is data:

    name: order_sweep
    config: {...}              # nested Config values shared by every trial
    variants: {full: {}, no_gate: {dinorankclip.gate: false}}   # optional: named override sets
    grid: {loss.order: [0, 1, 2], seed: [0, 1, 2]}   # dotted keys (and `variant`); the cross product
    group: loss.order          # the report's rows
    metrics: [mean_r@1, ...]   # the report's columns
    primary: mean_r@1          # the metric the rows are compared on; mode: max (higher is better) or min
    baseline: 1                # every other row is compared with this one, paired by seed
    min_effect: 0.01           # the smallest difference of `primary` that counts (raytrain.stats)
    facet: loss.planted_gamma  # optional: a grid key; the report compares within each of its values

Every trial's config is validated before anything starts.
"""

from __future__ import annotations

import itertools
import os
import posixpath
import time
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pyarrow.fs as pafs
import yaml
from pydantic import BaseModel, ConfigDict, Field

from raytrain.config import Config, ConfigError, make_config, parse_overrides, read_tree
from raytrain.data.sources import exists, read_bytes, resolve, storage_error, write_atomic
from raytrain.log import log, set_level
from raytrain.tune.progress import Progress, error_summary
from raytrain.tune.relay import fit_reporting, start_relay


class Space(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    extends: str | None = None  # another space file whose `config` this one's refines
    config: dict[str, Any] = {}
    variants: dict[str, dict[str, Any]] = {}  # ablation rows / baselines: name → overrides
    grid: dict[str, list[Any]] = Field(min_length=1)
    group: str
    group_labels: dict[Any, str] = {}
    metrics: list[str] = Field(min_length=1)
    primary: str  # the metric the report's verdict compares the rows on
    mode: Literal["max", "min"] = "max"  # whether a higher or a lower `primary` is better
    baseline: Any = None  # the row every other row is compared with, paired by seed
    # the smallest difference of `primary` from the baseline that counts as an effect, however
    # significant (a space file says why that size)
    min_effect: float = Field(0.0, ge=0)
    # a grid key whose values split the report: each value's trials are compared with the
    # baseline on their own, with a verdict each (the order control's loss.planted_gamma)
    facet: str | None = None


def load_space(
    path: str | Path, overrides: list[str] = (), profiles: list[str | Path] = ()
) -> tuple[Space, Config, list[dict[str, Any]]]:
    """(space, base config, per-trial overrides). `profiles` are config fragments (YAML, e.g.
    tune_spaces/profiles/h100x8-trials.yaml: scale and resources) merged over the space's
    config in order. CLI overrides `grid.<key>=[...]` replace a grid axis (e.g.
    `grid.seed=[0]`); any other override applies to every trial."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"space file {path} does not exist")
    try:
        space = Space.model_validate(yaml.safe_load(path.read_text()))
    except Exception as e:  # pydantic's message names the field
        raise ConfigError(f"space file {path}: {e}") from None
    if space.extends:
        parent, _, _ = load_space(path.parent / space.extends)
        space.config = _merge(parent.config, space.config)
    for profile in profiles:
        space.config = _merge(space.config, read_tree(profile, "profile file"))
    return resolve_space(space, parse_overrides(list(overrides)), str(path))


def resolve_space(space: Space, overrides: dict[str, Any], where: str) -> tuple[Space, Config, list[dict[str, Any]]]:
    """`load_space`'s result for a parsed space (its `config` already merged with its parent
    and profiles) and parsed overrides; `where` names the space in errors."""
    config_overrides = {}
    for key, value in overrides.items():
        if key.startswith("grid."):
            if not isinstance(value, list) or not value:
                raise ConfigError(f"override {key} must be a non-empty list, e.g. {key}=[0,1]")
            space.grid[key[len("grid.") :]] = value
        else:
            config_overrides[key] = value
    if space.variants and "variant" not in space.grid:
        space.grid = {"variant": list(space.variants), **space.grid}
    base = make_config(space.config, config_overrides)
    keys = list(space.grid)
    trials = [dict(zip(keys, values)) for values in itertools.product(*space.grid.values())]
    from raytrain.train.engines import check as check_engine  # torch: only when a sweep is read

    for params in trials:
        try:
            check_engine(trial_overrides(params, space.variants, base))  # e.g. DeepSpeed's batch split
        except ValueError as e:  # ConfigError included
            raise ConfigError(f"space {where}, trial {params}: {e}") from None
    for role, key in (("group", space.group), ("facet", space.facet)):
        if key is not None and key not in space.grid:
            raise ConfigError(f"space {where}: {role} {key!r} is not a grid key ({', '.join(keys)})")
    if space.facet == space.group:
        raise ConfigError(f"space {where}: facet and group are both {space.group!r}")
    return space, base, trials


# Overrides a resumed sweep takes with a value other than the experiment's own: where the data
# is read from and with which credentials, and what is logged; never what a trial computes.
# (run.max_concurrent_trials is not among them: Tune restores the experiment's own concurrency.)
RESUME_OVERRIDES = ("data.s3.", "run.log_level")


def resume_space(
    exp: str, overrides: list[str] = (), profiles: list[str | Path] = (), space_path: str | Path | None = None
) -> tuple[Space, Config, list[dict[str, Any]]]:
    """`load_space`'s result for resuming the experiment `exp`, rebuilt from the space it was
    started with (`<exp>/space.yaml`: its full base config, grid and variants), so every trial
    computes what it would have computed uninterrupted. Overrides and profiles given now must
    agree with it, except keys under RESUME_OVERRIDES: ConfigError naming the keys that would
    change. `space_path` (the space file a job names) must be the experiment's space by name;
    it is not read otherwise."""
    space, _ = read_space(exp)
    shown = posixpath.join(exp, SPACE_FILE)
    if space_path is not None:
        file = Path(space_path)
        name = (yaml.safe_load(file.read_text()) or {}).get("name") if file.is_file() else None
        if name is not None and name != space.name:
            raise ConfigError(
                f"--resume {exp}: that experiment is a sweep of space {space.name!r}, not of {file} "
                f"({name!r}); resume it with the job that started it"
            )
        log.info(f"resuming with the experiment's own space {shown}, not {file}")
    overrides = parse_overrides(list(overrides))
    grid = {k: v for k, v in overrides.items() if k.startswith("grid.")}
    changed = [k for k, v in grid.items() if space.grid.get(k[len("grid.") :]) != v]
    saved = make_config(space.config)
    tree = space.config
    for profile in profiles:
        tree = _merge(tree, read_tree(profile, "profile file"))
    given = make_config(tree, {k: v for k, v in overrides.items() if k not in grid})
    changed += [k for k in _differences(saved.model_dump(mode="json"), given.model_dump(mode="json"))]
    refused = [k for k in changed if not k.startswith(RESUME_OVERRIDES)]
    if refused:
        raise ConfigError(
            f"--resume {exp}: {', '.join(refused)} would change what the experiment's trials compute "
            f"(a resumed sweep runs the space it was started with, {shown}); start a new sweep to change them. "
            f"On resume only {', '.join(k + '*' if k.endswith('.') else k for k in RESUME_OVERRIDES)} may differ"
        )
    space.config = given.model_dump(mode="json")
    return resolve_space(space, {}, shown)


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for key in list(a) + [k for k in b if k not in a]:
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(prefix + key)
    return out


def _merge(base: dict, top: dict) -> dict:
    """Nested dicts merged, `top` winning."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def trial_overrides(params: dict[str, Any], variants: dict[str, dict[str, Any]], base: Config) -> Config:
    """The trial's validated config: base, then its variant's overrides, then grid values."""
    params = dict(params)
    name = params.pop("variant", None)
    if name is not None and name not in variants:
        raise ConfigError(f"unknown variant {name!r}; the space defines {', '.join(variants)}")
    return base.override({**variants.get(name, {}), **params})


def run_trial(params: dict[str, Any], base: dict, variants: dict, source, relay, cache=None) -> None:
    """Tune function trainable: one Ray Train run of the base config with this trial's params,
    after the run its method declares to come first, if any (`fit_run`); its reports reach Tune
    through the sweep's `relay` (tune.relay)."""
    from ray import tune

    cfg = trial_overrides(params, variants, make_config(base))
    ctx = tune.get_context()
    # beside the Tune experiment, so one storage path (local, NFS or S3) holds the sweep
    storage = os.path.join(os.path.expanduser(cfg.run.storage_path), ctx.get_experiment_name(), "train_runs")
    fit_reporting(lambda callbacks: fit_run(cfg, ctx.get_trial_name(), storage, source, cache, callbacks), relay)


def fit_run(cfg: Config, name: str, storage: str, source, cache=None, callbacks=()):
    """One Ray Train run of `cfg`, named `name` under `storage`; returns its Result. `callbacks`:
    Ray Train callbacks of this run (a trial's own run reports to Tune through them).

    A method class may declare a run to do first: `preceding_stage(cfg) -> (stage config, key)
    | None` (DCLIP: phase 1, the meta-teacher). That stage runs before, as `<name>-<stage
    method>` (and may declare one of its own), its final loss is printed to the trial's log, and
    its final checkpoint's path is set at `key` in `cfg`. A trial is then one job of several Ray
    Train runs on the same data and teacher cache. (The stage's metrics are not reported to
    Tune: a trial's progress.csv takes its columns from its first result.)"""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raytrain.data.pipeline import train_dataset
    from raytrain.data.sources import uri
    from raytrain.methods import method_class
    from raytrain.train.loop import train_loop_per_worker, worker_config

    if (stage := method_class(cfg.method).preceding_stage(cfg)) is not None:
        stage_cfg, key = stage
        done = fit_run(stage_cfg, f"{name}-{stage_cfg.method}", storage, source, cache)
        if done.checkpoint is None:
            raise RuntimeError(f"run {name}-{stage_cfg.method} ended without a checkpoint for {key}")
        path = uri(done.checkpoint.filesystem, done.checkpoint.path)
        log.info(f"{name}-{stage_cfg.method} done, loss {done.metrics.get('loss', float('nan')):.4f}; {key}={path}")
        cfg = cfg.override({key: path})
    run_dir, train = f"{storage.rstrip('/')}/{name}", cfg.train
    prune_checkpoints(run_dir)  # a resumed run: what a worker killed mid-write left behind
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_config(cfg, source),
        scaling_config=ScalingConfig(
            # elastic (train.min_workers): starts once min_workers fit, and restarts from the latest
            # checkpoint at whatever count in min..num_workers fits when a node goes or comes back
            num_workers=(train.min_workers, train.num_workers) if train.min_workers else train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker, **({"GPU": 1} if train.use_gpu else {})},
        ),
        datasets={"train": train_dataset(source, cfg.data, cfg.seed, cache if cfg.cache.use else None)},
        dataset_config=ingest_config(),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            callbacks=list(callbacks),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=cfg.train.keep_by,
                checkpoint_score_order="min" if cfg.train.keep_by in (None, "loss") else "max",
            ),
        ),
    )
    # what a worker killed mid-write left during this run
    try:
        result = trainer.fit()
    except BaseException:
        prune_checkpoints(run_dir)
        raise
    prune_checkpoints(run_dir, result)
    return result


# Ray Train's record of a run's registered checkpoints, in the run's directory (ray.train.v2's
# CheckpointManager writes it before it deletes a checkpoint that retention drops).
CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"


def prune_checkpoints(run_dir: str, result=None) -> list[str]:
    """Remove the `checkpoint_*` directories of a Ray Train run (local or s3://) that Ray Train
    has not registered, and return their names. Only while no worker of the run is writing
    (`fit_run`: before and after `fit`).

    Ray Train writes a checkpoint into `<run_dir>/checkpoint_<time>` from the workers and
    registers it (the snapshot file) once every worker has reported; a worker or driver killed
    in between leaves a directory no retention rule (train.keep_checkpoints) ever deletes.
    Registered: the retained checkpoints and the latest, as the run's `ray.train.Result` lists
    them (`result`: the one `fit` returned; else read from the run directory). A directory
    beside no snapshot was never registered (the run starts over from scratch)."""
    from ray.train import Result

    fs, path = resolve(run_dir)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise storage_error(fs, "list", run_dir, e) from None
    found = {posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory}
    found = {d for d in found if d.startswith("checkpoint_")}
    if not found:
        return []
    kept = set()
    if result is None and exists(fs, posixpath.join(path, CHECKPOINT_SNAPSHOT)):
        result = Result.from_path(path, storage_filesystem=fs)
    if result is not None:
        latest = [result.checkpoint] if result.checkpoint is not None else []
        kept = {posixpath.basename(c.path.rstrip("/")) for c in [c for c, _ in result.best_checkpoints or []] + latest}
    removed = sorted(found - kept)
    for d in removed:
        fs.delete_dir(posixpath.join(path, d))
    if removed:
        log.info(f"removed {len(removed)} unregistered checkpoint directories of {run_dir}: {', '.join(removed)}")
    return removed


def run_sweep(
    space_path: str | Path | None,
    overrides: list[str] = (),
    resume: str | None = None,
    profiles: list[str | Path] = (),
) -> Path:
    """Run (or, given the experiment directory, resume) a sweep; returns the report path. A
    resumed sweep runs the space it was started with (`resume_space`)."""
    import ray
    from ray import tune

    from raytrain.data.pipeline import prepare

    if resume:
        if "://" not in resume:
            resume = os.path.abspath(os.path.expanduser(resume))  # Tune restores no relative paths
        space, base, trials = resume_space(resume, overrides, profiles, space_path)
    else:
        space, base, trials = load_space(space_path, overrides, profiles)
    set_level(base.run.log_level)
    storage = os.path.expanduser(base.run.storage_path)
    source = prepare(base.data)  # generates the embedded default once, before any trial
    if not ray.is_initialized():
        ray.init(log_to_driver=base.run.worker_logs, runtime_env=runtime_env())
    configs = [trial_overrides(p, space.variants, base) for p in trials]
    cache = shared_cache(base, source, configs) if any(c.cache.use for c in configs) else None
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=base.model_dump(mode="json"),
            variants=space.variants,
            source=source,
            relay=start_relay(),
            cache=cache,
        ),
        {"CPU": 0.01},
    )
    if resume:
        tuner = tune.Tuner.restore(resume, trainable, resume_errored=False, restart_errored=False)
    else:
        callbacks = [Progress(len(trials), list(space.grid), space.primary)]
        if base.run.wandb:
            from ray.air.integrations.wandb import WandbLoggerCallback

            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            if mode == "offline":  # Ray's callback asks for an API key unless WANDB_MODE says offline
                os.environ.setdefault("WANDB_MODE", "offline")
            callbacks.append(WandbLoggerCallback(project=os.environ.get("WANDB_PROJECT", "raytrain"), mode=mode))
        name = f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        save_space(os.path.join(storage, name), space, base)
        tuner = tune.Tuner(
            trainable,
            param_space={key: tune.grid_search(values) for key, values in space.grid.items()},
            # reuse_actors: a finished trial's Tune process (it only drives its Ray Train run) serves a
            # trial waiting to start; starting one costs ~3.5 CPU-seconds (Python, Ray, torch imports)
            tune_config=tune.TuneConfig(max_concurrent_trials=base.run.max_concurrent_trials, reuse_actors=True),
            # verbose=0: Tune's status tables give way to Progress's one line per trial
            run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=callbacks, verbose=0),
        )
    log.info(f"{len(trials)} trials of {space.name}; data {source.path} ({source.num_rows} rows)")
    grid = tuner.fit()
    return write_sweep_report(grid, space, base.seed)


def runtime_env() -> dict:
    """What every process of the sweep gets. Ray Train's controller polls its workers every
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), and a trial waits for that poll at each
    report and at its end; a 2-core machine's short trials lose seconds to it each time. Left
    alone where the job itself sets it (Ray refuses a conflicting value)."""
    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    return {"env_vars": {k: v for k, v in env.items() if k not in os.environ}}


def ingest_config():
    """Ray Train's ingest options with preserve_order: Train replaces the dataset's own
    execution options with these, and a deterministic order is what lets a resumed run skip
    exactly the batches it saw (and two trials equal but for the cache see the same batches)."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options)


def shared_cache(base: Config, source, configs: list[Config]):
    """Build the teacher cache once (or reuse it) for every trial; trials may not vary
    what the cache depends on."""
    from raytrain.teachers.cache import CacheReader, _declared, build_cache

    for cfg in configs:
        if _declared(cfg) != _declared(base):  # e.g. teachers.* on the grid
            raise ConfigError(
                "a trial changes the teacher cache's inputs (teachers.*, data preprocessing); "
                "sweep those in separate runs"
            )
    return CacheReader.open(base, source, build_cache(base))


SPACE_FILE = "space.yaml"  # in the experiment directory, written before the first trial
# The train loop's per-step values worth a curve (loop._metrics, the engines' and methods' logs).
CURVES = ("loss", "clip", "distill", "logit_scale", "grad_norm", "lr")


def save_space(exp: str, space: Space, base: Config) -> None:
    """The resolved space as `<exp>/space.yaml`: grid overrides applied and `config` the full
    validated base config (S3 credentials left out). What `raytrain report` rebuilds the
    report from, and itself a space file: `raytrain sweep --space <exp>/space.yaml` reruns it."""
    config = base.model_dump(mode="json", exclude={"data": {"s3": {"access_key", "secret_key"}}})
    resolved = space.model_copy(update={"config": config, "extends": None})
    fs, path = resolve(exp)
    write_atomic(fs, posixpath.join(path, SPACE_FILE), yaml.safe_dump(resolved.model_dump(), sort_keys=False).encode())


def read_space(exp: str) -> tuple[Space, int]:
    """(space, base seed) that `save_space` wrote into the experiment directory."""
    fs, path = resolve(exp)
    shown = posixpath.join(exp, SPACE_FILE)
    try:
        space = Space.model_validate(yaml.safe_load(read_bytes(fs, posixpath.join(path, SPACE_FILE))))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{shown} does not exist: {exp} is a Tune experiment, but not one started by `raytrain sweep`"
        ) from None
    except Exception as e:  # pydantic's message names the field
        raise ConfigError(f"{shown}: {e}") from None
    return space, space.config.get("seed", Config.model_fields["seed"].default)


def load_results(exp: str):
    """The experiment's ResultGrid, as `Tuner.fit` returns it, read by Tune's ExperimentAnalysis
    from the directory alone (no trainable, no Ray cluster): each trial's config, last result,
    error and progress rows."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    try:
        return ResultGrid(ExperimentAnalysis(exp))
    except (ValueError, OSError) as e:  # ValueError: Tune found no experiment_state-*.json
        raise FileNotFoundError(f"{exp} is not a Ray Tune experiment directory: {str(e).splitlines()[0]}") from None


def report_experiment(exp: str, out_dir: str | None = None) -> Path:
    """Rebuild a sweep's report from its experiment directory alone (a finished, interrupted or
    resumed sweep); nothing is re-run. Written into the experiment directory unless `out_dir`."""
    if "://" not in exp:
        exp = os.path.abspath(os.path.expanduser(exp))  # Tune reads no relative paths
    elif out_dir is None:
        raise ConfigError(f"{exp} is not on local disk, where reports are written: give --out DIR")
    grid = load_results(exp)
    space, seed = read_space(exp)
    return write_sweep_report(grid, space, seed, out_dir)


def trial_table(grid, space: Space, base_seed: int) -> pd.DataFrame:
    """One row per trial: id, Tune's status, error, the trial's own seed, whether it was
    evaluated, grid params, final metrics, step time, skipped rows (in all and per reason) and
    the retrieval split's distinct images and captions."""
    status_of = trial_status(grid.experiment_path, grid.filesystem)
    rows = []
    for result in grid:
        params = {k: result.config.get(k) for k in space.grid}
        metrics = result.metrics or {}
        name = Path(result.path).name
        status = "ERROR" if result.error else "TERMINATED" if status_of.get(name) == "TERMINATED" else "UNFINISHED"
        rows.append(
            {
                "trial_id": name,
                "status": status,
                "error": error_summary(result.error) if result.error else None,
                "seed": trial_seed(params, space.variants, base_seed),
                # the train loop times its evaluation: eval_s is there exactly when evaluation ran
                "evaluated": "eval_s" in metrics,
                **{_column(k, space.grid): v for k, v in params.items()},
                **{m: float(metrics.get(m, float("nan"))) for m in space.metrics},
                "step_time": float(metrics.get("step_time", float("nan"))),
                **{k: metrics.get(k) for k in TRIAL_FACTS},
            }
        )
    return pd.DataFrame(rows)


# per trial, beside the space's metrics: rows skipped in training (raytrain.train.loop), the
# retrieval split's distinct images and captions (raytrain.eval.suite)
TRIAL_FACTS = ("skipped_rows", "skipped_bad_image", "skipped_empty_caption", "retrieval_images", "retrieval_captions")
RESERVED = ("trial_id", "status", "error", "seed", "evaluated", "step_time", *TRIAL_FACTS)


def _column(key: str, grid: dict) -> str:
    """A grid key's trials.csv column: its last part (`loss.order` → order) unless that is
    taken by another key or a column of the table (`data.seed` stays `data.seed`)."""
    short = key.split(".")[-1]
    clash = short in RESERVED or any(k != key and k.split(".")[-1] == short for k in grid)
    return key if clash and key != short else short


def trial_seed(params: dict[str, Any], variants: dict[str, dict[str, Any]], base_seed: int) -> int:
    """The trial's own seed, as trial_overrides resolves it: the grid's `seed`, else its
    variant's, else the base config's."""
    if "seed" in params:
        return params["seed"]
    return variants.get(params.get("variant"), {}).get("seed", base_seed)


def trial_status(exp: str, fs) -> dict[str, str]:
    """Tune's status of each trial, by trial directory name, from the experiment's state file
    (Tune's public ExperimentAnalysis): TERMINATED when the trainable returned, ERROR,
    PENDING/RUNNING/PAUSED when the sweep stopped first. A Result has no status, and the last
    result's `done` flag is not reliable (a Ray Train trial's final report may lack it)."""
    from ray.tune import ExperimentAnalysis

    return {Path(t.path).name: t.status for t in ExperimentAnalysis(exp, storage_filesystem=fs).trials}


def write_sweep_report(grid, space: Space, base_seed: int, out_dir: str | None = None) -> Path:
    """report.md, report.html, summary.json, plots and trials.csv of a ResultGrid, into the
    experiment directory unless `out_dir`: what `run_sweep` ends with and `raytrain report`
    rebuilds."""
    from raytrain.report import write_report

    exp = Path(grid.experiment_path)
    table = trial_table(grid, space, base_seed)
    curves = {Path(r.path).name: r.metrics_dataframe for r in grid if r.metrics_dataframe is not None}
    group = _column(space.group, space.grid)
    notes = [
        f"Experiment directory: `{exp}` (resume with `--resume {exp}`; "
        f"rebuild this report with `raytrain report {exp}`).",
        f"TensorBoard: `tensorboard --logdir {exp}` (one run per trial, written by Tune).",
        f"Mean per-step time over trials: {table['step_time'].mean():.3f} s.",
    ]
    baseline = space.baseline
    if baseline is not None and baseline not in set(table[group]):  # e.g. grid.variant=[cyclip] on the command line
        notes.append(f"No comparison: the baseline row {baseline!r} is not in this sweep's grid.")
        baseline = None
    return write_report(
        table,
        out_dir or exp,
        group=group,
        metrics=space.metrics,
        primary=space.primary,
        title=f"{space.name}: {', '.join(space.grid)}",
        group_label={_key(k): v for k, v in space.group_labels.items()},
        notes=notes,
        baseline=baseline,
        mode=space.mode,
        min_effect=space.min_effect,
        curves=curves,
        curve_metrics=CURVES,
        facet=None if space.facet is None else _column(space.facet, space.grid),
    )


def _key(k):
    try:
        return int(k)
    except (TypeError, ValueError):
        return k
