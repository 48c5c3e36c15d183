"""raytrain.stats: paired t-tests against the baseline, Holm correction, the verdict sentence.

Hand-computed with the closed forms of Student's t at 1 and 2 degrees of freedom:
df = 1: P(|T| ≥ t) = 1 − (2/π)·atan(t),  t_{0.975} = tan(0.475π) = 12.7062
df = 2: P(|T| ≥ t) = 1 − t/√(t² + 2),      t_{0.975} = 0.95·√(2 / (4·0.975·0.025)) = 4.30265
"""

import math

import pytest

from raytrain.stats import compare_groups, holm, paired

BASE = {0: 0.50, 1: 0.60, 2: 0.70}
T975_DF2 = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025))


def shifted(diffs, base=BASE):
    """The baseline's values plus one difference per seed."""
    return {s: base[s] + d for s, d in zip(base, diffs)}


def p_df2(t2):
    """Two-sided p of a t statistic with t² = t2 at 2 degrees of freedom."""
    return 1 - math.sqrt(t2 / (t2 + 2))


def test_clear_effect_at_three_seeds():
    # d = 0.05, 0.06, 0.04: mean 0.05, sd 0.01, se 0.01/√3, t = 5√3 (t² = 75)
    out = compare_groups({1: BASE, 2: shifted([0.05, 0.06, 0.04])}, 1, noun="order")
    r = out["pairs"][2]
    assert r["n"] == 3 and r["diff"] == pytest.approx(0.05)
    assert r["p"] == pytest.approx(p_df2(75)) and r["p"] == pytest.approx(0.013072, abs=1e-6)
    assert r["p_holm"] == r["p"]  # one comparison
    half = T975_DF2 * 0.01 / math.sqrt(3)
    assert r["ci"] == pytest.approx([0.05 - half, 0.05 + half]) and r["ci"][0] == pytest.approx(0.025159, abs=1e-6)
    assert out["best"] == 2 and out["better"] == [2] and out["baseline"] == 1
    assert out["verdict"] == (
        "Order 2 is the best order: better than order 1 beyond noise "
        "(+0.050, 95 % CI +0.025…+0.075, Holm p = 0.013, 3 seeds)."
    )


def test_no_effect():
    out = compare_groups({"full": BASE, "x": shifted([0.01, -0.01, 0.0])}, "full", noun="variant")
    r = out["pairs"]["x"]
    assert r["diff"] == pytest.approx(0.0, abs=1e-12) and r["p"] == pytest.approx(1.0)
    half = T975_DF2 * 0.01 / math.sqrt(3)
    assert r["ci"] == pytest.approx([-half, half])
    assert out["best"] is None and out["better"] == []
    assert out["verdict"].startswith("No variant differs from variant full beyond noise (largest paired difference:")
    assert "best" not in out["verdict"].lower()


def test_one_seed_is_never_significant():
    out = compare_groups({1: {0: 0.5}, 2: {0: 0.9}}, 1, noun="order")
    r = out["pairs"][2]
    assert r["n"] == 1 and r["diff"] == pytest.approx(0.4)
    assert all(math.isnan(x) for x in (r["p"], r["p_holm"], *r["ci"]))
    assert out["best"] is None
    assert out["verdict"] == (
        "No order can be compared with order 1: none has 2 or more seeds evaluated in both "
        "(seeds in common with order 1: order 2: 1)."
    )


def test_holm_steps_down_and_stays_monotone():
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": float("nan")})
    # m = 3 (d untested): a 3·0.01; c max(0.03, 2·0.03); b max(0.06, 1·0.04)
    assert adjusted["a"] == pytest.approx(0.03) and adjusted["c"] == pytest.approx(0.06)
    assert adjusted["b"] == pytest.approx(0.06) and math.isnan(adjusted["d"])
    assert holm({"a": 0.6, "b": 0.5}) == pytest.approx({"a": 1.0, "b": 1.0})  # capped at 1


def test_holm_keeps_only_what_survives_correction():
    # d = mean + (−0.01, 0, +0.01): sd 0.01, t = mean·√3/0.01
    values = {
        0: BASE,
        "A": shifted([0.04, 0.05, 0.06]),  # t² = 75
        "B": shifted([0.02, 0.03, 0.04]),  # t² = 27
        "C": shifted([0.00, 0.01, 0.02]),  # t² = 3
    }
    out = compare_groups(values, 0)
    p = {g: out["pairs"][g]["p"] for g in "ABC"}
    assert p == pytest.approx({"A": p_df2(75), "B": p_df2(27), "C": p_df2(3)})
    assert p["B"] == pytest.approx(0.035098, abs=1e-6)  # significant alone ...
    holm_p = {g: out["pairs"][g]["p_holm"] for g in "ABC"}
    assert holm_p == pytest.approx({"A": 3 * p["A"], "B": 2 * p["B"], "C": p["C"]})
    assert holm_p["B"] > 0.05  # ... but not among three comparisons
    assert out["best"] == "A" and out["better"] == ["A"]


def test_mode_min():
    values = {"clip": BASE, "x": shifted([-0.05, -0.06, -0.04])}
    lower = compare_groups(values, "clip", mode="min", noun="method")
    assert lower["best"] == "x"
    assert lower["verdict"].startswith("Method x is the best method: better than method clip beyond noise (-0.050")
    higher = compare_groups(values, "clip", mode="max", noun="method")
    assert higher["best"] is None and higher["better"] == []
    assert higher["verdict"].startswith(
        "No method is better than method clip beyond noise; worse than method clip beyond noise: method x (-0.050"
    )


def test_min_effect_blocks_a_significant_but_small_difference():
    values = {1: BASE, 2: shifted([0.05, 0.06, 0.04])}
    out = compare_groups(values, 1, min_effect=0.1, noun="order")
    assert out["pairs"][2]["p_holm"] < 0.05 and out["best"] is None and out["better"] == []
    assert out["verdict"] == (
        "No order is better than order 1 by at least the declared minimum effect 0.1; better beyond noise, "
        "by less: order 2 (+0.050, 95 % CI +0.025…+0.075, Holm p = 0.013, 3 seeds)."
    )
    assert compare_groups(values, 1, min_effect=0.05)["best"] == 2  # at least, not more than


def test_missing_seeds_are_left_out_of_the_pairing():
    # only seeds 1 and 2 are in both; d = 0.04, 0.06: mean 0.05, sd 0.01·√2, se 0.01, t = 5, df = 1
    group = {1: 0.64, 2: 0.76, 3: 0.99}
    out = compare_groups({"b": {**BASE, 4: float("nan")}, "g": group, "h": {0: 0.2, 5: 0.3}}, "b")
    r = out["pairs"]["g"]
    assert r["n"] == 2 and r["diff"] == pytest.approx(0.05)
    assert r["p"] == pytest.approx(1 - 2 / math.pi * math.atan(5))
    half = math.tan(0.475 * math.pi) * 0.01
    assert r["ci"] == pytest.approx([0.05 - half, 0.05 + half]) and half == pytest.approx(0.127062, abs=1e-6)
    # h shares one seed (0): untested, and not counted in Holm's m
    assert out["pairs"]["h"]["n"] == 1 and r["p_holm"] == r["p"]
    assert "not tested (fewer than 2 seeds in common with group b): group h" in out["verdict"]


def test_zero_variance_difference():
    """Equal differences: the exact sign-flip test, p = 2/2ⁿ, CI unbounded until that is below alpha."""
    out = compare_groups({0: BASE, 1: shifted([0.02, 0.02, 0.02]), 2: dict(BASE)}, 0, min_effect=0.01)
    same, equal = out["pairs"][1], out["pairs"][2]
    assert same["diff"] == pytest.approx(0.02) and same["p"] == 0.25 and same["ci"] == [-math.inf, math.inf]
    assert equal["p"] == 1.0 and equal["ci"] == [-math.inf, math.inf] and equal["diff"] == 0.0
    assert same["p_holm"] == 0.5 and out["best"] is None  # 3 seeds cannot show it
    assert "group 1, +0.020, 95 % CI -inf…+inf, Holm p = 0.5, 3 seeds" in out["verdict"]
    six = {s: 0.5 + s / 10 for s in range(6)}
    out = compare_groups({0: six, 1: {s: v + 0.02 for s, v in six.items()}}, 0, min_effect=0.01)
    r = out["pairs"][1]
    assert r["p"] == 2 / 64 and r["ci"] == pytest.approx([0.02, 0.02]) and out["best"] == 1
    assert paired({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0}) == {"n": 2, "diff": 0.0, "ci": [-math.inf, math.inf], "p": 1.0}


def test_best_among_several_only_when_it_beats_them_too():
    far = shifted([0.10, 0.12, 0.09])
    near = shifted([0.05, 0.06, 0.04])
    out = compare_groups({0: BASE, "far": far, "near": near}, 0)
    assert out["better"] == ["far", "near"] and out["best"] == "far"  # far − near = 0.05, 0.06, 0.05: p = 0.0039
    assert "group near (+0.050" in out["verdict"] and "also beat group 0 beyond noise, by less" in out["verdict"]
    twin = shifted([0.11, 0.11, 0.10])  # as good as far: far − twin = −0.01, 0.01, −0.01
    out = compare_groups({0: BASE, "far": far, "twin": twin}, 0)
    assert set(out["better"]) == {"far", "twin"} and out["best"] is None
    assert "none of them is better than the others beyond noise" in out["verdict"]
    assert "best" not in out["verdict"].lower()


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        compare_groups({0: BASE}, 0, mode="maximize")
    with pytest.raises(ValueError, match="min_effect"):
        compare_groups({0: BASE}, 0, min_effect=-1)
    assert compare_groups({0: BASE}, 0)["verdict"] == "There is no group other than group 0 to compare."
