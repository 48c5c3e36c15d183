"""Sweep reports: per-group summary tables, plots and the raw trial table.

A sweep (e.g. one Ray Tune trial per ranking order R and seed) ends with a
DataFrame of trials; `write_report` turns it into `report.md`, one PNG of
every metric against the group, and `trials.csv`.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

BASE_COLUMNS = ("trial_id", "status", "error", "seed")
FINISHED = "TERMINATED"


def write_report(trials: pd.DataFrame, out_dir, *, group: str, metrics: list[str], primary: str,
                 title: str, group_label: dict | None = None, notes: list[str] = (),
                 baseline=None) -> Path:
    """Write `report.md`, `metrics_vs_<group>.png` and `trials.csv` into `out_dir`.

    Only TERMINATED trials count towards a group's mean, std (over seeds,
    ddof=0) and `n`; every other trial is listed under "Failed trials".
    A group whose trials all failed still gets a row, with "failed" cells.
    `baseline` (a group value) adds a table of mean differences against it.
    Returns the path of `report.md`.
    """
    _validate(trials, group, metrics, primary)
    groups = sorted(trials[group].unique())
    if baseline is not None and baseline not in groups:
        raise ValueError(f"baseline {baseline!r} is not a value of column {group!r}")
    labels = {g: str((group_label or {}).get(g, g)) for g in groups}

    ok = trials[trials["status"] == FINISHED]
    by = ok.groupby(group)
    mean = by[metrics].mean().reindex(groups)
    std = by[metrics].std(ddof=0).reindex(groups)
    n = by.size().reindex(groups, fill_value=0)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = f"metrics_vs_{_safe(group)}.png"
    _atomic(out / "trials.csv", "w", lambda f: trials.to_csv(f, index=False))
    fig = _plot(mean, std, group, metrics, labels, title)
    _atomic(out / png, "wb", lambda f: fig.savefig(f, format="png", dpi=120))

    lines = [f"# {title}", ""]
    lines += [f"{len(trials)} trials: {len(ok)} finished, {len(trials) - len(ok)} failed. "
              f"Cells are mean ± std over finished seeds (std with ddof=0).", ""]
    lines += _summary_table(mean, std, n, group, metrics, labels)
    lines += ["", _best_sentence(mean, std, n, group, primary, labels), ""]
    if baseline is not None:
        lines += [f"## Difference vs {_cell(labels[baseline])}", ""]
        lines += _delta_table(mean, group, metrics, labels, baseline)
        lines.append("")
    lines += ["## Failed trials", ""]
    lines += _failed_section(trials, group)
    lines += ["", "## Plots", "", f"![metrics vs {group}]({png})", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    path = out / "report.md"
    # Written last, so a report that exists always points at a finished PNG and CSV.
    _atomic(path, "w", lambda f: f.write("\n".join(lines)))
    return path


def _validate(trials, group, metrics, primary):
    """Raise ValueError naming the first missing column or a bad argument."""
    if not metrics:
        raise ValueError("metrics must name at least one column")
    if primary not in metrics:
        raise ValueError(f"primary metric {primary!r} is not in metrics {metrics!r}")
    for col in (*BASE_COLUMNS, group, *metrics):
        if col not in trials.columns:
            raise ValueError(f"trials has no column {col!r}")


def _safe(name):
    """File-name-safe version of a column name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))


def _cell(text):
    """Escape text for a Markdown table cell (a bare '|' would split the cell)."""
    return str(text).replace("|", "\\|")


def _atomic(path, mode, write):
    """Call write(file) on a temp file beside `path`, then rename it into place.

    os.replace is atomic within one directory, so readers never see a half-written file.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _table(header, rows):
    """Markdown table lines from a header and rows of cell strings."""
    return ["| " + " | ".join(header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def _summary_table(mean, std, n, group, metrics, labels):
    """One row per group: label, `mean ± std` per metric, n finished."""
    rows = []
    for g in mean.index:
        cells = [("failed" if math.isnan(mean.at[g, m])
                  else f"{mean.at[g, m]:.3f} ± {std.at[g, m]:.3f}") for m in metrics]
        rows.append([_cell(labels[g]), *cells, str(n[g])])
    return _table([_cell(group), *map(_cell, metrics), "n"], rows)


def _delta_table(mean, group, metrics, labels, baseline):
    """One row per group: signed mean difference vs the baseline group per metric."""
    rows = []
    for g in mean.index:
        deltas = mean.loc[g, metrics] - mean.loc[baseline, metrics]
        rows.append([_cell(labels[g]), *("failed" if math.isnan(d) else f"{d:+.3f}" for d in deltas)])
    return _table([_cell(group), *(f"Δ {_cell(m)}" for m in metrics)], rows)


def _best_sentence(mean, std, n, group, primary, labels):
    """Sentence naming the group with the highest mean `primary`."""
    col = mean[primary].dropna()
    if col.empty:
        return f"No {group} has a finished trial, so there is no best {group} by `{primary}`."
    best = col.idxmax()
    return (f"Best {group} by `{primary}`: **{labels[best]}** "
            f"({mean.at[best, primary]:.3f} ± {std.at[best, primary]:.3f}, n={n[best]}).")


def _failed_section(trials, group):
    """Table of every trial that did not finish, with the first line of its error."""
    bad = trials[trials["status"] != FINISHED]
    if bad.empty:
        return ["None."]
    rows = []
    for _, t in bad.iterrows():
        err = t["error"]
        first = str(err).strip().splitlines()[0] if isinstance(err, str) and err.strip() else "(no error message)"
        rows.append([_cell(t["trial_id"]), _cell(t[group]), _cell(t["seed"]),
                     _cell(t["status"]), _cell(first)])
    return _table(["trial_id", _cell(group), "seed", "status", "error"], rows)


def _plot(mean, std, group, metrics, labels, title):
    """Figure with one subplot per metric: mean ± std (error bars) against the group.

    Uses the OO Figure API with an Agg canvas so no global pyplot state is touched.
    """
    cols = min(4, len(metrics))  # a grid, so many metrics stay readable
    rows = -(-len(metrics) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.6 * rows), layout="tight")
    FigureCanvasAgg(fig)
    numeric = pd.api.types.is_numeric_dtype(mean.index) and not pd.api.types.is_bool_dtype(mean.index)
    # String groups get evenly spaced bars; numeric groups keep their real spacing.
    xs = list(mean.index) if numeric else list(range(len(mean.index)))
    # Tilt long tick labels (e.g. "1 (RankCLIP)", method names) so neighbours don't overlap.
    tilt = not numeric or max(map(len, labels.values()), default=0) > 4
    # Explicit x-range: autoscaling ignores NaN points, so an all-failed group at
    # either end would fall off the axes along with its "failed" marker.
    lo, hi = min(xs, default=0), max(xs, default=0)
    pad = 0.1 * ((hi - lo) or 1) if numeric else 0.6
    for i, m in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, i + 1)
        if numeric:
            ax.errorbar(xs, mean[m], yerr=std[m], marker="o", capsize=4)
        else:
            ax.bar(xs, mean[m], yerr=std[m], capsize=4, color="tab:blue", alpha=0.8)
        for x, v in zip(xs, mean[m]):
            if math.isnan(v):  # otherwise an all-failed group just looks missing
                ax.text(x, 0.02, "failed", transform=ax.get_xaxis_transform(),
                        ha="center", color="tab:red", fontsize=8)
        ax.set_xticks(xs, [labels[g] for g in mean.index], rotation=30 if tilt else 0,
                      ha="right" if tilt else "center", fontsize=8)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_xlabel(group)
        ax.set_ylabel(m)
        ax.set_title(m, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return fig
