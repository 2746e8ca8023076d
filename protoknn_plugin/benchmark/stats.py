"""Means over seeds with Student-t 95% intervals, paired differences between heads, and
the paired t-test's p-values with Holm's correction over the pairs of a table.

Pure functions on lists of floats, so the numbers in every table can be checked by hand.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

# Two-sided 95% quantiles t_{0.975, df} for df = 1..30 (used when scipy is absent).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile(df: int) -> float:
    """t_{0.975} with ``df`` degrees of freedom: scipy when installed, else the table (1.96 past 30)."""
    if df < 1:
        raise ValueError(f"a t-interval needs df >= 1, got {df}")
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:
        return T975[df - 1] if df <= len(T975) else 1.960


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values and the half-width of its 95% t-interval (None when n < 2)."""

    mean: float
    half_width: Optional[float]
    n: int
    std: Optional[float] = None

    @property
    def low(self) -> Optional[float]:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> Optional[float]:
        return None if self.half_width is None else self.mean + self.half_width

    def excludes_zero(self) -> bool:
        return self.half_width is not None and (self.low > 0 or self.high < 0)

    def format(self, scale: float = 1.0, digits: int = 2) -> str:
        """``90.37 ± 0.52 (n=3)``; with one value ``90.37 (n=1)``: no ``± 0.00``, which reads as certainty."""
        mean = f"{scale * self.mean:.{digits}f}"
        if self.half_width is None:
            return f"{mean} (n={self.n})"
        return f"{mean} ± {scale * self.half_width:.{digits}f} (n={self.n})"


def mean_interval(values: Sequence[float]) -> Interval:
    """Mean and 95% t-interval half-width t_{0.975, n-1} * s / sqrt(n) of ``values``."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values to average")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Interval(mean, None, len(values))
    std = statistics.stdev(values)
    return Interval(mean, t_quantile(len(values) - 1) * std / math.sqrt(len(values)), len(values), std)


def paired_difference(a: Dict[int, float], b: Dict[int, float]) -> Interval:
    """Interval of a - b over the seeds both have (same seed = same data order and initialisation)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("the two rows share no seed")
    return mean_interval([a[s] - b[s] for s in seeds])


# The family-wise error rate of a table's claims (Holm): at most 5% that any claim of the table is false.
ALPHA = 0.05


def _t_density(x: float, df: int) -> float:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))


def t_two_sided_p(t_stat: float, df: int) -> float:
    """P(|T| >= |t_stat|) for Student's T with ``df`` degrees of freedom: scipy when installed,
    else Simpson's rule on the density over [0, |t|] (2,000 intervals; error far below 1e-6)."""
    if df < 1:
        raise ValueError(f"a t-test needs df >= 1, got {df}")
    x = abs(float(t_stat))
    try:
        from scipy.stats import t

        return float(2.0 * t.sf(x, df))
    except ImportError:
        intervals = 2000
        h = x / intervals
        weights = (1 if i in (0, intervals) else (4 if i % 2 else 2) for i in range(intervals + 1))
        mass = h / 3 * sum(w * _t_density(i * h, df) for i, w in enumerate(weights))
        return min(1.0, max(0.0, 1.0 - 2.0 * mass))


def paired_p_value(diff: Interval) -> Optional[float]:
    """Two-sided p of the paired t-test of ``mean difference = 0``: t = mean / (s / sqrt(n)) with
    n - 1 degrees of freedom; None when n < 2. p < 0.05 exactly when the 95% interval excludes 0."""
    if diff.std is None or diff.n < 2:
        return None
    if diff.std == 0:
        return 0.0 if diff.mean != 0 else 1.0
    return t_two_sided_p(diff.mean / (diff.std / math.sqrt(diff.n)), diff.n - 1)


def holm_adjusted(p_values: Sequence[float]) -> List[float]:
    """Holm's step-down adjusted p-values, in the order given.

    With the m p-values sorted, p_(1) <= ... <= p_(m), the adjusted p_(i) is
    max over j <= i of min(1, (m - j + 1) * p_(j)). Rejecting every hypothesis whose adjusted p
    is below alpha is Holm's procedure: compare p_(1) with alpha / m, p_(2) with alpha / (m - 1),
    ..., and stop at the first that is not below; the chance that any rejection is false stays
    at most alpha, whatever the dependence between the tests.
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p_values[i])))
        adjusted[i] = running
    return adjusted


def paired_table(per_seed: Dict[str, Dict[int, float]], alpha: float = ALPHA) -> List[Dict[str, object]]:
    """Every ordered pair (first-seen order, a before b) of rows:
    ``{"a", "b", "diff": Interval, "p", "holm_p", "claimed"}``.

    ``p`` is the paired t-test's, ``holm_p`` Holm's adjusted p over every pair of the table with
    at least two shared seeds, and ``claimed`` whether the difference is claimed: ``holm_p < alpha``.
    Pairs with one shared seed have None in all three and do not count in Holm's m.
    """
    labels = list(per_seed)
    rows = []
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            if set(per_seed[a]) & set(per_seed[b]):
                diff = paired_difference(per_seed[a], per_seed[b])
                rows.append({"a": a, "b": b, "diff": diff, "p": paired_p_value(diff), "holm_p": None, "claimed": None})
    tested = [row for row in rows if row["p"] is not None]
    for row, adjusted in zip(tested, holm_adjusted([row["p"] for row in tested])):
        row["holm_p"], row["claimed"] = adjusted, adjusted < alpha
    return rows
