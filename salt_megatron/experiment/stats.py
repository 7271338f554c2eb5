"""Paired statistics for the reproduction report: a paired t-test (degrees of freedom, two-sided p-value, 95%
confidence interval of the mean difference) and a sign test, on per-seed differences ``variant - baseline``.

Written out here (Student's t through the regularised incomplete beta function, the binomial sum for the sign test)
so that the report needs no scipy; ``tests/test_experiment.py`` checks them against ``scipy.stats``.
"""

from __future__ import annotations

import dataclasses
import math

ALPHA = 0.05  # "better" / "worse" only below this two-sided p-value


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes' betacf)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                          -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile (q > 0.5) of Student's t, by bisection on the two-sided tail."""
    tail = 2.0 * (1.0 - q)
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > tail:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > tail else (lo, mid)
    return 0.5 * (lo + hi)


@dataclasses.dataclass(frozen=True)
class PairedTest:
    n: int  # paired seeds
    mean: float  # mean of the differences (negative: the variant's loss is lower)
    sd: float  # their sample standard deviation
    df: int  # n - 1
    t: float
    p: float  # two-sided
    ci: tuple[float, float]  # 95% confidence interval of the mean difference
    negatives: int  # seeds where the variant was lower (sign test)
    positives: int  # seeds where it was higher (ties dropped)
    sign_p: float  # two-sided sign test

    @property
    def verdict(self) -> str:
        """'better' / 'worse' at p < 0.05 (paired t-test), else 'no significant difference'; one seed: no verdict."""
        if self.n < 2:
            return "single seed: no verdict"
        if self.p < ALPHA:
            return "better" if self.mean < 0 else "worse"
        return "no significant difference"


def sign_test_p(negatives: int, positives: int) -> float:
    """Two-sided exact binomial test of ``negatives`` against ``positives`` at probability 1/2."""
    n = negatives + positives
    if n == 0:
        return 1.0
    k = min(negatives, positives)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired_test(diffs) -> PairedTest | None:
    """The paired t-test and sign test of per-seed differences (None for no pairs)."""
    d = [float(x) for x in diffs if x is not None]
    n = len(d)
    if n == 0:
        return None
    mean = sum(d) / n
    negatives, positives = sum(x < 0 for x in d), sum(x > 0 for x in d)
    if n == 1:
        return PairedTest(1, mean, math.nan, 0, math.nan, math.nan, (math.nan, math.nan), negatives, positives,
                          sign_test_p(negatives, positives))
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    se = sd / math.sqrt(n)
    t = mean / se if se > 0 else math.copysign(math.inf, mean) if mean else 0.0
    p = t_two_sided_p(t, n - 1) if se > 0 else (0.0 if mean else 1.0)
    half = t_quantile(0.975, n - 1) * se
    return PairedTest(n, mean, sd, n - 1, t, p, (mean - half, mean + half), negatives, positives,
                      sign_test_p(negatives, positives))
