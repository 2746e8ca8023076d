"""Statistics of the benchmark: t quantiles, 95% intervals and paired differences, by hand."""
import builtins
import math

import pytest

from protoknn_plugin.benchmark.stats import T975, Interval, mean_interval, paired_difference, paired_table, t_quantile


def test_t_quantiles_match_the_printed_table():
    assert t_quantile(1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile(2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile(30) == pytest.approx(2.042, abs=1e-3)
    for df in range(1, 31):
        assert t_quantile(df) == pytest.approx(T975[df - 1], abs=1e-3)


def test_t_quantile_without_scipy_uses_the_table(monkeypatch):
    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
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
    assert paired_lines(runs, "prototype_spread")[2] == "| a − b | 2 | +0.1500 | [-0.4853, +0.7853] | no |"
    # accuracies in points: differences +5 and -5 points, mean 0, sd 7.07, half-width 63.53.
    assert paired_lines(runs, "accuracy[k=1]")[2] == "| a − b | 2 | +0.00 | [-63.53, +63.53] | no |"
    assert "difference (points)" in paired_lines(runs, "accuracy[k=1]")[0]
