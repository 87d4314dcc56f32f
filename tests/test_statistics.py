"""Paired differences: the interval against scipy's own t-test, and the edge cases."""

import math

import pytest
from scipy import stats

from diffusers_gfprune.statistics import paired_difference


@pytest.mark.parametrize(
    "a, b",
    [
        ([1.0, 2.0, 3.5], [0.5, 1.0, 3.0]),
        ([0.2, 0.1, 0.4, 0.3, 0.25], [0.3, 0.35, 0.3, 0.5, 0.3]),
        ([5.0, 5.0, 5.1], [5.0, 5.2, 4.9]),
    ],
)
def test_interval_matches_scipy_paired_t_test(a, b):
    result = paired_difference(a, b)
    reference = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert result.mean == pytest.approx(sum(a) / len(a) - sum(b) / len(b))
    assert result.low == pytest.approx(reference.low)
    assert result.high == pytest.approx(reference.high)
    # The interval excludes zero exactly when the two-sided paired t-test rejects at 5%.
    assert result.excludes_zero == (stats.ttest_rel(a, b).pvalue < 0.05)


def test_single_pair_has_no_interval():
    result = paired_difference([1.0], [0.0])
    assert math.isinf(result.low) and math.isinf(result.high) and not result.excludes_zero


@pytest.mark.parametrize("a, b, message", [([1.0], [1.0, 2.0], "same length"), ([], [], "No pairs")])
def test_bad_input(a, b, message):
    with pytest.raises(ValueError, match=message):
        paired_difference(a, b)
