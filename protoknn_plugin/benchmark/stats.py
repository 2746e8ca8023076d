"""Means over seeds with Student-t 95% intervals, and paired differences between heads.

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


def paired_table(per_seed: Dict[str, Dict[int, float]]) -> List[Dict[str, object]]:
    """Every ordered pair (first-seen order, a before b) of rows: ``{"a", "b", "diff": Interval}``."""
    labels = list(per_seed)
    rows = []
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            if set(per_seed[a]) & set(per_seed[b]):
                rows.append({"a": a, "b": b, "diff": paired_difference(per_seed[a], per_seed[b])})
    return rows
