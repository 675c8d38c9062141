"""Parametric families of flip-flop distributions, with exact log-likelihoods.

Rare-event estimation (:mod:`ffinterp.analysis.tail`) samples from one distribution and
reweights to another, so every family here has both a seeded vectorised sampler and an
exact ``log_prob`` (``-inf`` for sequences it cannot produce). The families are frozen
records:

- :class:`FFL` ``(p_w, p_r, p_i)``: the paper's language (middle instructions i.i.d.);
- :class:`Piecewise`: K equal segments of the middle instruction slots, each with its own
  ``(p_w, p_r, p_i)`` and, optionally, its own write-flip probability;
- :class:`BitMarkov`: FFL instructions, but each write's bit (after the first) flips
  relative to the previous write's bit with probability ``q``;
- :class:`Mixture`: components with weights (``log_prob`` by logsumexp).

The first instruction is always a write and the last a read; the bit after a write or an
ignore is a fair coin unless a flip probability says otherwise (a write that flips with
probability 1/2 is a fair coin); the bit after a read is the last write's bit.

Each family also maps to and from a flat unconstrained vector (log-probabilities,
logits of flip probabilities, log-weights) for black-box optimisers such as CMA-ES, and
has a weighted maximum-likelihood :meth:`Family.fit` for cross-entropy-method refits
(closed-form counts, exact for the slot families; EM steps for a mixture).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Float64, Int
from torch import Tensor

from ffinterp.errors import FFInterpError
from ffinterp.language import BLOCK_ROWS, ONE, ZERO, FFLError, I, R, W

_EPS = 1e-12  # floor on probabilities before a log, so vectors stay finite


def _check_triple(name: str, probs: tuple[float, float, float]) -> None:
    if len(probs) != 3 or any(not p >= 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
        raise FFInterpError(
            f"{name}: (p_w, p_r, p_i) must be 3 non-negative numbers summing to 1, got {probs}"
        )


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise FFInterpError(f"{name} must lie in [0, 1], got {p}")


def _check_len(seq_len: int) -> int:
    if seq_len < 4 or seq_len % 2:
        raise FFLError(f"seq_len must be an even number >= 4 (a write and a read), got {seq_len}")
    return seq_len // 2


class Family:
    """A distribution over FFL sequences of any even length: sampler, exact likelihood, fit."""

    def sample(self, n: int, seq_len: int, *, seed: int, offset: int = 0) -> Int[Tensor, "n seq"]:
        """Rows ``offset .. offset+n`` of this family's seeded stream (int64 tokens).

        Rows come in fixed blocks seeded by (seed, block), so any slice is the same whoever
        generates it, as with :func:`ffinterp.language.sample`.
        """
        _check_len(seq_len)
        if n < 0 or offset < 0:
            raise FFLError(f"n and offset must be non-negative, got n={n}, offset={offset}")
        out = torch.empty((n, seq_len), dtype=torch.long)
        if n == 0:
            return out
        for block in range(offset // BLOCK_ROWS, (offset + n - 1) // BLOCK_ROWS + 1):
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, block])))
            arr = self._sample_rows(rng, BLOCK_ROWS, seq_len)
            lo, hi = max(offset, block * BLOCK_ROWS), min(offset + n, (block + 1) * BLOCK_ROWS)
            start = lo - block * BLOCK_ROWS
            out[lo - offset : hi - offset] = torch.from_numpy(arr[start : start + hi - lo])
        return out

    def draw(self, n: int, seq_len: int, rng: np.random.Generator) -> Int[Tensor, "n seq"]:
        """``n`` rows from an explicit generator, outside the block stream.

        For searches that score many small samples of many distributions (the distribution
        adversary): :meth:`sample` generates whole blocks of 1024 rows, 150x the cost of 64.
        """
        _check_len(seq_len)
        if n < 0:
            raise FFLError(f"n must be non-negative, got {n}")
        return (
            torch.from_numpy(self._sample_rows(rng, n, seq_len))
            if n
            else torch.empty((0, seq_len), dtype=torch.long)
        )

    def _sample_rows(self, rng: np.random.Generator, rows: int, seq_len: int) -> np.ndarray:
        raise NotImplementedError

    def log_prob(self, tokens: Int[Tensor, "batch seq"]) -> Float64[Tensor, " batch"]:
        """Exact log-likelihood of each row; ``-inf`` where the family cannot produce it."""
        raise NotImplementedError

    def fit(self, tokens: Int[Tensor, "batch seq"], weights: Float[Tensor, " batch"] | None = None) -> Family:
        """Weighted maximum-likelihood refit of this family's parameters (same structure)."""
        raise NotImplementedError

    def to_vector(self) -> Float64[Tensor, " params"]:
        """The parameters as one unconstrained vector (see :meth:`from_vector`)."""
        raise NotImplementedError

    def from_vector(self, v: Float[Tensor, " params"]) -> Family:
        """A family of this structure from an unconstrained vector (any real values)."""
        raise NotImplementedError

    @property
    def n_params(self) -> int:
        return int(self.to_vector().numel())

    def expected_reads(self, seq_len: int) -> float:
        """E[number of reads] in a sequence of ``seq_len`` tokens (the final read included)."""
        raise NotImplementedError


# ---------------------------------------------------------------- slot families


def _split(tokens: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(instructions, bits 0/1, valid rows, slot of the last write at or before each slot)."""
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[1] < 4 or tokens.shape[1] % 2:
        raise FFLError(
            f"expected a batch of even-length sequences (>= 4 tokens), got shape {tuple(tokens.shape)}"
        )
    tokens = tokens.long().cpu()
    instr, bit_tok = tokens[:, 0::2], tokens[:, 1::2]
    valid = ((instr >= W) & (instr <= I)).all(1) & ((bit_tok == ZERO) | (bit_tok == ONE)).all(1)
    valid &= (instr[:, 0] == W) & (instr[:, -1] == R)
    instr = instr.clamp(W, I)
    bits = (bit_tok == ONE).long()
    slots = torch.arange(instr.shape[1]).expand_as(instr)
    lw = torch.cummax(torch.where(instr == W, slots, torch.full_like(slots, -1)), dim=1).values
    lw_bit = bits.gather(1, lw.clamp_min(0))
    valid &= ((instr != R) | ((lw >= 0) & (bits == lw_bit))).all(1)
    return instr, bits, valid, lw


class _SlotFamily(Family):
    """Instruction slots drawn independently (per-slot probabilities), write bits a Markov
    chain over writes (per-slot flip probability); the shared engine of FFL, Piecewise and
    BitMarkov."""

    def _tables(self, pairs: int) -> tuple[np.ndarray, np.ndarray]:
        """(instruction probabilities [pairs, 3], write-flip probability [pairs])."""
        raise NotImplementedError

    def _ones(self, pairs: int) -> np.ndarray | None:
        """P(a write's bit is 1) per slot, for families whose write bits are independent
        (then flips are unused); None for the Markov chain over writes."""
        return None

    def _from_stats(self, counts: np.ndarray, flips: np.ndarray, ones: np.ndarray) -> Family:
        """Refit from weighted per-slot counts: instructions [pairs, 3], (flip, stay) of
        later writes [pairs, 2], (bit 1, bit 0) of every write [pairs, 2]."""
        raise NotImplementedError

    def _sample_rows(self, rng: np.random.Generator, rows: int, seq_len: int) -> np.ndarray:
        pairs = seq_len // 2
        probs, flip = self._tables(pairs)
        u = rng.random((rows, pairs))
        instr = (u >= probs[:, 0]).astype(np.int64) + (u >= probs[:, 0] + probs[:, 1])
        instr[:, 0], instr[:, -1] = W, R
        coins = rng.random((rows, pairs))
        is_w = instr == W
        ones = self._ones(pairs)
        if ones is None:
            flipped = is_w & (coins < flip)
            flipped[:, 0] = False
            # A write's bit is the first write's fair bit XOR the flips so far.
            chain = (coins[:, :1] < 0.5).astype(np.int64) ^ (np.cumsum(flipped, axis=1) & 1)
        else:
            # Independent write bits; a read repeats the last write's (forward fill).
            slots = np.arange(pairs)
            lw = np.maximum.accumulate(np.where(is_w, slots, 0), axis=1)
            written = (coins < ones).astype(np.int64)
            chain = np.take_along_axis(written, lw, axis=1)
        bits = np.where(instr == I, (coins < 0.5).astype(np.int64), chain)
        out = np.empty((rows, seq_len), dtype=np.int64)
        out[:, 0::2] = instr
        out[:, 1::2] = bits + ZERO
        return out

    def log_prob(self, tokens: Int[Tensor, "batch seq"]) -> Float64[Tensor, " batch"]:
        instr, bits, valid, lw = _split(tokens)
        pairs = instr.shape[1]
        probs, flip = (torch.from_numpy(a) for a in self._tables(pairs))
        lp_instr = probs.log().expand(len(instr), -1, -1).gather(2, instr[..., None]).squeeze(-1)
        total = lp_instr[:, 1:-1].sum(1)
        # Bits: the first write and every ignore are fair coins; a later write flips (or not)
        # relative to the previous write's bit; a read's bit is determined.
        prev_bit = bits.gather(1, torch.cat([lw[:, :1], lw[:, :-1]], 1).clamp_min(0))
        is_flip = bits != prev_bit
        lp_write = torch.where(is_flip, flip.log(), torch.log1p(-flip)).expand_as(lp_instr)
        half = math.log(0.5)
        ones = self._ones(pairs)
        if ones is not None:
            one = torch.from_numpy(ones)
            lp_write = torch.where(bits == 1, one.log(), torch.log1p(-one))
        lp_bit = torch.where(instr == I, half, torch.where(instr == W, lp_write, 0.0))
        if ones is None:
            lp_bit[:, 0] = half
        total = total + lp_bit.sum(1)
        return torch.where(valid, total, torch.tensor(-math.inf, dtype=torch.float64))

    def _stats(self, tokens: Tensor, weights: Tensor | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        instr, bits, valid, lw = _split(tokens)
        if not bool(valid.all()):
            k = int((~valid).nonzero()[0])
            raise FFLError(f"fit: sequence {k} is not a valid flip-flop sequence")
        w = (
            torch.ones(len(instr), dtype=torch.float64)
            if weights is None
            else torch.as_tensor(weights).double()
        )
        if w.shape != (len(instr),) or bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
            raise FFInterpError(
                f"fit: need one finite non-negative weight per sequence, got shape {tuple(w.shape)}"
            )
        pairs = instr.shape[1]
        onehot = torch.nn.functional.one_hot(instr, 3).double()
        counts = torch.einsum("b,bpc->pc", w, onehot)
        counts[0], counts[-1] = 0.0, 0.0
        prev_bit = bits.gather(1, torch.cat([lw[:, :1], lw[:, :-1]], 1).clamp_min(0))
        later_write = (instr == W) & (torch.arange(pairs) > 0)
        flip = (later_write & (bits != prev_bit)).double()
        stay = (later_write & (bits == prev_bit)).double()
        flips = torch.stack([w @ flip, w @ stay], 1)
        is_w = instr == W
        ones = torch.stack([w @ (is_w & (bits == 1)).double(), w @ (is_w & (bits == 0)).double()], 1)
        return counts.numpy(), flips.numpy(), ones.numpy()

    def fit(self, tokens: Int[Tensor, "batch seq"], weights: Float[Tensor, " batch"] | None = None) -> Family:
        counts, flips, ones = self._stats(tokens, weights)
        if counts.sum() <= 0 and ones.sum() <= 0:
            return self
        return self._from_stats(counts, flips, ones)

    def expected_reads(self, seq_len: int) -> float:
        probs, _ = self._tables(_check_len(seq_len))
        return 1.0 + float(probs[1:-1, 1].sum())


def _normalise(counts: np.ndarray, old: tuple[float, float, float]) -> tuple[float, float, float]:
    total = float(counts.sum())
    if total <= 0:
        return old
    return tuple(float(c) / total for c in counts)  # type: ignore[return-value]


def _flip_rate(flips: np.ndarray, old: float) -> float:
    total = float(flips.sum())
    return old if total <= 0 else float(flips[0]) / total


def _log_triple(p: tuple[float, ...]) -> list[float]:
    return [math.log(max(x, _EPS)) for x in p]


def _softmax3(v: Tensor) -> tuple[float, float, float]:
    p = torch.as_tensor(v, dtype=torch.float64).softmax(0)
    return tuple(float(x) for x in p)  # type: ignore[return-value]


def _logit(p: float) -> float:
    p = min(max(p, _EPS), 1 - _EPS)
    return math.log(p / (1 - p))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _vector_of(name: str, v: Tensor, n: int) -> Tensor:
    v = torch.as_tensor(v, dtype=torch.float64).flatten()
    if v.numel() != n:
        raise FFInterpError(f"{name}.from_vector: expected {n} values, got {v.numel()}")
    return v


@dataclass(frozen=True)
class FFL(_SlotFamily):
    """FFL(p_w, p_r, p_i): i.i.d. middle instructions, fair bits (the paper's language)."""

    p_w: float
    p_r: float
    p_i: float

    def __post_init__(self) -> None:
        _check_triple("FFL", (self.p_w, self.p_r, self.p_i))

    @classmethod
    def from_p_i(cls, p_i: float) -> FFL:
        """FFL(p_i): writes and reads share the remaining mass equally."""
        if not 0.0 <= p_i < 1.0:
            raise FFInterpError(f"p_i must lie in [0, 1), got {p_i}")
        return cls((1 - p_i) / 2, (1 - p_i) / 2, p_i)

    def __str__(self) -> str:
        return f"FFL(p_w={self.p_w:.4g}, p_r={self.p_r:.4g}, p_i={self.p_i:.4g})"

    def _tables(self, pairs: int) -> tuple[np.ndarray, np.ndarray]:
        probs = np.tile(np.array([self.p_w, self.p_r, self.p_i], dtype=np.float64), (pairs, 1))
        return probs, np.full(pairs, 0.5)

    def _from_stats(self, counts: np.ndarray, flips: np.ndarray, ones: np.ndarray) -> FFL:
        return FFL(*_normalise(counts.sum(0), (self.p_w, self.p_r, self.p_i)))

    def to_vector(self) -> Float64[Tensor, " 3"]:
        return torch.tensor(_log_triple((self.p_w, self.p_r, self.p_i)), dtype=torch.float64)

    def from_vector(self, v: Float[Tensor, " 3"]) -> FFL:
        return FFL(*_softmax3(_vector_of("FFL", v, 3)))


@dataclass(frozen=True)
class BitMarkov(_SlotFamily):
    """FFL instructions; each write's bit after the first flips w.p. ``q`` (0.5: FFL)."""

    p_w: float
    p_r: float
    p_i: float
    q: float = 0.5

    def __post_init__(self) -> None:
        _check_triple("BitMarkov", (self.p_w, self.p_r, self.p_i))
        _check_prob("BitMarkov q", self.q)

    def __str__(self) -> str:
        return f"BitMarkov(p_w={self.p_w:.4g}, p_r={self.p_r:.4g}, p_i={self.p_i:.4g}, q={self.q:.4g})"

    def _tables(self, pairs: int) -> tuple[np.ndarray, np.ndarray]:
        probs = np.tile(np.array([self.p_w, self.p_r, self.p_i], dtype=np.float64), (pairs, 1))
        return probs, np.full(pairs, float(self.q))

    def _from_stats(self, counts: np.ndarray, flips: np.ndarray, ones: np.ndarray) -> BitMarkov:
        triple = _normalise(counts.sum(0), (self.p_w, self.p_r, self.p_i))
        return BitMarkov(*triple, q=_flip_rate(flips.sum(0), self.q))

    def to_vector(self) -> Float64[Tensor, " 4"]:
        return torch.tensor(
            [*_log_triple((self.p_w, self.p_r, self.p_i)), _logit(self.q)], dtype=torch.float64
        )

    def from_vector(self, v: Float[Tensor, " 4"]) -> BitMarkov:
        v = _vector_of("BitMarkov", v, 4)
        return BitMarkov(*_softmax3(v[:3]), q=_sigmoid(float(v[3])))


@dataclass(frozen=True)
class Piecewise(_SlotFamily):
    """K equal segments of the middle instruction slots, each with its own (p_w, p_r, p_i).

    Slot j of the middle slots ``1 .. P-2`` (P = T/2) lies in segment
    ``floor((j-1) * K / (P-2))``. Write bits are fair coins by default; ``flips`` (one per
    segment) makes them a Markov chain like :class:`BitMarkov`, with the flip probability of
    the segment the new write lies in; ``ones`` (one per segment) instead draws each write's
    bit independently, 1 with that segment's probability (the first slot counts as segment
    0), which expresses "writes of one bit here, of the other there" (decoys before a last
    write). ``fit`` refits whichever is given and leaves fair bits fair.
    """

    segments: tuple[tuple[float, float, float], ...]
    flips: tuple[float, ...] | None = None
    ones: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "segments", tuple(tuple(float(x) for x in s) for s in self.segments))
        if not self.segments:
            raise FFInterpError("Piecewise needs at least one segment")
        for k, s in enumerate(self.segments):
            _check_triple(f"Piecewise segment {k}", s)  # type: ignore[arg-type]
        if self.flips is not None:
            object.__setattr__(self, "flips", tuple(float(q) for q in self.flips))
            if len(self.flips) != len(self.segments):
                raise FFInterpError(f"Piecewise: {len(self.segments)} segments but {len(self.flips)} flips")
            for q in self.flips:
                _check_prob("Piecewise flip", q)
        if self.ones is not None:
            if self.flips is not None:
                raise FFInterpError("Piecewise: give flips or ones, not both")
            object.__setattr__(self, "ones", tuple(float(q) for q in self.ones))
            if len(self.ones) != len(self.segments):
                raise FFInterpError(f"Piecewise: {len(self.segments)} segments but {len(self.ones)} ones")
            for q in self.ones:
                _check_prob("Piecewise ones", q)

    @classmethod
    def uniform(
        cls, k: int, p_w: float, p_r: float, p_i: float, flip: float | None = None, one: float | None = None
    ) -> Piecewise:
        """K segments that all share (p_w, p_r, p_i) (and one flip or bit-1 probability, if given)."""
        return cls(
            ((p_w, p_r, p_i),) * k, None if flip is None else (flip,) * k, None if one is None else (one,) * k
        )

    def __str__(self) -> str:
        segs = ", ".join(f"({a:.3g}, {b:.3g}, {c:.3g})" for a, b, c in self.segments)
        flips = "" if self.flips is None else ", flips=(" + ", ".join(f"{q:.3g}" for q in self.flips) + ")"
        ones = "" if self.ones is None else ", ones=(" + ", ".join(f"{q:.3g}" for q in self.ones) + ")"
        return f"Piecewise([{segs}]{flips}{ones})"

    def describe(self, seq_len: int) -> list[dict]:
        """Each segment labelled, at ``seq_len`` tokens: its first and last token position
        (the first slot, always a write, counts in segment 0, the last, always a read, in the
        last one), ``p_w``, ``p_r``, ``p_i`` and, where given, ``one`` or ``flip``; what the
        bare tuples of ``str`` leave to the reader."""
        seg = self.segment_of(seq_len // 2)
        out = []
        for k, (p_w, p_r, p_i) in enumerate(self.segments):
            slots = np.flatnonzero(seg == k)
            if not len(slots):  # more segments than middle slots
                continue
            d = {"segment": k, "start": int(2 * slots[0]), "end": int(2 * slots[-1] + 1)}
            d |= {"p_w": p_w, "p_r": p_r, "p_i": p_i}
            if self.ones is not None:
                d["one"] = self.ones[k]
            if self.flips is not None:
                d["flip"] = self.flips[k]
            out.append(d)
        return out

    @property
    def k(self) -> int:
        return len(self.segments)

    def segment_of(self, pairs: int) -> np.ndarray:
        """Segment index of every instruction slot (the first and last slot are fixed)."""
        mid = max(pairs - 2, 1)
        seg = (np.arange(pairs) - 1).clip(0, mid - 1) * self.k // mid
        return seg.astype(np.int64)

    def _tables(self, pairs: int) -> tuple[np.ndarray, np.ndarray]:
        seg = self.segment_of(pairs)
        probs = np.asarray(self.segments, dtype=np.float64)[seg]
        flip = np.full(pairs, 0.5) if self.flips is None else np.asarray(self.flips, dtype=np.float64)[seg]
        return probs, flip

    def _ones(self, pairs: int) -> np.ndarray | None:
        return None if self.ones is None else np.asarray(self.ones, dtype=np.float64)[self.segment_of(pairs)]

    def _from_stats(self, counts: np.ndarray, flips: np.ndarray, ones: np.ndarray) -> Piecewise:
        seg = self.segment_of(len(counts))
        segments, new_flips, new_ones = [], [], []
        for k in range(self.k):
            mine = seg == k
            segments.append(_normalise(counts[mine].sum(0), self.segments[k]))
            if self.flips is not None:
                new_flips.append(_flip_rate(flips[mine].sum(0), self.flips[k]))
            if self.ones is not None:
                new_ones.append(_flip_rate(ones[mine].sum(0), self.ones[k]))
        return Piecewise(
            tuple(segments),
            None if self.flips is None else tuple(new_flips),
            None if self.ones is None else tuple(new_ones),
        )

    def _bit_params(self) -> tuple[float, ...]:
        return self.flips or self.ones or ()

    def to_vector(self) -> Float64[Tensor, " params"]:
        v = [x for s in self.segments for x in _log_triple(s)]
        v += [_logit(q) for q in self._bit_params()]
        return torch.tensor(v, dtype=torch.float64)

    def from_vector(self, v: Float[Tensor, " params"]) -> Piecewise:
        n = 3 * self.k + len(self._bit_params())
        v = _vector_of("Piecewise", v, n)
        segments = tuple(_softmax3(v[3 * k : 3 * k + 3]) for k in range(self.k))
        bit = tuple(_sigmoid(float(x)) for x in v[3 * self.k :])
        return Piecewise(
            segments, bit if self.flips is not None else None, bit if self.ones is not None else None
        )


# ---------------------------------------------------------------- markov


SAME, FLIP, READ, IGNORE = range(4)  # the states of :class:`Markov`
MARKOV_STATES = ("write (same bit)", "write (flipped bit)", "read", "ignore")


@dataclass(frozen=True)
class Markov(Family):
    """A Markov chain of order ``order`` over instruction slots whose states are (write of
    the same bit as the previous write, write of the flipped bit, read, ignore).

    ``transitions[c][b]`` is P(next slot is state b | context c), the context being the last
    ``order`` states, most recent first, as the base-4 number ``sum_k state_{j-k} * 4**(k-1)``
    (``4**order`` rows). The first slot (the first write, fair bit) and the slots before it
    count as state ``SAME``. Ignore bits are fair coins. Being shift-invariant, it puts a
    local pattern (a run of writes of one bit, then one write of the other) at every
    position at once, which a position-tied :class:`Piecewise` fit cannot; order 2 tells an
    ignore inside such a run from one after it. FFL(p_w, p_r, p_i) is every row
    ``(p_w/2, p_w/2, p_r, p_i)`` (:meth:`from_ffl`).
    """

    transitions: tuple[tuple[float, float, float, float], ...]

    def __post_init__(self) -> None:
        rows = tuple(tuple(float(x) for x in row) for row in self.transitions)
        object.__setattr__(self, "transitions", rows)
        order = round(math.log(max(len(rows), 1), 4))
        if order < 1 or len(rows) != 4**order or any(len(r) != 4 for r in rows):
            raise FFInterpError("Markov: transitions must be 4**order rows of 4 (same, flip, read, ignore)")
        for k, r in enumerate(rows):
            if any(not x >= 0 for x in r) or abs(sum(r) - 1.0) > 1e-6:
                raise FFInterpError(f"Markov: row {k} must be non-negative and sum to 1, got {r}")

    @property
    def order(self) -> int:
        return round(math.log(len(self.transitions), 4))

    @classmethod
    def from_ffl(cls, p_w: float, p_r: float, p_i: float, q: float = 0.5, order: int = 1) -> Markov:
        """The chain equal to BitMarkov(p_w, p_r, p_i, q) (FFL at q = 1/2)."""
        row = (p_w * (1 - q), p_w * q, p_r, p_i)
        return cls((row,) * 4**order)

    def __str__(self) -> str:
        rows = "; ".join(", ".join(f"{x:.3g}" for x in r) for r in self.transitions)
        return f"Markov(order={self.order}, [{rows}])"

    def _matrix(self) -> np.ndarray:
        return np.asarray(self.transitions, dtype=np.float64)

    def _push(self, context: np.ndarray | Tensor, state: np.ndarray | Tensor) -> np.ndarray | Tensor:
        """The context after ``state``: it becomes the most recent, the oldest drops out."""
        return (context * 4) % len(self.transitions) + state

    def _sample_rows(self, rng: np.random.Generator, rows: int, seq_len: int) -> np.ndarray:
        pairs = seq_len // 2
        cdf = np.cumsum(self._matrix(), axis=1)[:, :3]
        u = rng.random((rows, pairs))
        coins = rng.random((rows, pairs))
        state = np.full((rows, pairs), SAME, dtype=np.int64)
        context = np.zeros(rows, dtype=np.int64)  # all SAME
        for j in range(1, pairs - 1):
            state[:, j] = (u[:, j : j + 1] >= cdf[context]).sum(1)
            context = self._push(context, state[:, j])
        state[:, -1] = READ
        instr = np.where(state <= FLIP, W, np.where(state == READ, R, I))
        chain = (coins[:, :1] < 0.5).astype(np.int64) ^ (np.cumsum(state == FLIP, axis=1) & 1)
        bits = np.where(instr == I, (coins < 0.5).astype(np.int64), chain)
        out = np.empty((rows, seq_len), dtype=np.int64)
        out[:, 0::2] = instr
        out[:, 1::2] = bits + ZERO
        return out

    def _transitions_of(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(context before every middle slot, the slot's state, ignore count, valid rows)."""
        instr, bits, valid, lw = _split(tokens)
        prev_bit = bits.gather(1, torch.cat([lw[:, :1], lw[:, :-1]], 1).clamp_min(0))
        write = torch.where(bits != prev_bit, FLIP, SAME)
        state = torch.where(instr == W, write, torch.where(instr == R, READ, IGNORE))
        state[:, 0] = SAME
        contexts = torch.zeros_like(state[:, :-2])
        context = torch.zeros(len(state), dtype=torch.long)
        for j in range(1, state.shape[1] - 1):
            contexts[:, j - 1] = context
            context = self._push(context, state[:, j])
        return contexts, state[:, 1:-1], (instr == I).sum(1), valid

    def log_prob(self, tokens: Int[Tensor, "batch seq"]) -> Float64[Tensor, " batch"]:
        contexts, states, n_ignore, valid = self._transitions_of(tokens)
        logt = torch.from_numpy(self._matrix()).log()
        total = logt[contexts, states].sum(1) + math.log(0.5) * (1 + n_ignore).double()
        return torch.where(valid, total, torch.tensor(-math.inf, dtype=torch.float64))

    def fit(self, tokens: Int[Tensor, "batch seq"], weights: Float[Tensor, " batch"] | None = None) -> Markov:
        contexts, states, _, valid = self._transitions_of(tokens)
        if not bool(valid.all()):
            k = int((~valid).nonzero()[0])
            raise FFLError(f"fit: sequence {k} is not a valid flip-flop sequence")
        w = (
            torch.ones(len(states), dtype=torch.float64)
            if weights is None
            else torch.as_tensor(weights).double()
        )
        if w.shape != (len(states),) or bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
            raise FFInterpError(
                f"fit: need one finite non-negative weight per sequence, got shape {tuple(w.shape)}"
            )
        n = len(self.transitions)
        counts = torch.zeros(n * 4, dtype=torch.float64)
        counts.index_add_(0, (contexts * 4 + states).flatten(), w[:, None].expand_as(states).flatten())
        counts = counts.view(n, 4).numpy()
        rows = tuple(_normalise(counts[a], self.transitions[a]) for a in range(n))  # type: ignore[arg-type]
        return Markov(rows)  # type: ignore[arg-type]

    def to_vector(self) -> Float64[Tensor, " params"]:
        return torch.tensor(
            [math.log(max(x, _EPS)) for r in self.transitions for x in r], dtype=torch.float64
        )

    def from_vector(self, v: Float[Tensor, " params"]) -> Markov:
        n = len(self.transitions)
        m = _vector_of("Markov", v, 4 * n).view(n, 4).softmax(1)
        return Markov(tuple(tuple(float(x) for x in r) for r in m))  # type: ignore[arg-type]

    def expected_reads(self, seq_len: int) -> float:
        pairs = _check_len(seq_len)
        m, n = self._matrix(), len(self.transitions)
        pi = np.zeros(n)
        pi[0] = 1.0  # the context of all-SAME before the first middle slot
        reads = 1.0
        ctx = np.arange(n)
        for _ in range(1, pairs - 1):
            reads += float(pi @ m[:, READ])
            nxt = np.zeros(n)
            for b in range(4):
                np.add.at(nxt, self._push(ctx, b), pi * m[:, b])
            pi = nxt
        return reads


# ---------------------------------------------------------------- mixture


@dataclass(frozen=True)
class Mixture(Family):
    """A mixture of families: sample a component per row, ``log_prob`` by logsumexp."""

    components: tuple[Family, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "components", tuple(self.components))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if not self.components or len(self.components) != len(self.weights):
            raise FFInterpError(
                f"Mixture: need as many weights as components, "
                f"got {len(self.weights)} and {len(self.components)}"
            )
        if any(not w >= 0 for w in self.weights) or abs(sum(self.weights) - 1.0) > 1e-6:
            raise FFInterpError(f"Mixture weights must be non-negative and sum to 1, got {self.weights}")

    def __str__(self) -> str:
        return "Mixture(" + ", ".join(f"{w:.3g}*{c}" for c, w in zip(self.components, self.weights)) + ")"

    def _sample_rows(self, rng: np.random.Generator, rows: int, seq_len: int) -> np.ndarray:
        which = rng.choice(len(self.components), size=rows, p=np.asarray(self.weights) / sum(self.weights))
        out = np.empty((rows, seq_len), dtype=np.int64)
        for k, comp in enumerate(self.components):
            mine = np.flatnonzero(which == k)
            if mine.size:
                out[mine] = comp._sample_rows(rng, mine.size, seq_len)
        return out

    def _joint(self, tokens: Tensor) -> Tensor:
        """log(weight_k) + log p_k(x) for every row and component: [batch, K]."""
        logw = torch.tensor(self.weights, dtype=torch.float64).log()
        return torch.stack([c.log_prob(tokens) for c in self.components], 1) + logw

    def log_prob(self, tokens: Int[Tensor, "batch seq"]) -> Float64[Tensor, " batch"]:
        return self._joint(tokens).logsumexp(1)

    def fit(
        self, tokens: Int[Tensor, "batch seq"], weights: Float[Tensor, " batch"] | None = None, steps: int = 1
    ) -> Mixture:
        """``steps`` EM iterations from the current parameters (each component refit by its own
        weighted MLE with the responsibilities folded into the weights)."""
        tokens = torch.as_tensor(tokens)
        w = (
            torch.ones(len(tokens), dtype=torch.float64)
            if weights is None
            else torch.as_tensor(weights).double()
        )
        mix = self
        for _ in range(steps):
            joint = mix._joint(tokens)
            resp = (joint - joint.logsumexp(1, keepdim=True)).exp().nan_to_num(0.0) * w[:, None]
            mass = resp.sum(0)
            if float(mass.sum()) <= 0:
                return mix
            comps = tuple(
                c.fit(tokens, resp[:, k]) if float(mass[k]) > 0 else c for k, c in enumerate(mix.components)
            )
            mix = Mixture(comps, tuple(float(m) for m in mass / mass.sum()))
        return mix

    def to_vector(self) -> Float64[Tensor, " params"]:
        logw = [math.log(max(w, _EPS)) for w in self.weights]
        return torch.cat([c.to_vector() for c in self.components] + [torch.tensor(logw, dtype=torch.float64)])

    def from_vector(self, v: Float[Tensor, " params"]) -> Mixture:
        sizes = [c.n_params for c in self.components]
        v = _vector_of("Mixture", v, sum(sizes) + len(sizes))
        comps, at = [], 0
        for c, n in zip(self.components, sizes):
            comps.append(c.from_vector(v[at : at + n]))
            at += n
        w = v[at:].softmax(0)
        return Mixture(tuple(comps), tuple(float(x) for x in w))

    def expected_reads(self, seq_len: int) -> float:
        return sum(w * c.expected_reads(seq_len) for c, w in zip(self.components, self.weights))


def interpolate(old: Family, new: Family, alpha: float) -> Family:
    """``alpha * new + (1 - alpha) * old``, parameter by parameter in probability space.

    The cross-entropy method's smoothing step: a convex combination of probabilities is a
    valid family again and keeps every probability the old one gave mass to positive.
    """
    if type(old) is not type(new):
        raise FFInterpError(f"interpolate: families differ ({type(old).__name__} vs {type(new).__name__})")

    def mix(a, b):
        if isinstance(a, Family):
            return interpolate(a, b, alpha)
        if isinstance(a, tuple):
            if len(a) != len(b):
                raise FFInterpError("interpolate: families have different structures")
            return tuple(mix(x, y) for x, y in zip(a, b))
        if a is None or b is None:
            return None
        return (1 - alpha) * float(a) + alpha * float(b)

    fixed = getattr(old, "STRUCTURE", ())  # fields that say what the family is, not parameters
    if any(getattr(old, name) != getattr(new, name) for name in fixed):
        raise FFInterpError("interpolate: families have different structures")
    fields = {
        name: getattr(old, name) if name in fixed else mix(getattr(old, name), getattr(new, name))
        for name in old.__dataclass_fields__
    }
    return type(old)(**fields)


__all__ = ["FFL", "BitMarkov", "Family", "MARKOV_STATES", "Markov", "Mixture", "Piecewise", "interpolate"]
