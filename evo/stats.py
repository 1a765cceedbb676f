"""The few statistics the guard and the scheduler need, without a scipy dependency."""

from __future__ import annotations

import math
import statistics


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def moving_average(last: float | None, value: float, weight: float = 0.3) -> float:
    """An exponential moving average that starts at its first value (last None)."""
    return value if last is None else (1 - weight) * last + weight * value


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction for the regularized incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 300):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((a + m2 - 1) * (a + m2)),
                          -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= d * c
        if abs(d * c - 1.0) < 1e-12:
            break
    return result


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def welch_less(a: list[float], b: list[float], min_std: float = 0.0) -> float:
    """One-sided Welch t-test p-value for H1: mean(a) < mean(b). Needs two or more of each.

    min_std floors each group's standard deviation: a few identical draws say little about the
    noise, and a spread of exactly 0 would make any difference at all "significant"."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's test needs at least two values in each group")
    mean_a, sd_a = mean_std(a)
    mean_b, sd_b = mean_std(b)
    sd_a, sd_b = max(sd_a, min_std), max(sd_b, min_std)
    var_a, var_b = sd_a**2 / len(a), sd_b**2 / len(b)
    if var_a + var_b == 0:
        return 0.0 if mean_a < mean_b else 1.0
    t = (mean_a - mean_b) / math.sqrt(var_a + var_b)
    df = (var_a + var_b) ** 2 / (var_a**2 / (len(a) - 1) + var_b**2 / (len(b) - 1))
    return t_cdf(t, df)


def paired_less(differences: list[float], min_std: float = 0.0) -> float:
    """One-sided paired t-test p-value for H1: the mean difference is below 0 (a - b, one pair per
    seed). Needs two or more pairs; min_std floors their standard deviation, as in welch_less."""
    if len(differences) < 2:
        raise ValueError("a paired test needs at least two pairs")
    mean, sd = mean_std(differences)
    sd = max(sd, min_std)
    if sd == 0:
        return 0.0 if mean < 0 else 1.0
    return t_cdf(mean / (sd / math.sqrt(len(differences))), len(differences) - 1)
