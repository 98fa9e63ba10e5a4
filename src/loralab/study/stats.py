"""Small statistics for study findings and tune: t quantiles and intervals, pooled seed spread, Pareto sets.

    half = t_half_width(pooled_sd, df=4, scale=1 / math.sqrt(n))   # t_quantile(0.975, 4) * sd / sqrt(n)

Only the standard library: the study report must not depend on scipy. The Student t
distribution function uses the finite series for integer degrees of freedom
(Abramowitz & Stegun 26.7.3-4), and its quantile is found by bisection (above 200 degrees of
freedom, the Cornish-Fisher expansion A&S 26.7.5).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from statistics import NormalDist


def t_two_sided_prob(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with ``df`` (a positive integer) degrees of freedom."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer (got {df})")
    t = abs(t)
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    s = math.sin(theta)
    if df % 2 == 1:  # odd: 2/pi * (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        if df == 1:
            return 2 * theta / math.pi
        term, total = 1.0, 1.0
        for k in range(1, (df - 3) // 2 + 1):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return min(1.0, 2 / math.pi * (theta + s * math.cos(theta) * total))
    # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
    term, total = 1.0, 1.0
    for k in range(1, (df - 2) // 2 + 1):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return min(1.0, s * total)


@functools.lru_cache(maxsize=256)  # called with the same (0.975, df) for every comparison
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t (p in (0.5, 1)), e.g. t_quantile(0.975, 4) = 2.776."""
    if not 0.5 < p < 1:
        raise ValueError(f"p must be in (0.5, 1) (got {p})")
    if df > 200:  # the series grows with df; the Cornish-Fisher expansion (A&S 26.7.5) is exact enough here
        return _t_quantile_large_df(p, df)
    target = 2 * p - 1  # P(|T| <= q) for the upper p quantile q
    lo, hi = 0.0, 1.0
    while t_two_sided_prob(hi, df) < target:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        if t_two_sided_prob(mid, df) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _t_quantile_large_df(p: float, df: int) -> float:
    x = NormalDist().inv_cdf(p)
    g1 = (x**3 + x) / 4
    g2 = (5 * x**5 + 16 * x**3 + 3 * x) / 96
    g3 = (3 * x**7 + 19 * x**5 + 17 * x**3 - 15 * x) / 384
    g4 = (79 * x**9 + 776 * x**7 + 1482 * x**5 - 1920 * x**3 - 945 * x) / 92160
    return x + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def sample_sd(xs: Sequence[float]) -> float:
    """Standard deviation with n - 1 in the denominator; 0.0 for a single value."""
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def pooled_sd(groups: Sequence[Sequence[float]]) -> tuple[float | None, int]:
    """Pooled standard deviation over groups of repeats and its degrees of freedom.

    Groups with one value add nothing; with no group of two or more the result is (None, 0):
    there is no measure of seed-to-seed noise.
    """
    ss, df = 0.0, 0
    for g in groups:
        if len(g) >= 2:
            m = mean(g)
            ss += sum((x - m) ** 2 for x in g)
            df += len(g) - 1
    if df == 0:
        return None, 0
    return math.sqrt(ss / df), df


def t_half_width(sd: float, df: int, scale: float, level: float = 0.95) -> float:
    """Half the width of the ``level`` t interval of an estimate whose standard error is
    ``sd * scale``, ``sd`` having ``df`` degrees of freedom: a mean of n values has scale
    1 / sqrt(n), a difference of two means sqrt(1/n_a + 1/n_b)."""
    return t_quantile(0.5 + level / 2, df) * sd * scale


def mean_interval(xs: Sequence[float], level: float = 0.95) -> tuple[float, float, float] | None:
    """(mean, low, high): the t interval from the values' own spread; None for fewer than 2."""
    if len(xs) < 2:
        return None
    m = mean(xs)
    half = t_half_width(sample_sd(xs), len(xs) - 1, 1 / math.sqrt(len(xs)), level)
    return m, m - half, m + half


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); 0.0 when either side is constant."""
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = mean(rx), mean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return 0.0
    return sxy / math.sqrt(sxx * syy)


def _ranks(xs: Sequence[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pareto_front(costs: Sequence[float], quality: Sequence[float], goal: str) -> list[bool]:
    """Which points no other point dominates: no more cost and at least as good quality,
    strictly better in one of the two. ``goal`` is "min" or "max" for quality."""
    sign = 1 if goal == "min" else -1
    bad = [sign * q for q in quality]  # lower is better on both coordinates
    front = []
    for i in range(len(costs)):
        dominated = any(
            costs[j] <= costs[i] and bad[j] <= bad[i] and (costs[j] < costs[i] or bad[j] < bad[i])
            for j in range(len(costs)) if j != i
        )
        front.append(not dominated)
    return front
