"""Statistics of the quality benchmark, in plain Python (scipy is not a dependency).

Student's t distribution for integer degrees of freedom is exact in closed form
(Abramowitz & Stegun 26.7.3 and 26.7.4): with theta = atan(t / sqrt(df)), the probability
A(t | df) = P(|T| <= t) is a finite trigonometric sum. The quantile inverts it by bisection.
On these: mean with a 95% confidence interval over seeds, and the paired t-test of a method
against the baseline over the same seeds, with Holm's step-down adjustment across the methods
of one task.
"""
from __future__ import annotations

import math
from typing import Sequence


def _check_df(df) -> None:
    if not (isinstance(df, int) and not isinstance(df, bool) and df >= 1):
        raise ValueError(f"df must be an int >= 1, got {df!r}")


def t_two_sided_inside(t: float, df: int) -> float:
    """A(t | df) = P(|T| <= |t|) for Student's t with `df` (integer) degrees of freedom."""
    _check_df(df)
    if math.isinf(t):
        return 1.0
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df == 1:
        return 2 * theta / math.pi
    if df % 2 == 1:  # theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... ), df - 3 terms
        term, total = c, c
        for k in range(1, (df - 3) // 2 + 1):
            term *= c * c * (2 * k) / (2 * k + 1)
            total += term
        return min(1.0, 2 / math.pi * (theta + s * total))
    term, total = 1.0, 1.0  # sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... ), df - 2 terms
    for k in range(1, (df - 2) // 2 + 1):
        term *= c * c * (2 * k - 1) / (2 * k)
        total += term
    return min(1.0, s * total)


def t_cdf(t: float, df: int) -> float:
    """P(T <= t)."""
    inside = t_two_sided_inside(t, df)
    return 0.5 + inside / 2 if t >= 0 else 0.5 - inside / 2


def t_quantile(p: float, df: int) -> float:
    """The t with P(T <= t) = p, for 0 < p < 1 (bisection to 1e-12 relative)."""
    _check_df(df)
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return (lo + hi) / 2


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict:
    """{"mean", "sd", "n", "half_width", "low", "high"}: the mean of `values` with the Student t
    confidence interval mean +- t_{(1+c)/2, n-1} sd / sqrt(n). One value has no interval
    (half_width nan)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci: values must not be empty")
    mean = sum(values) / n
    if n == 1:
        return dict(mean=mean, sd=math.nan, n=1, half_width=math.nan, low=math.nan,
                    high=math.nan)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)
    return dict(mean=mean, sd=sd, n=n, half_width=half, low=mean - half, high=mean + half)


def paired_t_test(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """Paired comparison of a against b (same seeds, same order): the per-seed differences
    a - b, their mean with its confidence interval, t and the two-sided p-value. Identical
    differences (sd 0) give p 1 when they are all 0, else 0."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired_t_test: needs two equally long lists of >= 2 values, got "
                         f"{len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    ci = mean_ci(diffs, confidence)
    n = len(diffs)
    if ci["sd"] == 0:
        t = 0.0 if ci["mean"] == 0 else math.copysign(math.inf, ci["mean"])
        p = 1.0 if ci["mean"] == 0 else 0.0
    else:
        t = ci["mean"] / (ci["sd"] / math.sqrt(n))
        p = 1.0 - t_two_sided_inside(t, n - 1)
    return dict(mean_difference=ci["mean"], low=ci["low"], high=ci["high"],
                half_width=ci["half_width"], t=t, df=n - 1, p=p, differences=diffs)


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values (family-wise error control over the given tests)."""
    order = sorted(p_values, key=p_values.get)
    m, running, adjusted = len(order), 0.0, {}
    for i, name in enumerate(order):
        running = max(running, min(1.0, (m - i) * p_values[name]))
        adjusted[name] = running
    return adjusted
