"""Intervals with the sequence as the unit: coverage under clustered read errors, by simulation.

Each simulated sequence has a random number of reads; with probability ``p_bad`` it is "bad"
and then errs on a random share of its reads, as a glitching model does after a far-back
write. The true per-read rate is known exactly, so coverage can be counted.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import t as student_t

from ffinterp.errors import FFInterpError
from ffinterp.intervals import clopper_pearson, read_rate_interval

REPS, SEQS, MAX_SHARE = 600, 2000, 0.6


def simulate(seed: int, p_bad: float) -> tuple[np.ndarray, np.ndarray, float]:
    """``REPS`` samples of ``SEQS`` sequences: per-sequence reads, errors, and the true rate."""
    rng = np.random.default_rng(seed)
    reads = rng.integers(5, 50, size=(REPS, SEQS))
    bad = rng.random((REPS, SEQS)) < p_bad
    share = rng.uniform(0, MAX_SHARE, size=(REPS, SEQS))
    errors = np.where(bad, rng.binomial(reads, share), 0)
    # E[errors] = p_bad E[share] E[reads] (share and reads independent), over E[reads]
    return reads, errors, p_bad * MAX_SHARE / 2


def z_interval(reads: np.ndarray, errors: np.ndarray) -> tuple[float, float]:
    """The plain delta-method interval with a normal quantile (what the t quantile fixes)."""
    n, rate = len(reads), errors.sum() / reads.sum()
    se = math.sqrt(((errors - rate * reads) ** 2).sum() / (n * (n - 1))) / reads.mean()
    return max(0.0, rate - 1.96 * se), rate + 1.96 * se


def covers(interval: tuple[float, float], true: float) -> bool:
    return interval[0] <= true <= interval[1]


@pytest.mark.parametrize(
    ("p_bad", "label"),
    [(0.01, "about 20 erring sequences per sample"), (0.002, "about 4 erring sequences per sample")],
)
def test_cluster_interval_covers_where_the_read_level_interval_does_not(p_bad, label):
    reads, errors, true = simulate(7, p_bad)
    cluster = [covers(read_rate_interval(r, e), true) for r, e in zip(reads, errors)]
    naive = [covers(clopper_pearson(int(e.sum()), int(r.sum())), true) for r, e in zip(reads, errors)]
    assert np.mean(cluster) >= 0.93, (label, np.mean(cluster))
    # reads treated as independent: far too narrow (about 40% coverage here)
    assert np.mean(naive) <= 0.6, (label, np.mean(naive))
    if p_bad < 0.005:  # few erring sequences: the normal quantile undercovers, t does not
        erring = [k for k in range(REPS) if errors[k].sum() > 0]
        z = np.mean([covers(z_interval(reads[k], errors[k]), true) for k in erring])
        assert z <= 0.88 and np.mean([cluster[k] for k in erring]) >= 0.93, z


def test_zero_error_upper_bound_holds_under_clustering():
    """With about 0.6 bad sequences per sample most samples have no error at all: then the
    upper end is CP_upper(0 of n) * r_max / rbar, and it still covers."""
    reads, errors, true = simulate(11, 0.0003)
    zero = [k for k in range(REPS) if errors[k].sum() == 0]
    assert len(zero) > REPS // 3
    for k in zero[:20]:
        r = reads[k]
        bound = (1 - 0.025 ** (1 / SEQS)) * r.max() / r.mean()
        assert read_rate_interval(r, errors[k]) == pytest.approx((0.0, bound), rel=1e-12)
    cluster = [covers(read_rate_interval(r, e), true) for r, e in zip(reads, errors)]
    naive = [covers(clopper_pearson(int(e.sum()), int(r.sum())), true) for r, e in zip(reads, errors)]
    assert np.mean(cluster) >= 0.93 and np.mean(naive) <= 0.5, (np.mean(cluster), np.mean(naive))


def test_the_sequence_level_floor_still_covers_when_errors_do_not_cluster():
    """The floor assumes one error per erring sequence; where that is exactly true it binds
    most often, and the interval must still cover."""
    rng = np.random.default_rng(13)
    reads = rng.integers(5, 50, size=(REPS, SEQS))
    errors = (rng.random((REPS, SEQS)) < 0.003).astype(int)  # bad sequences err exactly once
    true = 0.003 / 27  # E[reads] = (5 + 49) / 2
    cluster = [covers(read_rate_interval(r, e), true) for r, e in zip(reads, errors)]
    assert np.mean(cluster) >= 0.93, np.mean(cluster)


def test_the_interval_is_the_linearised_ratio_interval():
    """By hand: reads 10 each, errors (0, 0, 0, 4). rate 0.1, d = (-1, -1, -1, 3), so
    se = sqrt(12 / (4 * 3)) / 10 = 0.1 and Satterthwaite df = 12^2 / 84. The t interval
    reaches below 0; the floor is 1 error in each erring sequence: CP_low(1 of 4) / 10."""
    lo, hi = read_rate_interval(np.array([10, 10, 10, 10]), np.array([0, 0, 0, 4]))
    half = student_t.ppf(0.975, 144 / 84) * 0.1
    assert half > 0.1 and hi == pytest.approx(0.1 + half, rel=1e-12)
    assert lo == pytest.approx(clopper_pearson(1, 4)[0] / 10, rel=1e-12)
    # the ceiling, where t (df about 1) reaches past it: 1 of 40 sequences errs at each of
    # its 20 reads; at most r_max = 20 errors per erring sequence, rbar = 15
    r, e = np.tile([10, 20], 20), np.zeros(40, dtype=int)
    e[1] = 20
    assert read_rate_interval(r, e)[1] == pytest.approx(clopper_pearson(1, 40)[1] * 20 / 15, rel=1e-12)
    # many erring sequences: t ~ z, the brief's normal interval
    reads, errors, _ = simulate(3, 0.05)
    r, e = reads[0], errors[0]
    z_lo, z_hi = z_interval(r, e)
    lo, hi = read_rate_interval(r, e)
    assert lo == pytest.approx(z_lo, rel=0.02) and hi == pytest.approx(z_hi, rel=0.02)
    assert lo < z_lo and hi > z_hi  # t is a little wider


def test_edges_and_order():
    reads, errors, _ = simulate(5, 0.01)
    r, e = reads[0], errors[0]
    perm = np.random.default_rng(0).permutation(len(r))
    assert read_rate_interval(r, e) == read_rate_interval(r[perm], e[perm])  # bit-identical
    # every sequence errs on the same share: no spread, so the independent-reads interval
    even = np.full(50, 8)
    assert read_rate_interval(even, even // 2) == clopper_pearson(200, 400)
    # one sequence: no spread to measure, only the sequence-level bounds (CP of 1 in 1)
    assert read_rate_interval(np.array([5]), np.array([2])) == pytest.approx((0.025 / 5, 1.0), rel=1e-12)
    assert read_rate_interval(np.array([0, 0]), np.array([0, 0])) == (0.0, 1.0)
    for bad_args, match in [
        ((np.array([3, 3]), np.array([1])), "1-D and alike"),
        ((np.array([3, 3]), np.array([1, 4])), "errors\\[i\\] <= reads\\[i\\]"),
    ]:
        with pytest.raises(FFInterpError, match=match):
            read_rate_interval(*bad_args)
    with pytest.raises(FFInterpError, match="confidence"):
        read_rate_interval(r, e, confidence=1.0)
