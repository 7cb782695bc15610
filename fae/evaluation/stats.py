"""Statistics across seeds for `fae report`: confidence intervals of a mean, Welch's tests against a
baseline group, and Holm's correction for testing many columns and groups at once.

  - `interval(values)`: the mean and the half-width of its 95% confidence interval, mean +- t(0.975, n - 1)
    s / sqrt(n) (Student's t, s the sample standard deviation; none for a single value);
  - `welch(a, b)`: the two-sided p-value of Welch's t-test of equal means with unequal variances (scipy);
  - `holm(p_values)`: Holm's step-down adjustment (1979), which bounds the probability of any false
    rejection among the family of tests: sorted ascending, p_(i) -> max_{j <= i} min(1, (m - j + 1) p_(j)).
    Written here because scipy has only the Benjamini-Hochberg procedure (false_discovery_control), which
    bounds a different error rate.
"""

from __future__ import annotations

import math
import statistics
import warnings

from scipy import stats as scipy_stats

LEVEL = 0.95  # the confidence of every interval


def half_width(std: float, n: int) -> float:
    """The 95% interval's half-width of a mean of n values of sample standard deviation `std` (NaN for n < 2)."""
    if n < 2 or not math.isfinite(std):
        return math.nan
    return float(scipy_stats.t.ppf(0.5 + LEVEL / 2, n - 1)) * std / math.sqrt(n)


def interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% confidence interval) of finite `values`; NaNs left out."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    if len(finite) == 1:
        return finite[0], math.nan
    return statistics.mean(finite), half_width(statistics.stdev(finite), len(finite))


def welch(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of Welch's t-test that `a` and `b` have equal means; NaN (no test) with fewer than 2
    values in either, or with no spread in both (a count such as active units, the same in every seed: the
    statistic is 0/0 or x/0, and a p-value of 0 or 1 would claim what 2 or 3 seeds cannot show)."""
    a, b = [v for v in a if math.isfinite(v)], [v for v in b if math.isfinite(v)]
    if len(a) < 2 or len(b) < 2 or (statistics.stdev(a) == 0 and statistics.stdev(b) == 0):
        return math.nan
    with warnings.catch_warnings():  # scipy warns of "catastrophic cancellation" when seeds agree to 4 or more
        warnings.simplefilter("ignore", RuntimeWarning)  # digits (a clean error); float64 leaves 11 more
        return float(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue)


def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values in the order given; NaNs (tests not made) stay NaN and do not count."""
    made = sorted((p, i) for i, p in enumerate(p_values) if math.isfinite(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(made):
        running = max(running, min(1.0, (len(made) - rank) * p))
        adjusted[i] = running
    return adjusted
