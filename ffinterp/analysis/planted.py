"""Planted patterns: a proposal family that writes a known glitch pattern into target sequences.

A model with no errors on the sparse set may still err on a sparse sequence that happens
to hold a rare local pattern, such as a run of writes of one bit, then a write of the other
and a read soon after it. The glitch finder and its minimiser find such patterns (the few
active instructions of a minimal glitch). Cross-entropy adaptation within the smooth
families rarely does: the pattern is astronomically unlikely under the target, and a
smooth family that makes it likely makes every other dense sequence likely too, so the
weights of its hits span many orders of magnitude.

:class:`Planted` samples a sequence from the target, picks a start slot (uniform) and the
gaps between the pattern's active instructions (each uniform on its range ``lo .. hi``),
redrawing both until the pattern fits, and writes the pattern's instructions (and the bits
of its writes) there; the read bits that follow are filled in. Only the pattern's own slots
are fixed; the slots between them stay target draws. Jittered gaps matter: an error rarely
needs one exact spacing, and a proposal that plants only the spacing the glitch finder saw
misses the others (on the hand-built circuit, by a factor of 50 to 450).

For a target whose instructions and write bits are independent per slot (FFL, and
Piecewise with fair or per-segment bits) the likelihood is exact:

    g(x) = p(x) * (1 / Z) * sum over embeddings e of the pattern in x of
           (1 / pairs) * prod_k (1 / (hi_k - lo_k + 1)) / p(pattern's slot k at e_k)

where an embedding is a choice of slots, one per active instruction, in order, holding
that instruction (and bit), with gaps within range; ``Z`` is the probability that a
random start and gaps fit. The sum is a forward pass over slots, vectorised over the
batch. When a sequence holds the pattern once, its weight ``p / g`` is the same for every
placement, whatever the rest of the sequence looks like: the estimate is "the target
probability of the pattern, times how often the model errs around it".

Errors that need patterns nobody planted are reached only through the estimator's
defensive target component (see :mod:`ffinterp.analysis.tail`): the estimate covers the
planted neighbourhoods and is typically low when other routes to an error matter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from jaxtyping import Float, Float64, Int
from torch import Tensor

from ffinterp.analysis.families import _EPS, Family, _SlotFamily, _split
from ffinterp.errors import FFInterpError
from ffinterp.language import ONE, ZERO, I, R, W, from_text

JOIN_FIRST = 2  # the first write joins a pattern when the next active slot is at most this far


def _gap_kernel(lo: int, hi: int) -> np.ndarray:
    """P(gap = d) for d = 0 .. hi: uniform on lo .. hi."""
    kernel = np.zeros(hi + 1)
    kernel[lo:] = 1.0 / (hi - lo + 1)
    return kernel


def _independent_slots(target: Family, pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """(instruction probabilities [pairs, 3], P(a write's bit is 1) [pairs]) of a target whose
    slots are independent; refuse targets whose write bits depend on earlier writes."""
    if not isinstance(target, _SlotFamily):
        raise FFInterpError(
            f"Planted: the target must be FFL or Piecewise (independent slots), got {type(target).__name__}"
        )
    probs, flip = target._tables(pairs)
    ones = target._ones(pairs)
    if ones is None:
        if not np.allclose(flip, 0.5):
            raise FFInterpError(
                f"Planted: the target's write bits depend on earlier writes ({target}); "
                "only fair or per-slot independent bits are supported"
            )
        ones = np.full(pairs, 0.5)
    return probs, ones


@dataclass(frozen=True)
class Planted(Family):
    """``target`` with ``pattern`` written in at a uniform start slot, with jittered gaps.

    ``pattern`` is ``((instruction, bit), ...)``: instruction ids W, R or I, and the bit
    (0/1) of each write and ignore (not used for reads, whose bit is the last write's). ``gaps[k] = (lo, hi)``
    is the range of the gap, in slots, from active instruction ``k`` to ``k + 1`` (uniform;
    1 means adjacent, ``lo == hi`` an exact spacing). A start and gaps that run past the
    sequence, put a read on the first slot or a write on the last are redrawn.
    """

    target: Family
    pattern: tuple[tuple[int, int], ...]
    gaps: tuple[tuple[int, int], ...]
    seq_len: int

    STRUCTURE = ("pattern", "gaps", "seq_len")  # kept as they are by :func:`interpolate`

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", tuple((int(a), int(b)) for a, b in self.pattern))
        object.__setattr__(self, "gaps", tuple((int(lo), int(hi)) for lo, hi in self.gaps))
        if self.seq_len < 4 or self.seq_len % 2:
            raise FFInterpError(f"Planted: seq_len must be an even number >= 4, got {self.seq_len}")
        if not self.pattern or any(a not in (W, R, I) or b not in (0, 1) for a, b in self.pattern):
            raise FFInterpError("Planted: the pattern must be writes, reads and ignores with bits 0/1")
        if len(self.gaps) != len(self.pattern) - 1 or any(not 1 <= lo <= hi for lo, hi in self.gaps):
            raise FFInterpError(
                f"Planted: need {len(self.pattern) - 1} gap ranges 1 <= lo <= hi, got {self.gaps}"
            )
        _independent_slots(self.target, self.seq_len // 2)
        if self._fit_probability <= 0:
            raise FFInterpError(
                f"Planted: a pattern of {len(self.pattern)} instructions does not fit T={self.seq_len}"
            )

    @classmethod
    def from_glitch(
        cls,
        target: Family,
        glitch: str | Int[Tensor, " seq"],
        seq_len: int,
        *,
        jitter: bool = True,
        ignores: bool = False,
    ) -> Planted:
        """The active instructions of a (minimal) glitch, with gaps jittered around its own.

        Every write and read after the first slot is kept (a minimal glitch ends at its
        failing read), with the bits of the writes. The first write joins them only when the
        next active slot follows within ``JOIN_FIRST`` slots: a first write far before the
        rest is there because every sequence starts with one. A gap of ``d`` slots in the
        glitch may be anything from 1 to ``2d - 1`` (mean ``d``; adjacent stays adjacent), or
        exactly ``d`` without ``jitter``.

        With ``ignores`` the pattern is the whole window instead, from its first active slot
        to the end, ignore bits included: some models fail only when a run of ignores
        carries one bit (``mitigated-128`` after a long gap), which no pattern of writes and
        reads alone can reproduce.
        """
        tokens = from_text(glitch) if isinstance(glitch, str) else torch.as_tensor(glitch)
        if tokens.ndim != 1 or len(tokens) < 4 or len(tokens) % 2:
            raise FFInterpError("Planted.from_glitch: need one even-length sequence of >= 4 tokens")
        instr, bits = tokens[0::2].tolist(), [int(b == ONE) for b in tokens[1::2].tolist()]
        active = [j for j in range(1, len(instr)) if instr[j] in (W, R)]
        if not active:
            raise FFInterpError("Planted.from_glitch: the glitch has no write or read after its first slot")
        if active[0] <= JOIN_FIRST:
            active = [0, *active]
        if ignores:
            active = list(range(active[0], len(instr)))
        pattern = tuple((instr[j], 0 if instr[j] == R else bits[j]) for j in active)
        gaps = tuple(
            (1, 2 * (b - a) - 1) if jitter and not ignores else (b - a, b - a)
            for a, b in zip(active, active[1:])
        )
        return cls(target, pattern, gaps, seq_len)

    @property
    def key(self) -> tuple:
        """What makes two planted patterns the same proposal."""
        return (self.pattern, self.gaps)

    def __str__(self) -> str:
        parts = ["r" if a == R else f"{'w' if a == W else 'i'}{b}" for a, b in self.pattern]
        between = [f" <{lo}>" if lo == hi else f" <{lo}-{hi}>" for lo, hi in self.gaps]
        text = parts[0] + "".join((b if b != " <1>" else "") + f" {p}" for b, p in zip(between, parts[1:]))
        return f"Planted([{text}] in {self.target})"

    # ------------------------------------------------------------ the likelihood
    def _check(self, seq_len: int) -> int:
        if seq_len != self.seq_len:
            raise FFInterpError(f"Planted was built for T={self.seq_len}, asked for T={seq_len}")
        return seq_len // 2

    @cached_property  # the structure is frozen: computed once, not on every log_prob
    def _placement(self) -> tuple[np.ndarray, np.ndarray]:
        """(forward [k, pairs]: P(start and the first k gaps put pattern slot k at slot j),
        backward [k, pairs]: P(the remaining gaps from slot j fit)), before rejection."""
        pairs, m = self.seq_len // 2, len(self.pattern)
        fwd, bwd = np.zeros((m, pairs)), np.zeros((m, pairs))
        fwd[0] = 1.0 / pairs
        if self.pattern[0][0] != W:
            fwd[0, 0] = 0.0
        for k, (lo, hi) in enumerate(self.gaps, 1):
            fwd[k] = np.convolve(fwd[k - 1], _gap_kernel(lo, hi))[:pairs]
        bwd[-1, :-1] = 1.0
        bwd[-1, -1] = float(self.pattern[-1][0] == R)
        for k in range(m - 2, -1, -1):
            lo, hi = self.gaps[k]
            ahead = np.concatenate([bwd[k + 1], np.zeros(hi)])
            bwd[k] = sum(ahead[e : e + pairs] for e in range(lo, hi + 1)) / (hi - lo + 1)
        return fwd, bwd

    @cached_property
    def _fit_probability(self) -> float:
        """Z: P(a uniform start and random gaps fit the sequence and the language)."""
        fwd, bwd = self._placement
        return float((fwd[0] * bwd[0]).sum())

    @cached_property
    def _slot_log_probs(self) -> Tensor:
        """[k, pairs]: log p_target(pattern slot k at slot j) (the language fixes the first
        and the last slot, so only bits count there)."""
        pairs = self.seq_len // 2
        probs, ones = _independent_slots(self.target, pairs)
        out = np.zeros((len(self.pattern), pairs))
        inner = np.zeros(pairs, dtype=bool)
        inner[1:-1] = True
        for k, (a, b) in enumerate(self.pattern):
            lp = np.where(inner, np.log(np.maximum(probs[:, a - W], _EPS)), 0.0)
            if a == W:
                lp += np.log(np.maximum(ones if b else 1 - ones, _EPS))
            elif a == I:
                lp += math.log(0.5)  # an ignore's bit is a fair coin
            out[k] = lp
        return torch.from_numpy(out)

    def _log_ratio(self, tokens: Tensor) -> Tensor:
        """log(g(x) / p(x)) per row (-inf where the row does not hold the pattern)."""
        instr, bits, _, _ = _split(tokens)
        n, pairs = instr.shape
        slot_lp = self._slot_log_probs
        log_scale = torch.full((n,), -math.log(pairs), dtype=torch.float64)
        alpha = torch.ones(n, pairs, dtype=torch.float64)
        for k, (a, b) in enumerate(self.pattern):
            if k:
                # Sum over the gap: alpha_k(j) = sum_{d=lo..hi} alpha_{k-1}(j - d) / (hi - lo + 1).
                lo, hi = self.gaps[k - 1]
                csum = torch.nn.functional.pad(alpha.cumsum(1), (hi + 1, 0))
                alpha = (csum[:, hi + 1 - lo : hi + 1 - lo + pairs] - csum[:, :pairs]) / (hi - lo + 1)
            match = instr == a
            if a != R:
                match &= bits == b
            alpha = torch.where(match, alpha * (-slot_lp[k]).exp(), 0.0)
            top = alpha.amax(1).clamp_min(1e-300)
            alpha = alpha / top[:, None]
            log_scale = log_scale + top.log()
        total = alpha.sum(1)
        return torch.where(total > 0, total.log() + log_scale - math.log(self._fit_probability), -math.inf)

    def log_prob(self, tokens: Int[Tensor, "batch seq"]) -> Float64[Tensor, " batch"]:
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
        self._check(tokens.shape[1])
        return self.target.log_prob(tokens) + self._log_ratio(tokens)

    def _sample_rows(self, rng: np.random.Generator, rows: int, seq_len: int) -> np.ndarray:
        pairs = self._check(seq_len)
        out = self.target._sample_rows(rng, rows, seq_len)
        slots = np.zeros((rows, len(self.pattern)), dtype=np.int64)
        todo = np.arange(rows)
        while todo.size:
            start = rng.integers(0, pairs, size=todo.size)
            gaps = [rng.integers(lo, hi + 1, size=todo.size) for lo, hi in self.gaps]
            pos = np.cumsum(np.stack([start, *gaps], 1), axis=1)
            end = pos[:, -1]
            ok = (end < pairs - 1) | ((end == pairs - 1) & (self.pattern[-1][0] == R))
            ok &= (start > 0) | (self.pattern[0][0] == W)
            slots[todo[ok]] = pos[ok]
            todo = todo[~ok]
        instr, bits = out[:, 0::2], out[:, 1::2] - ZERO
        rows_ix = np.arange(rows)
        for k, (a, b) in enumerate(self.pattern):
            instr[rows_ix, slots[:, k]] = a
            if a != R:
                bits[rows_ix, slots[:, k]] = b
        # Reads repeat the last write's bit, the pattern's writes included.
        at = np.arange(pairs)
        lw = np.maximum.accumulate(np.where(instr == W, at, 0), axis=1)
        bits = np.where(instr == R, np.take_along_axis(bits, lw, axis=1), bits)
        out[:, 0::2], out[:, 1::2] = instr, bits + ZERO
        return out

    # ------------------------------------------------------------ no free parameters
    def fit(
        self, tokens: Int[Tensor, "batch seq"], weights: Float[Tensor, " batch"] | None = None
    ) -> Planted:
        """Nothing to refit: a pattern is structure. In a :class:`Mixture` of patterns the
        cross-entropy rounds reweight the patterns themselves."""
        return self

    def to_vector(self) -> Float64[Tensor, " 0"]:
        return torch.zeros(0, dtype=torch.float64)

    def from_vector(self, v: Float[Tensor, " 0"]) -> Planted:
        if torch.as_tensor(v).numel():
            raise FFInterpError("Planted.from_vector: a planted pattern has no free parameters")
        return self

    def expected_reads(self, seq_len: int) -> float:
        """The target's reads, corrected on the slots the pattern takes."""
        pairs = self._check(seq_len)
        probs, _ = _independent_slots(self.target, pairs)
        fwd, bwd = self._placement
        occupancy = fwd * bwd / self._fit_probability  # P(pattern slot k sits at slot j)
        shift = sum(
            float((occupancy[k, 1:-1] * (float(a == R) - probs[1:-1, 1])).sum())
            for k, (a, _) in enumerate(self.pattern)
        )
        return self.target.expected_reads(seq_len) + shift


__all__ = ["JOIN_FIRST", "Planted"]
