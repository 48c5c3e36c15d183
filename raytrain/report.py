"""Sweep reports: per-group summary tables, plots and the raw trial table.

A sweep (e.g. one Ray Tune trial per ranking order R and seed) ends with a
DataFrame of trials; `write_report` turns it into `report.md` (beside its PNG
plots), `report.html` (one self-contained page, plots inlined) and `trials.csv`.
Both reports render one list of blocks, so they always say the same thing.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
import tempfile
from pathlib import Path

import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

BASE_COLUMNS = ("trial_id", "status", "error", "seed")
FINISHED = "TERMINATED"


def write_report(
    trials: pd.DataFrame,
    out_dir,
    *,
    group: str,
    metrics: list[str],
    primary: str,
    title: str,
    group_label: dict | None = None,
    notes: list[str] = (),
    baseline=None,
    curves: dict[str, pd.DataFrame] | None = None,
    curve_metrics: list[str] = ("loss",),
) -> Path:
    """Write `report.md`, `report.html`, the PNG plots and `trials.csv` into `out_dir`.

    Only TERMINATED trials count towards a group's mean, std (over seeds,
    ddof=0) and `n`; every other trial is listed under "Failed trials".
    A group whose trials all failed still gets a row, with "failed" cells.
    `baseline` (a group value) adds a table and a bar chart of mean differences against it.
    `curves` maps trial_id → that trial's reported results (Tune's progress.csv rows);
    each of `curve_metrics` found there is drawn against `step` (else Tune's
    `training_iteration`), one line per trial coloured by group.
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

    # (file name, alt text, caption, figure); every plot goes to both reports
    plots = [
        (
            f"metrics_vs_{_safe(group)}.png",
            f"metrics vs {group}",
            "Mean ± std over finished seeds.",
            _plot(mean, std, n, group, metrics, labels, title),
        )
    ]
    if baseline is not None:
        plots.append(
            (
                f"delta_vs_{_safe(baseline)}.png",
                f"difference vs {labels[baseline]}",
                f"Mean minus the mean of {labels[baseline]}; error bars √(std² + std of {labels[baseline]}²).",
                _delta_plot(mean, std, metrics, labels, baseline, title),
            )
        )
    curve_fig = _curve_plot(trials, curves or {}, group, labels, list(curve_metrics), title)
    if curve_fig is not None:
        plots.append(
            (
                "training_curves.png",
                "training curves",
                "Every trial's reported values against its step, coloured by "
                f"{group}; dashed, ending in ×: a trial that did not finish.",
                curve_fig,
            )
        )
    pngs = {name: _png(fig) for name, _, _, fig in plots}

    failed = len(trials) - len(ok)
    blocks = [
        ("h1", title),
        (
            "p",
            f"{len(trials)} trials: {len(ok)} finished, {failed} failed. "
            f"Cells are mean ± std over finished seeds (std with ddof=0); n/a: the "
            f"group's trials finished without reporting that metric.",
        ),
        ("table", *_summary_table(mean, std, n, group, metrics, labels)),
        ("p", _best_sentence(mean, std, n, group, primary, labels)),
    ]
    if baseline is not None:
        blocks += [
            ("h2", f"Difference vs {labels[baseline]}"),
            ("table", *_delta_table(mean, n, group, metrics, labels, baseline)),
        ]
    blocks += [("h2", "Failed trials"), *_failed_section(trials, group), ("h2", "Plots")]
    blocks += [("img", name, alt, caption) for name, alt, caption, _ in plots]
    if notes:
        blocks += [("h2", "Notes"), ("ul", list(notes))]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic(out / "trials.csv", "w", lambda f: trials.to_csv(f, index=False))
    for name, data in pngs.items():
        _atomic(out / name, "wb", lambda f, data=data: f.write(data))
    _atomic(out / "report.html", "w", lambda f: f.write(_html(title, blocks, pngs)))
    path = out / "report.md"
    # Written last, so a report that exists always points at a finished PNG and CSV.
    _atomic(path, "w", lambda f: f.write(_markdown(blocks)))
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
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the report from everyone else on shared storage
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ---- the document: blocks ("h1"/"h2"/"p", text), ("table", header, rows), ("ul", items),
# ("img", file, alt, caption); text may hold Markdown's **bold** and `code` --------------------


def _markdown(blocks) -> str:
    parts = []
    for kind, *args in blocks:
        if kind in ("h1", "h2"):
            parts.append("#" * int(kind[1]) + " " + args[0])
        elif kind == "p":
            parts.append(args[0])
        elif kind == "table":
            header, rows = args
            parts.append(
                "\n".join(
                    [
                        "| " + " | ".join(map(_cell, header)) + " |",
                        "|" + "|".join("---" for _ in header) + "|",
                        *("| " + " | ".join(map(_cell, row)) + " |" for row in rows),
                    ]
                )
            )
        elif kind == "ul":
            parts.append("\n".join(f"- {item}" for item in args[0]))
        elif kind == "img":
            name, alt, caption = args
            parts.append(f"![{alt}]({name})\n\n{caption}")
    return "\n\n".join(parts) + "\n"


STYLE = """body{font:15px/1.45 system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}code{background:#f3f3f3;padding:0 3px}
figure{margin:1.5em 0}img{max-width:100%;height:auto;border:1px solid #eee}figcaption{color:#555;font-size:13px}"""

# Sets <html data-plots="N ok"> once every plot has loaded and decoded (naturalWidth > 0), or
# "broken": tests (and a reader's devtools) can tell a page whose images render.
CHECK_IMAGES = """addEventListener("load", () => {
  const imgs = [...document.images], ok = imgs.filter(i => i.complete && i.naturalWidth > 0);
  document.documentElement.dataset.plots = ok.length === imgs.length ? `${ok.length} ok` : "broken";
});"""


def _inline(text) -> str:
    """HTML of a text with Markdown's **bold** and `code`."""
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(str(text), quote=False))
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)


def _html(title, blocks, pngs) -> str:
    """One self-contained page: plots as base64 data URIs, no external file or script."""
    body = []
    for kind, *args in blocks:
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{_inline(args[0])}</{kind}>")
        elif kind == "table":
            header, rows = args
            body.append(
                "<table><thead><tr>"
                + "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
                + "</tr></thead><tbody>"
                + "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
                + "</tbody></table>"
            )
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in args[0]) + "</ul>")
        elif kind == "img":
            name, alt, caption = args
            data = base64.b64encode(pngs[name]).decode("ascii")
            body.append(
                f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{_inline(caption)}</figcaption></figure>"
            )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
        f"<style>{STYLE}</style>\n<script>{CHECK_IMAGES}</script></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


# ---- sections ----------------------------------------------------------------------------


def _summary_table(mean, std, n, group, metrics, labels):
    """(header, rows): one row per group: label, `mean ± std` per metric, n finished."""
    rows = []
    for g in mean.index:
        cells = [
            (_missing(n, g) if math.isnan(mean.at[g, m]) else f"{mean.at[g, m]:.3f} ± {std.at[g, m]:.3f}")
            for m in metrics
        ]
        rows.append([labels[g], *cells, str(n[g])])
    return [group, *metrics, "n"], rows


def _missing(n, g) -> str:
    """What an empty cell means: the group has no finished trial, or its finished trials did
    not report the metric (e.g. an injection metric of a row without injection)."""
    return "failed" if n[g] == 0 else "n/a"


def _delta_table(mean, n, group, metrics, labels, baseline):
    """(header, rows): one row per group: signed mean difference vs the baseline group per metric."""
    rows = []
    for g in mean.index:
        deltas = mean.loc[g, metrics] - mean.loc[baseline, metrics]
        missing = "failed" if min(n[g], n[baseline]) == 0 else "n/a"
        rows.append([labels[g], *(missing if math.isnan(d) else f"{d:+.3f}" for d in deltas)])
    return [group, *(f"Δ {m}" for m in metrics)], rows


def _best_sentence(mean, std, n, group, primary, labels):
    """Sentence naming the group with the highest mean `primary`."""
    col = mean[primary].dropna()
    if col.empty:
        return f"No {group} has a finished trial, so there is no best {group} by `{primary}`."
    best = col.idxmax()
    return (
        f"Best {group} by `{primary}`: **{labels[best]}** "
        f"({mean.at[best, primary]:.3f} ± {std.at[best, primary]:.3f}, n={n[best]})."
    )


def _failed_section(trials, group):
    """Blocks: a table of every trial that did not finish, with the first line of its error."""
    bad = trials[trials["status"] != FINISHED]
    if bad.empty:
        return [("p", "None.")]
    rows = []
    for _, t in bad.iterrows():
        err = t["error"]
        first = str(err).strip().splitlines()[0] if isinstance(err, str) and err.strip() else "(no error message)"
        rows.append([t["trial_id"], t[group], t["seed"], t["status"], first])
    return [("table", ["trial_id", group, "seed", "status", "error"], rows)]


# ---- plots (the OO Figure API with an Agg canvas: no global pyplot state is touched) --------


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def _grid(count, width, height, title):
    """Figure with room for `count` subplots, at most 4 a row (many metrics stay readable),
    and a function making the i-th subplot. The constrained layout keeps the title, tilted
    tick labels and an outside legend clear of each other."""
    cols = min(4, count)
    rows = -(-count // cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title)
    return fig, lambda i: fig.add_subplot(rows, cols, i + 1)


def _plot(mean, std, n, group, metrics, labels, title):
    """Figure with one subplot per metric: mean ± std (error bars) against the group."""
    fig, subplot = _grid(len(metrics), 4.2, 3.6, title)
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
        ax = subplot(i)
        if numeric:
            ax.errorbar(xs, mean[m], yerr=std[m], marker="o", capsize=4)
        else:
            ax.bar(xs, mean[m], yerr=std[m], capsize=4, color="tab:blue", alpha=0.8)
        for x, g, v in zip(xs, mean.index, mean[m]):
            if math.isnan(v):  # otherwise an all-failed group just looks missing
                ax.text(
                    x,
                    0.02,
                    _missing(n, g),
                    transform=ax.get_xaxis_transform(),
                    ha="center",
                    color="tab:red" if n[g] == 0 else "grey",
                    fontsize=8,
                )
        ax.set_xticks(
            xs,
            [labels[g] for g in mean.index],
            rotation=30 if tilt else 0,
            ha="right" if tilt else "center",
            fontsize=8,
        )
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_xlabel(group)
        ax.set_ylabel(m)
        ax.set_title(m, fontsize=10)
        ax.grid(alpha=0.3)
    return fig


def _delta_plot(mean, std, metrics, labels, baseline, title):
    """One horizontal bar chart per metric: each group's mean minus the baseline's."""
    others = [g for g in mean.index if g != baseline]
    fig, subplot = _grid(len(metrics), 4.2, 1.2 + 0.32 * max(len(others), 1), f"{title}: Δ vs {labels[baseline]}")
    ys = list(range(len(others)))
    for i, m in enumerate(metrics):
        ax = subplot(i)
        delta = [mean.at[g, m] - mean.at[baseline, m] for g in others]
        # the std of a difference of two independent seeds' values
        err = [math.hypot(std.at[g, m], std.at[baseline, m]) for g in others]
        # sign colours, not good/bad ones: for some metrics (loss, gap) lower is better
        colors = ["tab:blue" if d >= 0 else "tab:orange" for d in delta]
        ax.barh(ys, delta, xerr=err, capsize=3, color=colors, alpha=0.8)
        for y, d in zip(ys, delta):
            if math.isnan(d):
                ax.text(0.02, y, "failed", transform=ax.get_yaxis_transform(), va="center", color="tab:red", fontsize=8)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(ys, [labels[g] for g in others], fontsize=8)
        ax.invert_yaxis()  # rows read top-down in the tables' order
        ax.set_title(f"Δ {m}", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    return fig


def _curve_plot(trials, curves, group, labels, curve_metrics, title):
    """One subplot per curve metric that some trial reported at two steps or more; None if none."""
    frames = {}
    for tid, frame in curves.items():
        x = "step" if "step" in frame.columns else "training_iteration"
        if x in frame.columns:
            # A trial restored from a checkpoint repeats steps; the last value of a step wins.
            frames[tid] = frame.drop_duplicates(x, keep="last").sort_values(x).set_index(x)
    shown = [m for m in curve_metrics if any(m in f.columns and f[m].notna().sum() >= 2 for f in frames.values())]
    if not shown:
        return None
    groups = sorted(trials[group].unique())
    cmap = colormaps["tab10" if len(groups) <= 10 else "tab20"]
    color = {g: cmap(i % cmap.N) for i, g in enumerate(groups)}
    fig, subplot = _grid(len(shown), 4.6, 3.4, f"{title}: training curves")
    for i, m in enumerate(shown):
        ax = subplot(i)
        for _, t in trials.iterrows():
            f = frames.get(t["trial_id"])
            if f is None or m not in f.columns or f[m].isna().all():
                continue
            y = f[m].dropna()
            done = t["status"] == FINISHED
            # an x where a trial stopped, so one that died at its first report still shows
            ax.plot(
                y.index,
                y,
                color=color[t[group]],
                linewidth=1,
                alpha=0.8,
                linestyle="-" if done else "--",
                marker=None if done else "x",
                markevery=[len(y) - 1],
            )
        ax.set_xlabel(frames[next(iter(frames))].index.name)
        ax.set_title(m, fontsize=10)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=color[g], label=labels[g]) for g in groups]
    if (trials["status"] != FINISHED).any():
        handles.append(Line2D([], [], color="gray", linestyle="--", marker="x", label="did not finish"))
    fig.legend(handles=handles, title=group, loc="outside right upper", fontsize=8)
    return fig
