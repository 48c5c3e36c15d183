"""Sweep reports: per-group summary tables, paired comparisons with the baseline, plots and
the raw trial table.

A sweep (e.g. one Ray Tune trial per ranking order R and seed) ends with a
DataFrame of trials; `write_report` turns it into `report.md` (beside its PNG
plots), `report.html` (one self-contained page, plots inlined), `summary.json` (the
same numbers for machines) and `trials.csv`. Both reports render one list of blocks,
so they always say the same thing.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from raytrain.data.sources import write_atomic
from raytrain.stats import compare_groups

LOCAL = pafs.LocalFileSystem()

BASE_COLUMNS = ("trial_id", "status", "error", "seed", "evaluated")
FINISHED = "TERMINATED"
ALPHA = 0.05  # the comparisons' level: 95 % intervals, Holm p < 0.05
# per-trial facts a report states when trials.csv has them (raytrain.tune.sweep.trial_table)
SKIPS = {"skipped_bad_image": "an image that did not decode", "skipped_empty_caption": "an empty caption"}
RETRIEVAL = ("retrieval_images", "retrieval_captions")
# what became of a trial (`_outcomes`), in the report's words
EVALUATED, NOT_EVALUATED, FAILED, UNFINISHED = (
    "finished and evaluated",
    "finished, not evaluated",
    "failed",
    "unfinished",
)
OUTCOMES = (EVALUATED, NOT_EVALUATED, FAILED, UNFINISHED)


def _key(outcome: str) -> str:
    """summary.json's name of an outcome: finished_and_evaluated, finished_not_evaluated, ..."""
    return re.sub(r"\W+", "_", outcome)


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
    mode: str = "max",
    min_effect: float = 0.0,
    curves: dict[str, pd.DataFrame] | None = None,
    curve_metrics: list[str] = ("loss",),
    facet: str | None = None,
) -> Path:
    """Write `report.md`, `report.html`, `summary.json`, the PNG plots and `trials.csv` into `out_dir`.

    `trials` has one row per trial: BASE_COLUMNS (`status` is Tune's: TERMINATED = finished;
    `evaluated`: its final result holds evaluation metrics; `seed`: the trial's own seed),
    the `group` column and the `metrics`. A trial is counted as finished and evaluated,
    finished but not evaluated, failed (ERROR) or unfinished (anything else).

    The summary table: per group and metric, mean ± std (ddof=1) over the group's finished
    trials that reported the metric; n = its finished and evaluated trials. With a
    `baseline` (a group value), every other group is compared with it by
    `raytrain.stats.compare_groups`, paired by seed (trials with one seed share init and
    data order; several trials of one group and seed are averaged first): a table of the
    paired differences of `primary` (diff, 95 % CI, p, Holm p), one of every metric, a plot
    of them (error bars = the CIs), and the verdict sentence; `mode` says whether a higher or
    lower `primary` is better and `min_effect` how large a difference must be to count.
    `summary.json` holds the same numbers. `curves` maps trial_id → that trial's reported
    results (Tune's progress.csv rows); each of `curve_metrics` found there is drawn against
    `step` (else `training_iteration`), one line per trial coloured by group.

    `facet` (a column): the trials are split by its values and each part gets its own
    section (summary table, comparison with the baseline, verdict, plots), as if each were a
    sweep of its own; summary.json then holds them under "facets" (value → "groups",
    "comparison", "comparisons") instead of at its top level.
    Returns the path of `report.md`.
    """
    _validate(trials, group, metrics, primary, mode, min_effect)
    if facet is not None and facet not in trials.columns:
        raise ValueError(f"trials has no column {facet!r}")
    groups = sorted(trials[group].unique())
    if baseline is not None and baseline not in groups:
        raise ValueError(f"baseline {baseline!r} is not a value of column {group!r}")
    labels = {g: str((group_label or {}).get(g, g)) for g in groups}

    outcome = _outcomes(trials)
    ok = trials[trials["status"] == FINISHED]
    measured, facts = _measured(trials, ok)
    args = (group, metrics, primary, labels, baseline, mode, min_effect, title)
    values = sorted(trials[facet].unique()) if facet is not None else []
    if facet is None:
        sections = [_section(trials, outcome, None, *args)]
    else:
        sections = [_section(trials[trials[facet] == v], outcome, (facet, v), *args) for v in values]
    # (file name, alt text, caption, figure); every plot goes to both reports
    plots = [p for section in sections for p in section[1]]
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

    blocks = [
        ("h1", title),
        ("p", _counts_sentence(outcome)),
        *(("p", text) for text in measured),
        (
            "p",
            "Cells are mean ± std (ddof=1; a single value has none) over the group's finished trials that "
            "reported the metric; n: its finished and evaluated trials ((n=k) in a cell: k trials reported "
            "that metric); "
            "not evaluated: the group's finished trials were not evaluated and did not report the metric; "
            "n/a: its evaluated trials did not report it.",
        ),
    ]
    if facet is not None:
        blocks.append(
            ("p", f"The trials are split by `{facet}`: each value has its own table, comparison and verdict.")
        )
    for section_blocks, _, _ in sections:
        blocks += section_blocks
    blocks += [("h2", "Failed, unfinished and unevaluated trials"), *_failed_section(trials, outcome, group)]
    blocks += [("h2", "Plots")]
    blocks += [("img", name, alt, caption) for name, alt, caption, _ in plots]
    if notes:
        blocks += [("h2", "Notes"), ("ul", list(notes))]
    summary = {
        "group": group,
        "baseline": baseline,
        "primary": primary,
        "mode": mode,
        "min_effect": min_effect,
        "alpha": ALPHA,
        "trials": {"total": len(trials), **{_key(k): int((outcome == k).sum()) for k in OUTCOMES}},
        "measured": facts,  # retrieval split sizes seen; skipped rows summed over the finished trials
    }
    if facet is None:
        summary.update(sections[0][2])
    else:
        summary.update(facet=facet, facets={v: part for v, (_, _, part) in zip(values, sections)})

    out = Path(out_dir)
    files = {
        "trials.csv": trials.to_csv(index=False).encode(),
        **pngs,
        "summary.json": json.dumps(_plain(summary), indent=1, allow_nan=False).encode(),
        "report.html": _html(title, blocks, pngs).encode(),
        # last, so a report that exists always points at a finished PNG and CSV
        "report.md": _markdown(blocks).encode(),
    }
    for name, data in files.items():
        write_atomic(LOCAL, str(out / name), data)
    return out / "report.md"


def _section(trials, outcome, where, group, metrics, primary, labels, baseline, mode, min_effect, title):
    """(blocks, plots, summary part) of the trials of one facet value (`where` = (facet,
    value)) or of the whole sweep (`where` None): the summary table and, with a baseline, the
    comparisons and the verdict."""
    outcome = outcome[trials.index]
    ok = trials[trials["status"] == FINISHED]
    groups = sorted(trials[group].unique())
    by = ok.groupby(group)
    mean = by[metrics].mean().reindex(groups)
    std = by[metrics].std(ddof=1).reindex(groups)
    count = by[metrics].count().reindex(groups, fill_value=0)
    n = trials[outcome == EVALUATED].groupby(group).size().reindex(groups, fill_value=0)
    missing = {g: _missing(trials[trials[group] == g], outcome) for g in groups}
    if baseline not in groups:
        baseline = None

    comparisons = {}
    if baseline is not None:
        for m in metrics:
            values = {g: _by_seed(ok[ok[group] == g], m) for g in groups}
            comparisons[m] = compare_groups(
                values, baseline, mode=mode, min_effect=min_effect, alpha=ALPHA, noun=group, labels=labels
            )

    name = "" if where is None else f"{where[0]} = {where[1]}"
    suffix = "" if where is None else f"_{_safe(where[0])}_{_safe(where[1])}"
    shown = title if where is None else f"{title} ({name})"
    plots = [
        (
            f"metrics_vs_{_safe(group)}{suffix}.png",
            f"metrics vs {group}" + (f", {name}" if name else ""),
            "Mean ± std (ddof=1) over finished seeds" + (f", {name}." if name else "."),
            _plot(mean, std, missing, group, metrics, labels, shown),
        )
    ]
    if len(groups) > 1 and comparisons:
        plots.append(
            (
                f"delta_vs_{_safe(baseline)}{suffix}.png",
                f"difference vs {labels[baseline]}" + (f", {name}" if name else ""),
                f"Mean paired difference (per seed) from {labels[baseline]}; error bars: its 95 % CI "
                "(none with fewer than 2 paired seeds)" + (f"; {name}." if name else "."),
                _delta_plot(comparisons, metrics, labels, baseline, shown),
            )
        )

    head = "h2" if where is None else "h3"
    blocks = [] if where is None else [("h2", f"`{where[0]}` = {where[1]}")]
    blocks.append(("table", *_summary_table(mean, std, count, n, missing, group, metrics, labels)))
    if comparisons:
        blocks += [
            (head, f"Compared with {group} {labels[baseline]}" + (f", {name}" if name else "")),
            ("p", _method_sentence(ok, group, labels, baseline, primary, mode, min_effect)),
            ("p", f"**Verdict on `{primary}`:** " + _verdict(comparisons[primary], ok, primary, outcome)),
        ]
    if len(groups) > 1 and comparisons:
        unbounded = any(math.isinf(r["ci"][0]) for c in comparisons.values() for r in c["pairs"].values())
        blocks += [
            (
                "table",
                *_paired_table(comparisons[primary], primary, labels, count, missing, baseline, min_effect, mode),
            ),
            (
                "p",
                "Every metric, paired with the same seeds: mean difference ± the half-width of its 95 % "
                f"interval; * Holm p < {ALPHA:g} (Holm corrects within a metric, over the {group}s, not "
                "across metrics: the columns other than the primary are for reading, not for verdicts)."
                + (
                    " ± inf: the differences were equal on every seed, which so few seeds cannot bound."
                    if unbounded
                    else ""
                ),
            ),
            ("table", *_delta_table(comparisons, group, metrics, labels, count, missing, baseline)),
        ]
    if not comparisons:
        blocks.append(("p", _no_baseline_sentence(group)))
    summary = {
        "groups": {
            g: {
                "label": labels[g],
                "n": int(n[g]),
                "metrics": {m: {"mean": mean.at[g, m], "std": std.at[g, m], "n": int(count.at[g, m])} for m in metrics},
            }
            for g in groups
        },
        "comparison": comparisons.get(primary),  # compare_groups' dict of the primary metric
        "comparisons": {m: c["pairs"] for m, c in comparisons.items()},  # every metric's paired differences
    }
    return blocks, plots, summary


def _validate(trials, group, metrics, primary, mode, min_effect):
    """Raise ValueError naming the first missing column or a bad argument."""
    if not metrics:
        raise ValueError("metrics must name at least one column")
    if primary not in metrics:
        raise ValueError(f"primary metric {primary!r} is not in metrics {metrics!r}")
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    if not min_effect >= 0:
        raise ValueError(f"min_effect must be ≥ 0, got {min_effect}")
    for col in (*BASE_COLUMNS, group, *metrics):
        if col not in trials.columns:
            raise ValueError(f"trials has no column {col!r}")


def _safe(name):
    """File-name-safe version of a column name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))


def _cell(text):
    """Escape text for a Markdown table cell (a bare '|' would split the cell)."""
    return str(text).replace("|", "\\|")


# ---- the document: blocks ("h1"/"h2"/"h3"/"p", text), ("table", header, rows), ("ul", items),
# ("img", file, alt, caption); text may hold Markdown's **bold** and `code` --------------------


def _markdown(blocks) -> str:
    parts = []
    for kind, *args in blocks:
        if kind in ("h1", "h2", "h3"):
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
        if kind in ("h1", "h2", "h3", "p"):
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


def _outcomes(trials) -> pd.Series:
    """Per trial: EVALUATED, NOT_EVALUATED (finished, no evaluation metrics), FAILED (Tune's
    ERROR) or UNFINISHED (pending, running or stopped with the sweep)."""
    finished = trials["status"] == FINISHED
    evaluated = trials["evaluated"].eq(True)  # NaN (e.g. read back from a CSV) is not True
    kinds = np.select(
        [finished & evaluated, finished, trials["status"] == "ERROR"], [EVALUATED, NOT_EVALUATED, FAILED], UNFINISHED
    )
    return pd.Series(kinds, index=trials.index)


def _missing(rows, outcome) -> str:
    """What an empty cell of a group (its trials `rows`) means: its evaluated trials did not
    report the metric (n/a, e.g. an injection metric of a row without injection), its
    finished trials were not evaluated, or none finished (failed / unfinished)."""
    kinds = set(outcome[rows.index])
    for kind, text in ((EVALUATED, "n/a"), (NOT_EVALUATED, "not evaluated"), (FAILED, "failed")):
        if kind in kinds:
            return text
    return "unfinished"


def _by_seed(rows, metric) -> dict:
    """{seed: mean of `metric` over `rows` with that seed that reported it}: what
    compare_groups pairs (several trials of one seed, e.g. other grid axes, are averaged)."""
    rows = rows[rows[metric].notna()]
    return {_scalar(s): float(v) for s, v in rows.groupby("seed")[metric].mean().items()}


def _counts_sentence(outcome) -> str:
    """How many trials finished and were evaluated, finished without evaluation, failed, or did not finish."""
    c = outcome.value_counts()
    total = len(outcome)
    parts = [f"{c.get(EVALUATED, 0)} finished and evaluated"]
    if c.get(NOT_EVALUATED, 0):
        parts.append(
            f"{c[NOT_EVALUATED]} finished but not evaluated (no evaluation metrics in the final result: "
            "the data has no `eval/` splits, or `train.eval` is false)"
        )
    if c.get(FAILED, 0):
        parts.append(f"{c[FAILED]} failed")
    if c.get(UNFINISHED, 0):
        parts.append(f"{c[UNFINISHED]} unfinished (not ended when the sweep's state was last saved)")
    return f"{_count(total, 'trial')}: " + ", ".join(parts) + "."


def _measured(trials, ok) -> tuple[list[str], dict]:
    """Sentences on what the finished trials measured on, and the same as numbers: the
    retrieval split's distinct images and captions, and the training rows skipped per reason."""
    out, facts = [], {}
    if all(c in trials.columns for c in RETRIEVAL):
        sizes = ok[list(RETRIEVAL)].dropna().drop_duplicates()
        facts.update({c: sorted(int(x) for x in sizes[c]) for c in RETRIEVAL})
        if len(sizes) == 1:
            images, captions = (int(x) for x in sizes.iloc[0])
            text = f"Retrieval split: {images} images and {captions} distinct captions"
            if captions < images:
                text += (
                    f" (fewer captions than images: a caption shared by several images is one query, "
                    f"and any of its images is a hit; image queries rank {captions} captions)"
                )
            out.append(text + ".")
        elif len(sizes) > 1:
            seen = "; ".join(f"{int(i)} images and {int(c)} captions" for i, c in sizes.itertuples(index=False))
            out.append(f"Retrieval split: not the same in every trial ({seen}); the trials are not comparable.")
    reasons = [c for c in SKIPS if c in trials.columns]
    if reasons and len(ok):
        counts = {c: ok[c].dropna() for c in reasons}
        facts.update({c: int(v.sum()) if len(v) else None for c, v in counts.items()})
        if all(len(v) == 0 for v in counts.values()):
            out.append("Skipped training rows: not reported by the finished trials.")
        elif all(v.sum() == 0 for v in counts.values()):
            out.append(
                f"No training row was skipped ({' or '.join(SKIPS[c] for c in reasons)}) "
                f"in the {_count(len(ok), 'finished trial')}."
            )
        else:
            listed = ", ".join(f"{int(counts[c].sum())} with {SKIPS[c]}" for c in reasons)
            out.append(
                f"Training rows skipped, summed over the {len(ok)} finished trials: {listed} (per trial in trials.csv)."
            )
    return out, facts


def _summary_table(mean, std, count, n, missing, group, metrics, labels):
    """(header, rows): one row per group: label, `mean ± std` per metric, n finished and evaluated."""
    rows = []
    for g in mean.index:
        cells = []
        for m in metrics:
            k = int(count.at[g, m])
            if k == 0:
                cells.append(missing[g])
                continue
            cell = f"{mean.at[g, m]:.3f}" + (f" ± {std.at[g, m]:.3f}" if k > 1 else "")
            cells.append(cell + (f" (n={k})" if k != n[g] else ""))
        rows.append([labels[g], *cells, str(n[g])])
    return [group, *metrics, "n"], rows


def _method_sentence(ok, group, labels, baseline, primary, mode, min_effect) -> str:
    """How the groups are compared, in words."""
    text = (
        f"Each {group} is compared with {group} {labels[baseline]}, paired by seed (trials of one seed share "
        "the initialisation and the data order): the mean of the per-seed differences, its 95 % paired-t "
        "interval and a paired t-test (the exact sign-flip test where the differences are equal on every "
        f"seed), Holm-corrected over the {group}s compared. `{primary}` is "
        f"{'higher' if mode == 'max' else 'lower'}-is-better (mode {mode}); a difference counts when it is "
        f"beyond noise (Holm p < {ALPHA:g}) and at least the declared minimum effect {min_effect:g}."
    )
    if ok.duplicated([group, "seed"]).any():
        text += (
            f" Some {group}s have several finished trials with one seed (other grid axes): they are averaged "
            "per seed before pairing."
        )
    return text


def _verdict(comparison, ok, primary, outcome) -> str:
    """The primary metric's verdict (compare_groups'), or why there is none."""
    if ok[primary].notna().any():
        return comparison["verdict"]
    if ok.empty:
        why = "no trial finished"
    elif not (outcome == EVALUATED).any():
        why = "no trial was evaluated"
    else:
        why = f"no finished trial reported `{primary}`"
    return f"none: {why}, so nothing is compared."


def _reason(pair, g, baseline, metric, count, missing) -> str:
    """Why group `g` has fewer than 2 seeds of `metric` paired with the baseline."""
    if pair["n"] == 1:
        return "1 seed"
    if count.at[g, metric] == 0:
        return missing[g]
    if count.at[baseline, metric] == 0:
        return f"baseline {missing[baseline]}"
    return "no common seed"


def _paired_table(comparison, primary, labels, count, missing, baseline, min_effect, mode):
    """(header, rows): the primary metric's paired comparison, one row per group other than the baseline."""
    sign = 1 if mode == "max" else -1
    rows = []
    for g, r in comparison["pairs"].items():
        if r["n"] < 2:
            diff = f"{r['diff']:+.3f}" if r["n"] == 1 else "–"
            rows.append(
                [
                    labels[g],
                    str(r["n"]),
                    diff,
                    "–",
                    "–",
                    "–",
                    f"not tested: {_reason(r, g, baseline, primary, count, missing)}",
                ]
            )
            continue
        if g == comparison["best"]:
            call = "best"
        elif g in comparison["better"]:
            call = "better"
        elif r["p_holm"] < ALPHA:
            call = "worse" if sign * r["diff"] < 0 else f"better by less than {min_effect:g}"
        else:
            call = "no difference beyond noise"
        lo, hi = r["ci"]
        rows.append(
            [
                labels[g],
                str(r["n"]),
                f"{r['diff']:+.3f}",
                f"{lo:+.3f} … {hi:+.3f}",
                f"{r['p']:.2g}",
                f"{r['p_holm']:.2g}",
                call,
            ]
        )
    return [f"vs {labels[baseline]}", "seeds", f"Δ {primary}", "95 % CI", "p", "Holm p", "verdict"], rows


def _delta_table(comparisons, group, metrics, labels, count, missing, baseline):
    """(header, rows): per group and metric the paired difference ± its CI half-width, * if Holm-significant."""
    others = list(comparisons[metrics[0]]["pairs"])
    rows = []
    for g in others:
        cells = []
        for m in metrics:
            r = comparisons[m]["pairs"][g]
            if r["n"] < 2:
                cells.append(
                    f"{r['diff']:+.3f} (1 seed)" if r["n"] == 1 else _reason(r, g, baseline, m, count, missing)
                )
                continue
            half = (r["ci"][1] - r["ci"][0]) / 2
            cells.append(f"{r['diff']:+.3f} ± {half:.3f}" + ("*" if r["p_holm"] < ALPHA else ""))
        rows.append([labels[g], *cells])
    return [group, *(f"Δ {m}" for m in metrics)], rows


def _no_baseline_sentence(group) -> str:
    return (
        f"No baseline {group} is set, so no {group} is compared with another and none is singled out: "
        "the table above describes, it does not rank."
    )


def _failed_section(trials, outcome, group):
    """Blocks: a table of every trial that is not finished and evaluated, with the first line of its error."""
    bad = trials[outcome != EVALUATED]
    if bad.empty:
        return [("p", "None.")]
    rows = []
    for i, t in bad.iterrows():
        err = t["error"]
        if isinstance(err, str) and err.strip():
            why = err.strip().splitlines()[0]
        else:
            why = {NOT_EVALUATED: "(finished; no evaluation metrics)", UNFINISHED: "(did not finish)"}.get(
                outcome[i], "(no error message)"
            )
        rows.append([t["trial_id"], t[group], t["seed"], outcome[i], why])
    return [("table", ["trial_id", group, "seed", "outcome", "error"], rows)]


def _finite(x: float) -> float:
    return x if math.isfinite(x) else float("nan")


def _count(k: int, noun: str) -> str:
    """'1 trial', '3 trials'."""
    return f"{k} {noun}{'s' * (k != 1)}"


def _scalar(x):
    """A numpy scalar as the Python one (JSON keys and values)."""
    return x.item() if isinstance(x, np.generic) else x


def _plain(x):
    """`x` with numpy scalars as Python ones, non-finite floats as None and tuples as lists: valid JSON."""
    if isinstance(x, dict):
        return {_scalar(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    x = _scalar(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


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


def _plot(mean, std, missing, group, metrics, labels, title):
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
                    missing[g],
                    transform=ax.get_xaxis_transform(),
                    ha="center",
                    color="tab:red" if missing[g] == "failed" else "grey",
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


def _delta_plot(comparisons, metrics, labels, baseline, title):
    """One horizontal bar chart per metric: each group's mean paired difference from the
    baseline, error bars its 95 % CI (none below 2 paired seeds)."""
    others = list(comparisons[metrics[0]]["pairs"])
    fig, subplot = _grid(len(metrics), 4.2, 1.2 + 0.32 * max(len(others), 1), f"{title}: Δ vs {labels[baseline]}")
    ys = list(range(len(others)))
    for i, m in enumerate(metrics):
        ax = subplot(i)
        pairs = [comparisons[m]["pairs"][g] for g in others]
        delta = [r["diff"] for r in pairs]
        # asymmetric form, so a CI that is not centred would still be drawn as it is
        # (no bar where the CI is unbounded: equal differences at too few seeds, raytrain.stats.paired)
        err = [[_finite(r["diff"] - r["ci"][0]) for r in pairs], [_finite(r["ci"][1] - r["diff"]) for r in pairs]]
        # sign colours, not good/bad ones: for some metrics (loss, gap) lower is better
        colors = ["tab:blue" if d >= 0 else "tab:orange" for d in delta]
        ax.barh(ys, delta, xerr=err, capsize=3, color=colors, alpha=0.8)
        for y, r in zip(ys, pairs):
            if r["n"] == 0:
                ax.text(
                    0.02, y, "no pair", transform=ax.get_yaxis_transform(), va="center", color="tab:red", fontsize=8
                )
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
