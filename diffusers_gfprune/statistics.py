"""Paired comparisons of runs: the mean difference with a Student-t confidence interval.

Benchmarks pair what they compare (same seed, same data order, same noise), so the question for two
methods A and B is whether the mean of the per-seed differences ``a_i - b_i`` is away from zero.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

from scipy import stats


@dataclass
class PairedDifference:
    """``mean(a - b)`` over paired runs and its confidence interval."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float

    @property
    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def as_dict(self) -> dict:
        return {**asdict(self), "excludes_zero": self.excludes_zero}

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:+.4g} (n = {self.n}, no interval)"
        return f"{self.mean:+.4g} [{self.low:+.4g}, {self.high:+.4g}]"


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDifference:
    """Mean of ``a_i - b_i`` with a two-sided Student-t interval (n - 1 degrees of freedom).

    Parameters
    ----------
    a, b : sequences of float
        Paired measurements, ``a[i]`` and ``b[i]`` from the same seed.
    confidence : float
        Coverage of the interval, in (0, 1).

    Returns
    -------
    PairedDifference
        With one pair the interval is infinite (nothing is known about the spread).
    """
    if len(a) != len(b):
        raise ValueError(f"Paired samples need the same length, got {len(a)} and {len(b)}.")
    if not a:
        raise ValueError("No pairs to compare.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}.")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    if n == 1:
        return PairedDifference(mean, -math.inf, math.inf, 1, confidence)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return PairedDifference(mean, mean - half, mean + half, n, confidence)
