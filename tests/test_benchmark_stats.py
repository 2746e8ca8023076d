"""Statistics of the benchmark: t quantiles, 95% intervals and paired differences, by hand."""
import builtins
import math

import pytest

from protoknn_plugin.benchmark.stats import (T975, Interval, holm_adjusted, mean_interval, paired_difference,
                                             paired_table, t_quantile, t_two_sided_p)


def test_t_quantiles_match_the_printed_table():
    assert t_quantile(1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile(2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile(30) == pytest.approx(2.042, abs=1e-3)
    for df in range(1, 31):
        assert t_quantile(df) == pytest.approx(T975[df - 1], abs=1e-3)


@pytest.fixture
def without_scipy(monkeypatch):
    """Call it to make every later ``import scipy...`` fail, as where scipy is not installed."""
    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    def switch_off():
        monkeypatch.setattr(builtins, "__import__", no_scipy)

    return switch_off


def test_t_quantile_without_scipy_uses_the_table(without_scipy):
    without_scipy()
    assert t_quantile(2) == 4.303
    assert t_quantile(100) == 1.960


def test_interval_of_three_values_by_hand():
    # mean 2, sample std 1, half-width t(0.975, 2) * 1 / sqrt(3) = 4.3027 / 1.7321
    i = mean_interval([1.0, 2.0, 3.0])
    assert i.mean == 2.0 and i.n == 3 and i.std == pytest.approx(1.0)
    assert i.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert i.format() == "2.00 ± 2.48 (n=3)"


def test_one_seed_shows_no_plus_minus_zero():
    i = mean_interval([0.9035])
    assert i.half_width is None and i.low is None and not i.excludes_zero()
    assert i.format(scale=100.0) == "90.35 (n=1)"
    assert "±" not in i.format(scale=100.0)


def test_paired_difference_uses_only_shared_seeds_by_hand():
    a = {0: 0.90, 1: 0.80, 2: 0.85, 3: 0.50}
    b = {0: 0.70, 1: 0.75, 2: 0.70}
    d = paired_difference(a, b)  # differences 0.20, 0.05, 0.15 (seed 3 has no partner)
    assert d.n == 3 and d.mean == pytest.approx(0.4 / 3)
    std = math.sqrt(((0.2 - 0.4 / 3) ** 2 + (0.05 - 0.4 / 3) ** 2 + (0.15 - 0.4 / 3) ** 2) / 2)
    assert d.half_width == pytest.approx(4.302653 * std / math.sqrt(3), rel=1e-5)
    assert d.low < 0 < d.high and not d.excludes_zero()  # 0.133 ± 0.190 includes 0


def test_a_consistent_gap_excludes_zero():
    d = paired_difference({0: 0.9, 1: 0.91, 2: 0.92}, {0: 0.7, 1: 0.7, 2: 0.71})
    assert d.excludes_zero() and d.low > 0


def test_paired_table_lists_every_pair_once_in_row_order():
    rows = paired_table({"pk": {0: 1.0, 1: 1.0}, "pp": {0: 0.5, 1: 0.7}, "cnn": {0: 0.0, 1: 0.2}})
    assert [(r["a"], r["b"]) for r in rows] == [("pk", "pp"), ("pk", "cnn"), ("pp", "cnn")]
    assert rows[0]["diff"].mean == pytest.approx(0.4)
    assert isinstance(rows[0]["diff"], Interval)


def test_faithfulness_rows_only_for_heads_that_have_them():
    from protoknn_plugin.benchmark.tables import faithfulness_lines, summarise

    runs = [{"label": "pk", "head": "protoknn", "seed": s, "faith_del_ratio_box[m=1]": r, "faith_del_flip[m=1]": f}
            for s, r, f in ((0, 1.0, 0.5), (1, 3.0, 0.7))]
    runs += [{"label": "cnn", "head": "cnn", "seed": s, "accuracy": 0.8} for s in (0, 1)]
    lines = faithfulness_lines(summarise(runs))
    assert len(lines) == 3 and lines[2].startswith("| pk | 2 | 2.00 ± ")  # mean of 1 and 3; cnn has no row
    assert "60.00 ±" in lines[2]  # flips in percent
    assert faithfulness_lines(summarise(runs[2:])) == []


def test_paired_lines_of_a_further_metric_by_hand():
    from protoknn_plugin.benchmark.tables import paired_lines

    runs = [{"label": "a", "seed": 0, "prototype_spread": 0.8, "accuracy[k=1]": 0.90},
            {"label": "a", "seed": 1, "prototype_spread": 0.9, "accuracy[k=1]": 0.80},
            {"label": "b", "seed": 0, "prototype_spread": 0.7, "accuracy[k=1]": 0.85},
            {"label": "b", "seed": 1, "prototype_spread": 0.7, "accuracy[k=1]": 0.85}]
    # spread differences 0.1 and 0.2: mean 0.15, sd 0.0707, t(0.975, 1) = 12.706,
    # half-width 12.706 * 0.0707 / sqrt(2) = 0.6353, in the metric's own unit.
    # t = 0.15 / (0.0707 / sqrt(2)) = 3 with df = 1, where P(|T| >= t) = 1 - (2 / pi) atan(t)
    # = 1 - 0.7952 = 0.2048; one pair, so Holm's p is the same.
    assert paired_lines(runs, "prototype_spread")[2] == \
        "| a − b | 2 | +0.1500 | [-0.4853, +0.7853] | 0.2048 | 0.2048 | no |"
    # accuracies in points: differences +5 and -5 points, mean 0, sd 7.07, half-width 63.53; t = 0, p = 1.
    assert paired_lines(runs, "accuracy[k=1]")[2] == "| a − b | 2 | +0.00 | [-63.53, +63.53] | 1.0000 | 1.0000 | no |"
    assert "difference (points)" in paired_lines(runs, "accuracy[k=1]")[0]


def test_holm_adjusted_p_values_by_hand():
    # m = 3, sorted 0.01 < 0.03 < 0.04: 3 * 0.01 = 0.03, then max(0.03, 2 * 0.03) = 0.06,
    # then max(0.06, 1 * 0.04) = 0.06 (adjusted p never falls along the order); input order kept.
    assert holm_adjusted([0.04, 0.01, 0.03]) == pytest.approx([0.06, 0.03, 0.06])
    # (m - j + 1) * p above 1 is cut at 1; one p-value is its own adjusted p.
    assert holm_adjusted([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm_adjusted([0.2]) == [0.2]
    assert holm_adjusted([]) == []


def test_t_p_value_matches_closed_forms_with_and_without_scipy(without_scipy):
    # df = 2: P(|T| >= t) = 1 - t / sqrt(t^2 + 2); df = 1 (Cauchy): 1 - (2 / pi) atan(t).
    cases = [(3 * math.sqrt(3), 2, 1 - math.sqrt(27 / 29)), (3.0, 1, 1 - 2 / math.pi * math.atan(3.0)),
             (0.0, 4, 1.0)]
    for t, df, p in cases:
        assert t_two_sided_p(t, df) == pytest.approx(p, abs=1e-9)
    without_scipy()
    for t, df, p in cases:
        assert t_two_sided_p(t, df) == pytest.approx(p, abs=1e-6)
    assert t_two_sided_p(-2.776, 4) == pytest.approx(0.05, abs=1e-4)  # t_{0.975, 4} of the table


def test_holm_claims_fewer_pairs_than_uncorrected_intervals_by_hand():
    """Three rows, seeds 0-2 (accuracies as fractions):

        a = 0.90 0.91 0.95    a - b = 0.02 0.03 0.04   mean 0.03, s 0.01
        b = 0.88 0.88 0.91    b - c = 0.04 0.02 0.03   mean 0.03, s 0.01
        c = 0.84 0.86 0.88    a - c = 0.06 0.05 0.07   mean 0.06, s 0.01

    t = mean / (s / sqrt(3)): 3 sqrt(3) = 5.196 for a - b and b - c, 6 sqrt(3) = 10.392 for a - c;
    with df = 2, p = 1 - t / sqrt(t^2 + 2):
        a - b, b - c: 1 - sqrt(27 / 29)  = 0.035099  (< 0.05: each 95% interval excludes 0)
        a - c:        1 - sqrt(108 / 110) = 0.009133
    Holm, m = 3: a - c first, 3 * 0.009133 = 0.0274 < 0.05, claimed; next a - b (ties keep
    table order), 2 * 0.035099 = 0.0702 >= 0.05: stop, so a - b and b - c are not claimed
    (adjusted 0.0702 both, since adjusted p never falls along the order).
    """
    per_seed = {"a": {0: 0.90, 1: 0.91, 2: 0.95}, "b": {0: 0.88, 1: 0.88, 2: 0.91}, "c": {0: 0.84, 1: 0.86, 2: 0.88}}
    rows = {(r["a"], r["b"]): r for r in paired_table(per_seed)}
    p_ab, p_ac = 1 - math.sqrt(27 / 29), 1 - math.sqrt(108 / 110)
    assert (p_ab, p_ac) == (pytest.approx(0.035099, abs=1e-6), pytest.approx(0.009133, abs=1e-6))
    assert rows["a", "b"]["p"] == pytest.approx(p_ab) and rows["b", "c"]["p"] == pytest.approx(p_ab)
    assert rows["a", "c"]["p"] == pytest.approx(p_ac)
    assert all(r["diff"].excludes_zero() for r in rows.values())  # uncorrected: all three
    assert rows["a", "c"]["holm_p"] == pytest.approx(3 * p_ac) and rows["a", "c"]["claimed"] is True
    for pair in (("a", "b"), ("b", "c")):
        assert rows[pair]["holm_p"] == pytest.approx(2 * p_ab) and rows[pair]["claimed"] is False
    # The same rows in a table: intervals uncorrected, the claim Holm's.
    from protoknn_plugin.benchmark.tables import paired_lines

    runs = [{"label": label, "seed": seed, "accuracy": acc} for label, accs in per_seed.items()
            for seed, acc in accs.items()]
    lines = paired_lines(runs)
    assert lines[2] == "| a − b | 3 | +3.00 | [+0.52, +5.48] | 0.0351 | 0.0702 | no |"
    assert lines[3] == "| a − c | 3 | +6.00 | [+3.52, +8.48] | 0.0091 | 0.0274 | yes |"


def test_a_pair_with_one_shared_seed_is_not_tested_and_not_counted_by_holm():
    # a - b over seeds 0-2: 0.02, 0.03, 0.04, p = 0.035099 as above; a - c shares one seed only,
    # so Holm's m is 1 and a - b is claimed at its own p.
    rows = paired_table({"a": {0: 0.90, 1: 0.91, 2: 0.95}, "b": {0: 0.88, 1: 0.88, 2: 0.91}, "c": {2: 0.5}})
    by_pair = {(r["a"], r["b"]): r for r in rows}
    assert by_pair["a", "c"]["p"] is None and by_pair["a", "c"]["claimed"] is None
    assert by_pair["a", "b"]["holm_p"] == pytest.approx(1 - math.sqrt(27 / 29)) and by_pair["a", "b"]["claimed"]
