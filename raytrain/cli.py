"""`raytrain` command line: thin wrappers over the library (the jobs/ call these too)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from raytrain.config import ConfigError, load_config
from raytrain.data.schema import SchemaError
from raytrain.data.sources import StorageError
from raytrain.log import log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raytrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sweep = sub.add_parser("sweep", help="run a Tune space (order sweep, ablations, baselines) and write its report")
    sweep.add_argument("--space", help="space file (tune_spaces/*.yaml; default: tune_spaces/order_sweep.yaml)")
    sweep.add_argument(
        "--resume",
        metavar="EXPERIMENT_DIR",
        help="resume an interrupted sweep from its directory, with the space, config and grid it was started with",
    )
    sweep.add_argument(
        "--profile",
        action="append",
        default=[],
        metavar="FILE",
        help="config fragment for the machine (tune_spaces/profiles/*.yaml: scale, GPUs, CPUs per worker); repeatable",
    )
    sweep.add_argument(
        "overrides", nargs="*", help="dotted config overrides (train.lr=1e-3) or grid axes (grid.seed=[0])"
    )

    rep = sub.add_parser(
        "report", help="rebuild a sweep's report (report.md, report.html) from its experiment directory; runs nothing"
    )
    rep.add_argument(
        "experiment", help="the sweep's Ray Tune experiment directory (<run.storage_path>/<space name>-<time>)"
    )
    rep.add_argument("--out", help="write the report here (default: into the experiment directory)")

    cache = sub.add_parser("cache", help="build (or resume) the teacher cache for a config")
    cache.add_argument("--config", help="YAML config file (default: the built-in defaults)")
    cache.add_argument("overrides", nargs="*", help="dotted config overrides (cache.teachers=[dinov3,text])")

    export = sub.add_parser(
        "export", help="write a checkpoint's student as safetensors + config (no Ray needed to use it)"
    )
    export.add_argument("checkpoint", help="a trial checkpoint directory (holds model.pt and config.json)")
    export.add_argument("--out", required=True, help="output directory")

    ev = sub.add_parser(
        "eval",
        help="score a checkpoint or exported student on the eval suite (eval.tasks): "
        "a JSON per task in clip_benchmark's layout, and summary.md",
    )
    ev.add_argument(
        "model",
        help="a trial checkpoint directory (model.pt + config.json) "
        "or an exported student (model.safetensors + config.json)",
    )
    ev.add_argument(
        "--config", help="YAML config file whose eval section lists the tasks (default: the embedded evaluation splits)"
    )
    ev.add_argument("--out", default="results/eval", help="output directory, local or s3:// (default: results/eval)")
    ev.add_argument(
        "--parallel", action="store_true", help="run the tasks as Ray tasks (eval.num_cpus / eval.num_gpus each)"
    )
    ev.add_argument(
        "overrides",
        nargs="*",
        help="dotted config overrides "
        "(eval.device=cpu, eval.tasks=[{name: c10, kind: zeroshot, format: cifar10, path: data/}])",
    )

    conf = sub.add_parser("config", help="the configuration reference: every key, its type, default and meaning")
    conf.add_argument("--out", help="write it to this Markdown file (default: print it)")

    data = sub.add_parser("data", help="generate the embedded default dataset")
    data.add_argument("out_dir")
    data.add_argument("--n-train", type=int, default=4096)
    data.add_argument("--n-eval", type=int, default=256)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--image-size", type=int, default=32)

    args = parser.parse_args(argv)
    return reported(lambda: COMMANDS[args.command](args))


def reported(run: Callable[[], object]) -> int:
    """Exit status of `run()`: 0, or 2 after one logged line when it raises an error the user can
    fix (config, data schema, storage, a missing file, curation); anything else is a bug and
    keeps its traceback."""
    from raytrain.data.curation import CurationError

    try:
        run()
    except (ConfigError, SchemaError, StorageError, FileNotFoundError, CurationError) as e:  # CacheMismatch: Config
        log.error(f"error: {e}")
        return 2
    return 0


def _sweep(args) -> None:
    from raytrain.tune.sweep import run_sweep

    space = args.space or (None if args.resume else "tune_spaces/order_sweep.yaml")
    log.info(f"report written to {run_sweep(space, args.overrides, args.resume, args.profile)}")


def _report(args) -> None:
    from raytrain.tune.sweep import report_experiment

    log.info(f"report written to {report_experiment(args.experiment, args.out)}")


def _cache(args) -> None:
    from raytrain.teachers.cache import build_cache

    build_cache(load_config(args.config, args.overrides))


def _export(args) -> None:
    from raytrain.export import export

    log.info(f"student exported to {export(args.checkpoint, args.out)}")


def _eval(args) -> None:
    from raytrain.eval.run import run_eval

    summary = run_eval(args.model, load_config(args.config, args.overrides), args.out, args.parallel)
    log.info(f"evaluation written to {summary}")


def _data(args) -> None:
    from raytrain.data.synthetic import make_dataset

    manifest = make_dataset(args.out_dir, args.n_train, args.n_eval, args.seed, args.image_size)
    log.info(f"dataset in {args.out_dir}: {manifest['counts']}")


REFERENCE_HEAD = """# Configuration reference

Every key of the config tree, with its type, default and meaning; generated from the schema
(`raytrain/config.py` and each method's own section in `raytrain/methods/`) by
`raytrain config --out docs/configuration.md`. Keys are set in YAML files, in a space file's
`config`, or as dotted overrides on the command line (`train.epochs=8`); unknown keys and
out-of-range values are refused before anything runs, naming the key.
"""


def reference_markdown() -> str:
    """The configuration reference: the top-level values, then a table per section."""
    from raytrain.config import config_model
    from raytrain.tree import reference

    parts, rows = [REFERENCE_HEAD, "## Top level"], []
    for key, kind, default, meaning in reference(config_model()):
        if not kind and "." not in key:  # a section: the table so far, then its heading
            parts += [_table(rows), f"## `{key}`\n\n{meaning}"]
            rows = []
        else:
            rows.append([f"`{key}`", f"`{kind}`" if kind else "section", f"`{default}`" if kind else "", meaning])
    return "\n\n".join([*parts, _table(rows)]) + "\n"


def _table(rows: list[list[str]]) -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows])


def _config(args) -> None:
    text = reference_markdown()
    if args.out:
        Path(args.out).write_text(text)
        log.info(f"configuration reference written to {args.out}")
    else:
        print(text, end="")


COMMANDS = {"sweep": _sweep, "report": _report, "cache": _cache, "export": _export, "eval": _eval, "data": _data}
COMMANDS["config"] = _config


if __name__ == "__main__":
    sys.exit(main())
