"""Confidence intervals for error rates, with the sequence as the sampling unit.

A flip-flop model's read errors cluster: a sequence whose last write sits far back tends to
fool the read head at every read until the next write, so one sequence can hold several
errors while thousands hold none. Reads are therefore not independent trials, and the exact
binomial (Clopper-Pearson) interval over reads is too narrow. What is independent is the
sequence, and both intervals here are built on it:

- P(a sequence errs at least once): an exact Clopper-Pearson interval over sequences.
- The per-read error rate: :func:`read_rate_interval`, from per-sequence read and error counts.

Clopper-Pearson comes from ``scipy.stats.beta`` (imported on first use: it is slow to import).
"""

from __future__ import annotations

import math

import numpy as np
from jaxtyping import Int
from torch import Tensor

from ffinterp.errors import FFInterpError


def clopper_pearson(errors: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact two-sided (1 - alpha) binomial interval for ``errors`` successes in ``n`` trials.

    Valid when the ``n`` trials are independent: sequences of an evaluation set, not reads.
    0 errors gives [0, 1 - (alpha/2)^(1/n)].
    """
    if n < 0 or not 0 <= errors <= n:
        raise FFInterpError(f"clopper_pearson: need 0 <= errors <= n, got errors={errors}, n={n}")
    if not 0 < alpha < 1:
        raise FFInterpError(f"clopper_pearson: alpha must be in (0, 1), got {alpha}")
    if n == 0:
        return 0.0, 1.0
    from scipy.stats import beta

    q = alpha / 2
    lo = 0.0 if errors == 0 else float(beta.ppf(q, errors, n - errors + 1))
    hi = 1.0 if errors == n else float(beta.ppf(1 - q, errors + 1, n - errors))
    return lo, hi


def read_rate_interval(
    reads: Int[np.ndarray, " seqs"] | Int[Tensor, " seqs"],
    errors: Int[np.ndarray, " seqs"] | Int[Tensor, " seqs"],
    confidence: float = 0.95,
) -> tuple[float, float]:
    """A (confidence) interval for the per-read error rate that holds when errors cluster.

    ``reads[i]`` and ``errors[i]`` are sequence i's read and error counts (arrays or
    tensors); the sequences are the independent units. The rate is the ratio estimator
    q = sum(errors) / sum(reads), whose linearised (delta-method) variance is

        se^2 = sum_i (e_i - q r_i)^2 / (n (n - 1) rbar^2),   rbar = sum(reads) / n.

    With few erring sequences a normal quantile undercovers: the sum is carried by a handful
    of sequences, so se itself is uncertain. The quantile is therefore Student's t with the
    Welch-Satterthwaite degrees of freedom of that sum of squares,
    (sum d_i^2)^2 / sum d_i^4 with d_i = e_i - q r_i: about the number of erring sequences
    when they err alike, fewer when one dominates, n - 1 at most, 1 at least. The t interval
    is widened, where narrower, to the exact interval for independent reads (which also
    settles the degenerate case where every sequence errs at the same rate, se = 0).

    Then it is kept within what the sequence-level interval [s_lo, s_hi] for P(a sequence
    errs) implies under any clustering: an erring sequence has at least 1 and at most r_max
    errors, so s_lo / rbar <= rate <= s_hi * r_max / rbar, where r_max is the most reads in
    one sequence of the sample (strictly, the most a sequence can hold; the sample's largest
    stands in). The lower bound keeps a rate with errors seen off 0 when the t interval
    reaches it; with 0 errors the upper bound is the whole answer: [0, CP_upper(0 erring
    sequences of n) * r_max / rbar].

    On simulated clustered errors (``tests/test_intervals.py``: 600 samples of 2,000
    sequences, about 4 or 20 of them erring) it covers the true rate in 96% of samples, where
    the normal quantile covers 85% and 94% and the read-level Clopper-Pearson interval 38%
    and 40%.
    """
    r = np.asarray(reads, dtype=np.float64).reshape(-1)
    e = np.asarray(errors, dtype=np.float64).reshape(-1)
    if np.shape(reads) != np.shape(errors) or np.ndim(reads) != 1:
        raise FFInterpError(
            f"read_rate_interval: reads and errors must be 1-D and alike, got shapes "
            f"{np.shape(reads)} and {np.shape(errors)}"
        )
    if not 0 < confidence < 1:
        raise FFInterpError(f"read_rate_interval: confidence must be in (0, 1), got {confidence}")
    if len(r) and not ((e >= 0).all() and (e <= r).all()):
        raise FFInterpError("read_rate_interval: need 0 <= errors[i] <= reads[i] for every sequence")
    n, total, wrong = len(r), int(r.sum()), int(e.sum())
    alpha = 1 - confidence
    if total == 0:
        return 0.0, 1.0
    rbar = total / n
    k = int((e > 0).sum())
    s_lo, s_hi = clopper_pearson(k, n, alpha)
    floor, ceiling = s_lo / rbar, min(1.0, s_hi * float(r.max()) / rbar)
    if wrong == 0 or n < 2:  # no spread to measure
        return floor, ceiling
    from scipy.stats import t as student_t

    rate = wrong / total
    d = e - rate * r
    # fsum: the exactly rounded sum, so the result does not depend on the order of the
    # sequences (a torchrun job gathers them rank by rank)
    ss = math.fsum(d * d)
    se = math.sqrt(ss / (n * (n - 1))) / rbar
    fourth = math.fsum(d**4)
    df = min(max(ss * ss / fourth, 1.0), n - 1) if fourth > 0 else n - 1
    half = float(student_t.ppf(1 - alpha / 2, df)) * se
    lo, hi = clopper_pearson(wrong, total, alpha)
    # floor <= rate <= ceiling always (1 <= errors of an erring sequence <= r_max)
    return max(floor, min(rate - half, lo)), min(ceiling, max(rate + half, hi))


__all__ = ["clopper_pearson", "read_rate_interval"]
