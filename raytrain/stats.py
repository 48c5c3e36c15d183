"""Comparing a sweep's groups with its baseline: paired by seed, Holm-corrected.

Trials of one seed share the student's initialisation and the data order, so the honest
comparison of a group with the baseline is the per-seed difference, not two independent
means. The test is the paired t-test on those differences:

    d_s = value(group, s) − value(baseline, s)   for the n seeds s both have
    diff = mean(d),  se = std(d, ddof=1) / √n,  t = diff / se   (n − 1 degrees of freedom)
    p = 2 · P(T_{n−1} ≥ |t|),  CI = diff ± t_{n−1, 1 − α/2} · se

Why the t-test: it is exact under normal per-seed differences at any n ≥ 2, and the CI is
its own inversion, so p < α exactly when the CI leaves out 0. The alternatives do not work
at the 3 seeds a sweep has: the exact sign-flip permutation test has 2ⁿ equally likely sign
patterns, so its smallest two-sided p is 2/2ⁿ = 0.25 at n = 3 (it cannot reject below
n = 6), and a bootstrap of 3 values has 10 distinct resamples (its interval is far too
narrow). Normality of a seed-to-seed difference of metrics averaged over hundreds of
evaluation items is a mild assumption; with 3 seeds the test has little power, which is
the point: the report then says "no difference beyond noise" rather than naming a winner.
Where the differences are all equal the normal model does not hold, and `paired` falls
back to the sign-flip test.

The groups' p-values are Holm-corrected (step-down, family-wise error ≤ α over the groups
compared with the baseline): with the m tested p's sorted, p_(1) ≤ … ≤ p_(m),

    p_holm_(i) = max_{j ≤ i} min(1, (m − j + 1) · p_(j)).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from scipy import stats

Mode = Literal["max", "min"]


def paired(a: dict, b: dict, alpha: float = 0.05) -> dict[str, Any]:
    """Paired t-test of a − b over the keys (seeds) both have with finite values:
    {"n", "diff", "ci": [low, high] at level 1 − alpha, "p"} (two-sided).

    n < 2: no test (diff is the one difference or NaN; ci and p NaN).

    All differences equal (std 0, e.g. R@1 over 64 queries moving by exactly one query on
    every seed, or a metric that does not depend on the seed): the t statistic is ±∞ or 0/0,
    a value the t-test's normal model cannot produce, so the exact sign-flip test is used
    instead: all n signs agree, p = 2/2ⁿ (1 when the differences are 0). Its interval (the
    shifts it does not reject) is [diff, diff] when 2/2ⁿ < alpha (n ≥ 6 at 0.05) and
    unbounded, [−∞, +∞], below that: a few equal differences do not bound the effect."""
    seeds = [s for s in a if s in b and math.isfinite(a[s]) and math.isfinite(b[s])]
    d = [float(a[s]) - float(b[s]) for s in seeds]
    n = len(d)
    nan = float("nan")
    if n < 2:
        return {"n": n, "diff": d[0] if d else nan, "ci": [nan, nan], "p": nan}
    diff = sum(d) / n
    sd = math.sqrt(sum((x - diff) ** 2 for x in d) / (n - 1))
    if sd <= 1e-12 * max(1.0, abs(diff)):  # equal differences, up to float rounding
        flip = 2.0 ** (1 - n)  # two of the 2ⁿ sign patterns are as extreme: all + and all −
        ci = [diff, diff] if flip < alpha else [-math.inf, math.inf]
        return {"n": n, "diff": diff, "ci": ci, "p": 1.0 if abs(diff) <= 1e-12 else flip}
    se = sd / math.sqrt(n)
    half = float(stats.t.ppf(1 - alpha / 2, n - 1)) * se
    p = float(2 * stats.t.sf(abs(diff) / se, n - 1))
    return {"n": n, "diff": diff, "ci": [diff - half, diff + half], "p": p}


def holm(p: dict) -> dict:
    """Holm-adjusted p per key (module docstring); NaN entries (no test) stay NaN and do
    not count in m."""
    tested = sorted(((v, k) for k, v in p.items() if not math.isnan(v)), key=lambda x: x[0])
    m, out, running = len(tested), {k: float("nan") for k in p}, 0.0
    for i, (v, k) in enumerate(tested):
        running = max(running, min(1.0, (m - i) * v))
        out[k] = running
    return out


def compare_groups(
    values: dict[Any, dict[Any, float]],
    baseline,
    *,
    mode: Mode = "max",
    min_effect: float = 0.0,
    alpha: float = 0.05,
    noun: str = "group",
    labels: dict | None = None,
) -> dict[str, Any]:
    """Every group against `baseline`, paired by seed.

    `values`: group → {seed: metric value of that group's finished trial with that seed}
    (non-finite values count as missing). For each group other than the baseline, `pairs`
    holds the paired test over the seeds both have (`paired`, CI at 1 − alpha) and `p_holm`
    (Holm over the groups tested). A group *beats* the baseline when p_holm < alpha, its
    diff is in the better direction (> 0 for mode "max", < 0 for "min") and |diff| ≥
    min_effect. `best` is the group that beats the baseline if exactly one does; if several
    do, the one that is better by most, only if it also beats each of the others (paired,
    Holm over those comparisons, at least min_effect); else None. With fewer than 2 paired
    seeds nothing is tested, so nothing beats anything.

    Returns {"best", "baseline", "better": [groups that beat the baseline], "verdict": one
    sentence naming each group as `noun` and its label (e.g. "order 1 (RankCLIP)"), "pairs":
    {group: {"n", "diff", "ci", "p", "p_holm"}}}."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    if min_effect < 0:
        raise ValueError(f"min_effect must be ≥ 0, got {min_effect}")
    base = values.get(baseline, {})
    pairs = {g: paired(v, base, alpha) for g, v in values.items() if g != baseline}
    for g, p_holm in holm({g: r["p"] for g, r in pairs.items()}).items():
        pairs[g]["p_holm"] = p_holm
    sign = 1 if mode == "max" else -1
    better = sorted(
        (g for g, r in pairs.items() if _beats(r, sign, min_effect, alpha)), key=lambda g: -sign * pairs[g]["diff"]
    )
    best = None
    if len(better) == 1:
        best = better[0]
    elif better:
        top, rest = better[0], better[1:]
        against = {g: paired(values[top], values[g], alpha) for g in rest}
        for g, p_holm in holm({g: r["p"] for g, r in against.items()}).items():
            against[g]["p_holm"] = p_holm
        if all(_beats(r, sign, min_effect, alpha) for r in against.values()):
            best = top
    name = {g: f"{noun} {(labels or {}).get(g, g)}" for g in [baseline, *values]}
    verdict = _verdict(pairs, best, better, baseline, sign, min_effect, alpha, noun, name)
    return {"best": best, "baseline": baseline, "better": better, "verdict": verdict, "pairs": pairs}


def _beats(r: dict, sign: int, min_effect: float, alpha: float) -> bool:
    return r["p_holm"] < alpha and sign * r["diff"] > 0 and abs(r["diff"]) >= min_effect


def _effect(r: dict, alpha: float) -> str:
    """'+0.050, 95 % CI +0.020…+0.080, Holm p = 0.012, 3 seeds'."""
    lo, hi = r["ci"]
    ci = "no CI" if math.isnan(lo) else f"{100 * (1 - alpha):g} % CI {lo:+.3f}…{hi:+.3f}"
    p = "" if math.isnan(r["p_holm"]) else f", Holm p = {r['p_holm']:.2g}"
    return f"{r['diff']:+.3f}, {ci}{p}, {r['n']} seed{'s' * (r['n'] != 1)}"


def _verdict(pairs, best, better, baseline, sign, min_effect, alpha, noun, name) -> str:
    """One sentence; says "best" only when `best` is set."""
    b = name[baseline]
    tested = {g: r for g, r in pairs.items() if r["n"] >= 2}
    if not pairs:
        return f"There is no {noun} other than {b} to compare."
    if not tested:
        counts = ", ".join(f"{name[g]}: {r['n']}" for g, r in pairs.items())
        return (
            f"No {noun} can be compared with {b}: none has 2 or more seeds evaluated in both "
            f"(seeds in common with {b}: {counts})."
        )

    def listed(groups):
        return ", ".join(f"{name[g]} ({_effect(pairs[g], alpha)})" for g in groups)

    untested = [name[g] for g in pairs if g not in tested]
    tail = f"; not tested (fewer than 2 seeds in common with {b}): {', '.join(untested)}" if untested else ""
    worse = [g for g, r in tested.items() if r["p_holm"] < alpha and sign * r["diff"] < 0]
    tail = (f"; worse than {b} beyond noise: {listed(worse)}" if worse else "") + tail
    need = f" by at least the declared minimum effect {min_effect:g}" if min_effect > 0 else ""
    if best is not None:
        others = [g for g in better if g != best]
        also = f"; {listed(others)} also beat {b} beyond noise, by less than {name[best]} does" if others else ""
        first = name[best][0].upper() + name[best][1:]
        effect = _effect(pairs[best], alpha)
        return f"{first} is the best {noun}: better than {b} beyond noise{need} ({effect}){also}{tail}."
    if better:
        return (
            f"{listed(better)} are better than {b} beyond noise{need}, but none of them is better than "
            f"the others beyond noise{tail}."
        )
    small = [g for g, r in tested.items() if r["p_holm"] < alpha and sign * r["diff"] > 0]
    if small:
        return f"No {noun} is better than {b}{need}; better beyond noise, by less: {listed(small)}{tail}."
    if worse:
        return f"No {noun} is better than {b} beyond noise{tail}."
    g = max(tested, key=lambda g: abs(tested[g]["diff"]))
    largest = f"{name[g]}, {_effect(tested[g], alpha)}"
    return f"No {noun} differs from {b} beyond noise (largest paired difference: {largest}){tail}."
