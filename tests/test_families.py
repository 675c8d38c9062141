"""Parametric FFL families: exact log-likelihoods (checked against brute-force enumeration),
valid seeded samples, mixtures, vectors and weighted maximum-likelihood fits."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ffinterp.analysis.families import FFL, BitMarkov, Markov, Mixture, Piecewise, interpolate
from ffinterp.errors import FFInterpError
from ffinterp.language import ONE, ZERO, I, Mix, R, W, sample, validate_batch

MARKOV = Markov(
    tuple(
        tuple(x / s for x in row)
        for row in ((5, 2, 1, 2), (1, 1, 1, 7), (3, 3, 2, 2), (1, 1, 2, 16))
        for s in [sum(row)]
    )
)
FAMILIES = {
    "ffl": FFL(0.2, 0.3, 0.5),
    "bitmarkov": BitMarkov(0.4, 0.2, 0.4, q=0.85),
    "piecewise": Piecewise(((0.6, 0.1, 0.3), (0.1, 0.5, 0.4)), flips=(0.9, 0.2)),
    "piecewise-ones": Piecewise(((0.5, 0.2, 0.3), (0.2, 0.3, 0.5), (0.3, 0.3, 0.4)), ones=(0.9, 0.1, 0.6)),
    "markov": MARKOV,
    "markov2": Markov(tuple(MARKOV.transitions[k % 4] for k in range(16))[::-1]),
    "mixture": Mixture((FFL(0.1, 0.1, 0.8), BitMarkov(0.5, 0.3, 0.2, q=0.1)), (0.3, 0.7)),
}


def _all_sequences(seq_len: int) -> torch.Tensor:
    """Every token sequence with instructions and bits in their slots (valid or not)."""
    pairs = seq_len // 2
    rows = []
    for instr in itertools.product((W, R, I), repeat=pairs):
        for bits in itertools.product((ZERO, ONE), repeat=pairs):
            rows.append([t for pair in zip(instr, bits) for t in pair])
    return torch.tensor(rows)


def _reference_prob(family, row: list[int]) -> float:
    """The generative story of each family, one sequence at a time, in plain Python."""
    if isinstance(family, Mixture):
        return sum(w * _reference_prob(c, row) for c, w in zip(family.components, family.weights))
    instr, bits = row[0::2], [b - ZERO for b in row[1::2]]
    pairs = len(instr)
    if instr[0] != W or instr[-1] != R:
        return 0.0
    p, last_bit, hist = 1.0, None, []
    for j, (a, b) in enumerate(zip(instr, bits)):
        if a == R:
            if last_bit is None or b != last_bit:
                return 0.0
        if isinstance(family, Markov):
            s = {W: 0 if (last_bit is None or b == last_bit) else 1, R: 2, I: 3}[a]
            if 0 < j < pairs - 1:
                ctx = sum(([0] * family.order + hist)[-1 - k] * 4**k for k in range(family.order))
                p *= family.transitions[ctx][s]
            hist.append(0 if j == 0 else s)
            if a == I or j == 0:
                p *= 0.5
        else:
            if isinstance(family, Piecewise):
                seg = min(max(j - 1, 0), pairs - 3) * family.k // (pairs - 2)
                probs = family.segments[seg]
                flip = family.flips[seg] if family.flips else 0.5
                one = family.ones[seg] if family.ones else None
            else:
                probs = (family.p_w, family.p_r, family.p_i)
                flip, one = getattr(family, "q", 0.5), None
            if 0 < j < pairs - 1:
                p *= probs[{W: 0, R: 1, I: 2}[a]]
            if a == I:
                p *= 0.5
            elif a == W:
                if one is not None:
                    p *= one if b == 1 else 1 - one
                elif last_bit is None:
                    p *= 0.5
                else:
                    p *= flip if b != last_bit else 1 - flip
        if a == W:
            last_bit = b
    return p


@pytest.mark.parametrize("name", list(FAMILIES))
def test_log_prob_is_exact_against_enumeration(name):
    family = FAMILIES[name]
    seqs = _all_sequences(10)  # 3^5 * 2^5 = 7776 sequences
    lp = family.log_prob(seqs)
    assert lp.dtype == torch.float64
    ref = torch.tensor([_reference_prob(family, r) for r in seqs.tolist()], dtype=torch.float64)
    assert torch.allclose(lp.exp(), ref, rtol=1e-10, atol=1e-15)
    assert float(lp.exp().sum()) == pytest.approx(1.0, abs=1e-12)
    assert bool(torch.isneginf(lp[ref == 0]).all())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_samples_are_valid_seeded_and_follow_log_prob(name):
    family = FAMILIES[name]
    x = family.sample(3000, 10, seed=4)
    validate_batch(x)
    assert torch.equal(x, family.sample(3000, 10, seed=4))
    assert not torch.equal(x, family.sample(3000, 10, seed=5))
    assert torch.equal(family.sample(700, 10, seed=4, offset=1500), x[1500:2200])
    assert bool(torch.isfinite(family.log_prob(x)).all())
    # Empirical frequencies of the most common sequences match exp(log_prob).
    uniq, counts = x.unique(dim=0, return_counts=True)
    top = counts.argsort(descending=True)[:5]
    p = family.log_prob(uniq[top]).exp()
    freq = counts[top].double() / len(x)
    assert torch.all((freq - p).abs() <= 4 * (p * (1 - p) / len(x)).sqrt() + 1e-3)
    reads = (x[:, 0::2] == R).sum(1).double().mean()
    assert float(reads) == pytest.approx(family.expected_reads(10), abs=0.1)


def test_ffl_sampler_agrees_with_language_sample():
    fam = FFL(0.3, 0.2, 0.5)
    a = fam.sample(8000, 64, seed=0)
    b = sample(8000, 64, mix=Mix(0.3, 0.2, 0.5), seed=0)
    for tok in (W, R, I):
        fa = float((a[:, 2:-2:2] == tok).double().mean())
        fb = float((b[:, 2:-2:2] == tok).double().mean())
        assert fa == pytest.approx(fb, abs=0.01)
    assert float((a[:, 1::2] == ONE).double().mean()) == pytest.approx(0.5, abs=0.01)
    assert float(Markov.from_ffl(0.3, 0.2, 0.5).log_prob(b).sub(fam.log_prob(b)).abs().max()) < 1e-9
    assert float(BitMarkov(0.3, 0.2, 0.5, 0.5).log_prob(b).sub(fam.log_prob(b)).abs().max()) < 1e-9


def test_invalid_sequences_have_zero_probability():
    good = FFL(0.2, 0.3, 0.5).sample(1, 8, seed=0)[0]
    bad_read = torch.tensor([W, ONE, R, ZERO, I, ZERO, R, ONE])  # read contradicts the write
    no_write = torch.tensor([I, ONE, R, ONE, I, ZERO, R, ONE])
    lp = FFL(0.2, 0.3, 0.5).log_prob(torch.stack([good, bad_read, no_write]))
    assert math.isfinite(float(lp[0])) and bool(torch.isneginf(lp[1:]).all())
    assert bool(torch.isneginf(FFL(0.5, 0.5, 0.0).log_prob(torch.tensor([[W, ONE, I, ZERO, R, ONE]]))).all())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_vector_round_trip(name):
    family = FAMILIES[name]
    v = family.to_vector()
    assert v.dtype == torch.float64 and v.numel() == family.n_params
    back = family.from_vector(v)
    x = family.sample(50, 12, seed=1)
    assert torch.allclose(back.log_prob(x), family.log_prob(x), atol=1e-9)
    moved = family.from_vector(v + torch.randn(v.numel(), generator=torch.Generator().manual_seed(0)))
    assert type(moved) is type(family)
    with pytest.raises(FFInterpError):
        family.from_vector(torch.zeros(v.numel() + 1))


def _params(family) -> torch.Tensor:
    """Every probability of a slot or Markov family, flattened."""
    out = []

    def walk(v):
        if isinstance(v, tuple):
            for x in v:
                walk(x)
        elif isinstance(v, float):
            out.append(v)

    for name in family.__dataclass_fields__:
        walk(getattr(family, name))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize(
    "truth",
    [
        FFL(0.25, 0.15, 0.6),
        BitMarkov(0.3, 0.2, 0.5, q=0.8),
        Piecewise(((0.5, 0.1, 0.4), (0.1, 0.3, 0.6)), flips=(0.2, 0.7)),
        Piecewise(((0.5, 0.1, 0.4), (0.1, 0.3, 0.6)), ones=(0.2, 0.9)),
        MARKOV,
    ],
)
def test_fit_recovers_parameters(truth):
    x = truth.sample(20000, 32, seed=2)
    start = truth.from_vector(torch.zeros(truth.n_params))
    fitted = start.fit(x)
    assert torch.allclose(_params(fitted), _params(truth), atol=0.02)
    # Weighted: duplicating rows equals doubling their weights.
    w = torch.ones(len(x), dtype=torch.float64)
    w[:5000] = 2.0
    a = start.fit(x, w)
    b = start.fit(torch.cat([x, x[:5000]]))
    assert torch.allclose(a.to_vector(), b.to_vector(), atol=1e-9)


def test_mixture_log_prob_sample_and_em():
    a, b = FFL(0.05, 0.05, 0.9), FFL(0.45, 0.45, 0.1)
    mix = Mixture((a, b), (0.3, 0.7))
    x = mix.sample(6000, 32, seed=3)
    expect = torch.logaddexp(a.log_prob(x) + math.log(0.3), b.log_prob(x) + math.log(0.7))
    assert torch.allclose(mix.log_prob(x), expect)
    fitted = Mixture((FFL(0.2, 0.2, 0.6), FFL(0.35, 0.35, 0.3)), (0.5, 0.5)).fit(x, steps=20)
    assert fitted.weights[0] == pytest.approx(0.3, abs=0.03)
    assert fitted.components[0].p_i == pytest.approx(0.9, abs=0.02)
    assert fitted.components[1].p_i == pytest.approx(0.1, abs=0.02)
    with pytest.raises(FFInterpError):
        Mixture((a, b), (0.5, 0.6))


def test_interpolate_and_checks():
    a, b = FFL(0.1, 0.1, 0.8), FFL(0.5, 0.3, 0.2)
    mid = interpolate(a, b, 0.5)
    assert (mid.p_w, mid.p_r, mid.p_i) == pytest.approx((0.3, 0.2, 0.5))
    with pytest.raises(FFInterpError):
        interpolate(a, BitMarkov(0.1, 0.1, 0.8), 0.5)
    with pytest.raises(FFInterpError):
        FFL(0.5, 0.5, 0.5)
    with pytest.raises(FFInterpError):
        Piecewise(((0.2, 0.3, 0.5),), flips=(0.5,), ones=(0.5,))
    with pytest.raises(FFInterpError):
        FFL(0.2, 0.3, 0.5).sample(3, 7, seed=0)
