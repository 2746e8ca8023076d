"""Search spaces: the ranges a head's options may take when a benchmark tunes them.

Plain data, so that listing a space (``protoknn heads``) needs no search library; the
benchmark's tuner (``benchmark.tuning``) turns each range into an Optuna distribution.
Every range lies around the head's default, within what its paper or reference code uses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Sequence, Tuple, Union


@dataclass(frozen=True)
class FloatRange:
    """A real option in [low, high]; ``log``: sampled uniformly in log space (rates, weights)."""

    low: float
    high: float
    log: bool = False

    def describe(self) -> str:
        return f"{'log ' if self.log else ''}{self.low:g}..{self.high:g}"


@dataclass(frozen=True)
class IntRange:
    """An integer option in [low, high]."""

    low: int
    high: int
    log: bool = False

    def describe(self) -> str:
        return f"int {'log ' if self.log else ''}{self.low}..{self.high}"


@dataclass(frozen=True)
class Choice:
    """One of a few values (strings, numbers or booleans)."""

    choices: Tuple[Any, ...]

    def describe(self) -> str:
        return "one of " + ", ".join(str(c) for c in self.choices)


Range = Union[FloatRange, IntRange, Choice]
SearchSpace = Dict[str, Range]


def describe_space(space: SearchSpace) -> Sequence[str]:
    """``["lr: log 0.0001..0.01", ...]`` for listings."""
    return [f"{name}: {rng.describe()}" for name, rng in space.items()]


__all__ = ["FloatRange", "IntRange", "Choice", "Range", "SearchSpace", "describe_space"]
