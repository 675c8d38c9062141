"""Glitch patterns as importance-sampling proposals: read them from a glitch search, shrink them.

The tail of a model that makes no error on the sparse set is dominated by the error
patterns with the fewest active instructions: under FFL(0.98) each extra write or read
costs a factor of about 100 in probability. A minimal glitch from ``find-glitches`` is
minimal in its own sequence; planted into random sparse context, a sub-pattern with one
active instruction fewer may still fail often enough to dominate. :func:`shrink` looks for
those, so the proposal covers the routes that matter most.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ffinterp.analysis.families import Family, Mixture
from ffinterp.analysis.planted import Planted
from ffinterp.analysis.tail import score_rows
from ffinterp.errors import FFInterpError
from ffinterp.language import R


def read_glitches(path: str | os.PathLike) -> list[str]:
    """The minimal form of every glitch in a ``find-glitches`` ``glitches.jsonl`` (or the
    glitch itself where it was not minimised)."""
    path = Path(path)
    if path.is_dir():
        path = path / "glitches.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise FFInterpError(f"{path}: cannot read glitches ({e.strerror or e})") from None
    texts = []
    for k, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text = (row.get("minimized") or {}).get("text") or row["text"]
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
            raise FFInterpError(f"{path}:{k}: not a glitch record of find-glitches (need a 'text')") from None
        texts.append(str(text))
    if not texts:
        raise FFInterpError(f"{path}: no glitches in the file")
    return texts


def from_glitches(target: Family, glitches: list[str], seq_len: int) -> list[Planted]:
    """Two :class:`Planted` per glitch, at its exact spacing: its writes and reads alone, and
    its whole window with the ignore bits (:meth:`Planted.from_glitch`); and the mirror image
    of each (every bit flipped): the language and FFL targets are symmetric in the two bits,
    so a model that fails on one often fails on the other. Duplicates are dropped."""
    out: dict[tuple, Planted] = {}
    for k, text in enumerate(glitches):
        for ignores in (False, True):
            try:
                planted = Planted.from_glitch(target, text, seq_len, jitter=False, ignores=ignores)
            except FFInterpError as e:
                raise FFInterpError(f"glitch {k}: {e}") from None
            mirror = replace(planted, pattern=tuple((a, b if a == R else 1 - b) for a, b in planted.pattern))
            out.setdefault(planted.key, planted)
            out.setdefault(mirror.key, mirror)
    return list(out.values())


def jittered(planted: Planted) -> Planted:
    """Every gap of ``d`` slots (``(d, d)``) widened to ``1 .. 2d-1``; ranges stay as they are."""
    gaps = tuple((1, 2 * lo - 1) if lo == hi else (lo, hi) for lo, hi in planted.gaps)
    return replace(planted, gaps=gaps)


def _without(planted: Planted, k: int) -> Planted | None:
    """The pattern with active instruction ``k`` dropped; its two gaps merge (ranges add)."""
    pattern = planted.pattern[:k] + planted.pattern[k + 1 :]
    gaps = list(planted.gaps)
    if k == 0:
        gaps = gaps[1:]
    else:
        (lo, hi), (lo2, hi2) = gaps[k - 1], gaps[k]
        gaps = gaps[: k - 1] + [(lo + lo2, hi + hi2)] + gaps[k + 1 :]
    try:
        return Planted(planted.target, pattern, tuple(gaps), planted.seq_len)
    except FFInterpError:
        return None


def _hit_rate(model: nn.Module, planted: Planted, n: int, seed: int, device) -> float:
    tokens = planted.sample(n, planted.seq_len, seed=seed)
    return float(score_rows(model, tokens.to(device)).any_error.float().mean())


@torch.inference_mode()
def shrink(
    model: nn.Module,
    patterns: list[Planted],
    *,
    top: int = 5,
    per_test: int = 128,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[list[Planted], int]:
    """``patterns`` plus every smaller pattern found that still fails in random context.

    Greedy, for the ``top`` patterns with the fewest active instructions: try each
    sub-pattern with one of them dropped (the final read stays), plant each in
    ``per_test`` target sequences, and go on from the sub-pattern that fails most often,
    while any fails at all. Returns the distinct patterns and the number of sequences
    scored.
    """
    out: dict[tuple, Planted] = {p.key: p for p in patterns}
    scored, rng = 0, np.random.default_rng(seed)
    for start in sorted(patterns, key=lambda p: len(p.pattern))[:top]:
        current = start
        while len(current.pattern) > 2:
            best, best_rate = None, 0.0
            for k in range(len(current.pattern) - 1):
                cand = _without(current, k)
                if cand is None or cand.key in out:
                    continue
                rate = _hit_rate(model, cand, per_test, int(rng.integers(2**31)), device)
                scored += per_test
                if rate > best_rate:
                    best, best_rate = cand, rate
            if best is None:
                break
            out[best.key] = best
            current = best
    return list(out.values()), scored


@torch.inference_mode()
def pattern_proposal(
    model: nn.Module,
    patterns: list[Planted],
    *,
    per_test: int = 128,
    floor: float = 0.1,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[Family, list[float], int]:
    """A mixture of every pattern :func:`jittered`, weighted by what each contributes.

    Each jittered pattern alone is a valid proposal, so ``per_test`` sequences from it give
    an unbiased estimate of the error mass it covers, ``mean(w * 1[error])``. The mixture
    weights follow those estimates, with a ``floor`` share spread evenly so no pattern is
    dropped for an unlucky first look; the cross-entropy rounds then refine them. Exact
    spacings are left out on purpose: on the circuit they soak up the weight and starve
    the spacings nobody saw, and the intervals then miss. Returns the proposal, each
    pattern's estimated contribution and the number of sequences scored.
    """
    comps = list({j.key: j for j in map(jittered, patterns)}.values())
    if not comps:
        raise FFInterpError("no glitch patterns to plant")
    rng = np.random.default_rng(seed)
    target = comps[0].target
    contributions = []
    for comp in comps:
        tokens = comp.sample(per_test, comp.seq_len, seed=int(rng.integers(2**31)))
        err = score_rows(model, tokens.to(device)).any_error.cpu()
        w = (target.log_prob(tokens) - comp.log_prob(tokens)).exp()
        contributions.append(float((w * err.double()).mean()))
    total = sum(contributions)
    shares = [
        (1 - floor) * c / total + floor / len(comps) if total > 0 else 1 / len(comps) for c in contributions
    ]
    family = comps[0] if len(comps) == 1 else Mixture(tuple(comps), tuple(shares))
    return family, contributions, per_test * len(comps)


@dataclass(frozen=True)
class GlitchProposal:
    """A planted-pattern proposal built from a glitch search, and what it cost."""

    family: Family
    patterns: list[Planted]  # jittered, in the family's order
    contributions: list[float]  # each pattern's estimated error mass under the target
    scored: int  # sequences scored to shrink and weigh the patterns

    def summary(self, top: int = 3) -> str:
        order = sorted(range(len(self.patterns)), key=lambda k: -self.contributions[k])
        best = "; ".join(f"{self.patterns[k]} ~{self.contributions[k]:.2g}" for k in order[:top])
        return f"{len(self.patterns)} planted patterns ({self.scored} sequences scored), largest: {best}"


def glitch_proposal(
    model: nn.Module,
    target: Family,
    glitches: list[str],
    seq_len: int,
    *,
    top: int = 5,
    per_test: int = 128,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> GlitchProposal:
    """Glitches (minimal forms) to a weighted mixture of planted patterns: read and mirror
    them (:func:`from_glitches`), :func:`shrink` the ``top`` smallest (0: no shrinking),
    jitter and weigh them (:func:`pattern_proposal`)."""
    patterns = from_glitches(target, glitches, seq_len)
    scored = 0
    if top > 0:
        patterns, scored = shrink(model, patterns, top=top, per_test=per_test, seed=seed, device=device)
    family, contributions, n = pattern_proposal(model, patterns, per_test=per_test, seed=seed, device=device)
    comps = list(family.components) if isinstance(family, Mixture) else [family]
    return GlitchProposal(family, comps, contributions, scored + n)  # type: ignore[arg-type]


__all__ = [
    "GlitchProposal",
    "from_glitches",
    "glitch_proposal",
    "jittered",
    "pattern_proposal",
    "read_glitches",
    "shrink",
]
