"""What a number of seeds can decide: the probability of each verdict of the decision rule at a true difference.

The rule (:func:`lbdpo.eval.significance.verdict`): *beats* / *worse* = a two-sided t-test with p < 0.05 and a
difference of that sign; *matches* = p ≥ 0.05 and the 95 % CI inside ±margin. Its power is the probability of
reaching the verdict. Model: the estimated difference is d ~ N(δ, τ²) and its standard error se = τ·u with
u² ~ χ²_df / df independent of d (exact for a two-sample t with pooled variance: τ = σ√(2/n), df = 2n − 2; for a
paired t over n seeds: τ = σ/√n, df = n − 1; Welch's test at equal n and variance is close to the pooled one):

    P(matches | δ) = E_u[ Φ((h − δ)/τ) − Φ((−h − δ)/τ) ],  h = min(t_c·τu, margin − t_c·τu) (0 when negative)
    P(beats | δ)   = P(T > t_c),  T ~ noncentral t(df, δ/τ)                                 (t_c = t_{0.975, df})

So "the expected CI half-width equals the margin" is not 80 % power for *matches*: at that n a true difference of 0
gets *matches* about a third of the time or less (tests/test_significance.py checks both formulas by simulation).
"""

from __future__ import annotations

import math
import statistics
from typing import Callable, Sequence

from scipy import integrate, optimize, stats


def prob_matches(margin: float, tau: float, df: float, delta: float = 0.0) -> float:
    """P(verdict *matches*) for a difference estimate d ~ N(``delta``, ``tau``²) with a standard error on ``df``
    degrees of freedom (module docstring): both the 95 % CI inside ±``margin`` and p ≥ 0.05."""
    if tau <= 0:  # no spread at all: the estimate is delta, exactly
        return float(delta == 0)
    tc = float(stats.t.ppf(0.975, df))
    u_max = margin / (tc * tau)  # beyond it the CI alone is wider than ±margin
    lo = math.sqrt(stats.chi2.ppf(1e-12, df) / df)
    hi = min(u_max, math.sqrt(stats.chi2.isf(1e-12, df) / df))
    if hi <= lo:
        return 0.0

    def integrand(u: float) -> float:
        h = min(tc * tau * u, margin - tc * tau * u)
        if h <= 0:
            return 0.0
        inside = stats.norm.cdf((h - delta) / tau) - stats.norm.cdf((-h - delta) / tau)
        return float(inside * stats.chi2.pdf(df * u * u, df) * 2 * df * u)  # u's density: that of χ²_df at df·u²

    points = [p for p in (u_max / 2, 1.0) if lo < p < hi]
    value, _ = integrate.quad(integrand, lo, hi, points=points or None, limit=200)
    return float(min(max(value, 0.0), 1.0))


def prob_beats(delta: float, tau: float, df: float) -> float:
    """P(verdict *beats*) at a true difference ``delta`` > 0: the noncentral t's mass above t_{0.975, df}."""
    return float(stats.nct.sf(stats.t.ppf(0.975, df), df, delta / tau))


def _two_sample(sd: float, n: int, paired: bool) -> tuple[float, int]:
    """(τ, df) of a difference of two arms of ``n`` seeds each (seed-to-seed sd ``sd``), or of a mean paired
    difference over ``n`` seeds (sd of the differences ``sd``)."""
    return (sd / math.sqrt(n), n - 1) if paired else (sd * math.sqrt(2 / n), 2 * n - 2)


def matches_power(sd: float, n: int, margin: float, paired: bool = False) -> float:
    """P(*matches* | true difference 0) with ``n`` seeds per arm (``paired``: a paired t over ``n`` seeds)."""
    return prob_matches(margin, *_two_sample(sd, n, paired))


def first_n(prob: Callable[[int], float], power: float = 0.8, max_n: int = 400) -> int | None:
    """The smallest n in [2, ``max_n``] with ``prob(n)`` ≥ ``power`` for a ``prob`` that grows with n (bisection);
    None when even ``max_n`` falls short."""
    if prob(max_n) < power:
        return None
    lo, hi = 2, max_n
    if prob(lo) >= power:
        return lo
    while hi - lo > 1:  # prob(lo) < power ≤ prob(hi)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if prob(mid) >= power else (mid, hi)
    return hi


def seeds_for_matches(sd: float, margin: float, power: float = 0.8, paired: bool = False,
                      max_n: int = 400) -> int | None:
    """The fewest seeds per arm for which a true difference of 0 gets *matches* with probability ``power``; None
    when more than ``max_n`` would be needed."""
    return first_n(lambda n: matches_power(sd, n, margin, paired), power, max_n)


def detectable_difference(sd: float, n: int, power: float = 0.8, paired: bool = False) -> float:
    """The true difference at which the verdict *beats* has probability ``power`` (two-sided t at p < 0.05, before
    any multiple-comparison correction), for ``n`` seeds per arm with seed-to-seed sd ``sd``."""
    tau, df = _two_sample(sd, n, paired)
    return float(optimize.brentq(lambda d: prob_beats(d, tau, df) - power, 0.0, 50 * tau))


def seeds_for_difference(sd: float, delta: float, power: float = 0.8, max_n: int = 400) -> int | None:
    """The fewest seeds per arm (two arms) at which a true difference ``delta`` gets *beats* with probability
    ``power``; None beyond ``max_n``."""
    return first_n(lambda n: prob_beats(delta, *_two_sample(sd, n, False)), power, max_n)


def ci_half_width(sd: float, n: int) -> float:
    """The half-width of the 95 % CI of a difference between two arms of ``n`` seeds each with seed-to-seed
    standard deviation ``sd`` when the estimated sd equals ``sd``: t_{0.975, 2n−2} · sd · √(2/n)."""
    return float(stats.t.ppf(0.975, 2 * n - 2) * sd * math.sqrt(2 / n))


def paired_ci_half_width(sd: float, n: int) -> float:
    """The half-width of the 95 % CI of a mean paired difference over ``n`` seeds (sd ``sd`` of the differences):
    t_{0.975, n−1} · sd / √n."""
    return float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n))


def pooled_sd(groups: Sequence[Sequence[float]]) -> tuple[float, int] | None:
    """The pooled within-group standard deviation (ddof 1 per group) over the groups with ≥ 2 values, and its
    degrees of freedom; None when no group has two values."""
    groups = [list(g) for g in groups if len(g) >= 2]
    df = sum(len(g) - 1 for g in groups)
    if not df:
        return None
    ss = sum(sum((x - statistics.fmean(g)) ** 2 for x in g) for g in groups)
    return math.sqrt(ss / df), df
