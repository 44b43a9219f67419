"""Paired effects over seeds with a t confidence interval (docs/method.md, evidence protocol).

A distillation effect is the paired difference distilled - baseline per seed; one seed is an
anecdote, so the mean over seeds carries a 95% t-interval, mean +- t_{0.975, n-1} sd / sqrt(n).
The t quantile is computed here (regularised incomplete beta by its continued fraction, then
bisection on the CDF) so the project needs no scipy for it.
"""
from __future__ import annotations

import math
from typing import Iterable

_TINY = 1e-300


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + aa / c
            c = c if abs(c) > _TINY else _TINY
            delta = d * c
            h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for a, b > 0, 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t value with P(T <= t) = p (bisection on t_cdf; ~1e-12 accurate)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def paired_effect(deltas: Iterable[float | None], confidence: float = 0.95) -> dict:
    """Mean of per-seed paired differences with its t-interval.

    Undefined deltas (None/NaN, e.g. an instance bucket empty for a seed) are kept in
    `per_seed` as None and left out of the statistics. `ci_low`/`ci_high`/`sd` are None with
    fewer than two defined values; all statistics are None with none.
    """
    per_seed = [None if d is None or (isinstance(d, float) and math.isnan(d)) else float(d) for d in deltas]
    values = [d for d in per_seed if d is not None]
    n = len(values)
    out = {"n": n, "per_seed": per_seed, "mean": None, "sd": None, "ci_low": None, "ci_high": None,
           "min": min(values) if values else None, "max": max(values) if values else None, "confidence": confidence}
    if n == 0:
        return out
    mean = sum(values) / n
    out["mean"] = mean
    if n >= 2:
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
        out.update(sd=sd, ci_low=mean - half, ci_high=mean + half)
    return out
