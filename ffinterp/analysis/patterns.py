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
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ffinterp import distributed
from ffinterp.analysis.families import Family, Mixture
from ffinterp.analysis.planted import Planted
from ffinterp.analysis.tail import TailEstimate, checked_model, estimate, placed, score_rows
from ffinterp.errors import FFInterpError
from ffinterp.language import R
from ffinterp.text import count


def _records(path: str | os.PathLike) -> tuple[Path, list[dict]]:
    """The ``glitches.jsonl`` of ``path`` (the file, or a find-glitches folder) and its rows."""
    path = Path(path)
    if path.is_dir():
        path = path / "glitches.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise FFInterpError(f"{path}: cannot read glitches ({e.strerror or e})") from None
    rows = []
    for k, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row["_text"] = str((row.get("minimized") or {}).get("text") or row["text"])
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
            raise FFInterpError(f"{path}:{k}: not a glitch record of find-glitches (need a 'text')") from None
        rows.append(row)
    if not rows:
        raise FFInterpError(f"{path}: no glitches in the file")
    return path, rows


def glitch_mismatch(path: str | os.PathLike, model: nn.Module, seq_len: int) -> str | None:
    """Why the glitches at ``path`` are not ``model``'s at ``seq_len`` tokens, or None.

    A find-glitches run records the model's weight digest (``summary.json``
    ``model_sha256``; ``state.json`` while it runs) and the sequence length (there and in
    every record). Another model's glitches, or glitches found at another length, plant
    patterns that need not fail here: the proposal then misses this model's routes.
    What a folder does not record (a bare ``glitches.jsonl``) is not checked.
    """
    from ffinterp.checkpoints import model_digest

    file, rows = _records(path)
    digest, lengths = None, {int(r["seq_len"]) for r in rows if isinstance(r.get("seq_len"), int)}
    for name, keys in (("summary.json", ("model_sha256",)), ("state.json", ("fingerprint", "model"))):
        try:
            found = json.loads((file.parent / name).read_text())
            for key in keys:
                found = found[key]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        digest = str(found)
        break
    why, mine = [], model_digest(model) if digest is not None else None
    if digest is not None and digest != mine:
        why.append(f"they were found on another model (weights sha256 {digest[:12]}…, this one {mine[:12]}…)")
    if lengths and lengths != {seq_len}:
        at = ", ".join(str(t) for t in sorted(lengths))
        why.append(f"they were found at seq_len {at}, not {seq_len}")
    return f"{file}: " + " and ".join(why) if why else None


PER_TEST = 128  # planted sequences that test or weigh one pattern


def read_glitches(
    path: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    seq_len: int | None = None,
    force: bool = False,
) -> list[str]:
    """The minimal form of every glitch in a ``find-glitches`` ``glitches.jsonl`` (or the
    glitch itself where it was not minimised).

    With ``model`` (a fast model) the glitches must be that model's at ``seq_len`` tokens
    (default: its block size; see :func:`glitch_mismatch`), unless ``force``."""
    if model is not None:
        t = seq_len or getattr(getattr(model, "cfg", None), "block_size", None) or 512
        why = glitch_mismatch(path, model, t)
        if why and not force:
            raise FFInterpError(
                f"{why}; pass force=True to plant them anyway", flags={"force=True": "--force"}
            )
    return [row["_text"] for row in _records(path)[1]]


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


def _without(planted: Planted, k: int, close_up: bool = False) -> Planted | None:
    """The pattern with element ``k`` dropped: its two gaps merge (ranges add), or with
    ``close_up`` the later elements also move one slot nearer (a run of adjacent writes
    becomes a shorter run rather than a run with a hole)."""
    pattern = planted.pattern[:k] + planted.pattern[k + 1 :]
    gaps = list(planted.gaps)
    if k == 0:
        if close_up:
            return None
        gaps = gaps[1:]
    else:
        (lo, hi), (lo2, hi2) = gaps[k - 1], gaps[k]
        step = 1 if close_up else 0
        if lo + lo2 - step < 1:
            return None
        gaps = gaps[: k - 1] + [(lo + lo2 - step, hi + hi2 - step)] + gaps[k + 1 :]
    try:
        return Planted(planted.target, pattern, tuple(gaps), planted.seq_len)
    except FFInterpError:
        return None


def _planted_errors(model: nn.Module, planted: Planted, n: int, seed: int, device) -> tuple[Tensor, Tensor]:
    """``n`` sequences from ``planted`` and which of them hold a read error."""
    tokens = planted.sample(n, planted.seq_len, seed=seed)
    return tokens, score_rows(model, tokens.to(device)).any_error.cpu()


@torch.inference_mode()
def shrink(
    model: nn.Module,
    starts: list[Planted],
    *,
    known: set[tuple] | None = None,
    per_test: int = 128,
    seed: int = 0,
    device: str | torch.device = "cpu",
    budget: int | None = None,
    per_found: int = 0,
) -> tuple[list[Planted], int]:
    """Smaller patterns than ``starts`` that still fail in random context.

    Greedy, from each start: try each sub-pattern with one element dropped (the final read
    stays), with the gap left open or closed up by one slot, plant each in ``per_test``
    target sequences, and go on from the sub-pattern that fails most often, while any fails
    at all. Patterns in ``known`` (keys) are not tried
    again. With ``budget``, no test starts that could take the sequences scored past it,
    counting ``per_found`` more for each pattern found (what the caller spends on weighing
    it). Returns the new patterns and the number of sequences scored.
    """
    seen = set(known or ()) | {p.key for p in starts}
    found: list[Planted] = []
    scored, rng = 0, np.random.default_rng(seed)
    for current in starts:
        while len(current.pattern) > 2:
            best, best_rate = None, 0.0
            moves = [(k, close) for k in range(len(current.pattern) - 1) for close in (False, True)]
            for k, close in moves:
                cand = _without(current, k, close)
                if cand is None or cand.key in seen:
                    continue
                if budget is not None and scored + per_test + per_found * (len(found) + 1) > budget:
                    break
                seen.add(cand.key)
                _, err = _planted_errors(model, cand, per_test, int(rng.integers(2**31)), device)
                rate = float(err.float().mean())
                scored += per_test
                if rate > best_rate:
                    best, best_rate = cand, rate
            if best is None:
                break
            found.append(best)
            current = best
    return found, scored


@torch.inference_mode()
def contributions(
    model: nn.Module,
    patterns: list[Planted],
    *,
    per_test: int = 128,
    jitter: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> list[float]:
    """The error mass each pattern :func:`jittered` covers: a jittered pattern alone is a
    valid proposal, so ``per_test`` sequences from it give an unbiased estimate of it,
    ``mean(w * 1[error])`` with ``w = p_target / g``."""
    rng = np.random.default_rng(seed)
    out = []
    for comp in map(jittered, patterns) if jitter else patterns:
        tokens, err = _planted_errors(model, comp, per_test, int(rng.integers(2**31)), device)
        w = (comp.target.log_prob(tokens) - comp.log_prob(tokens)).exp()
        out.append(float((w * err.double()).mean()))
    return out


@dataclass(frozen=True)
class GlitchProposal:
    """A planted-pattern proposal built from a glitch search, and what it cost."""

    family: Family
    patterns: list[Planted]  # jittered and exact, in the family's order
    contributions: list[float]  # each pattern's estimated error mass under the target
    scored: int  # sequences scored to shrink and weigh the patterns

    def summary(self, top: int = 3) -> str:
        order = sorted(range(len(self.patterns)), key=lambda k: -self.contributions[k])
        best = "; ".join(f"{self.patterns[k]} ~{self.contributions[k]:.2g}" for k in order[:top])
        found = count(len(self.patterns), "planted pattern")
        return f"{found} ({count(self.scored, 'sequence')} scored), largest: {best}"


def glitch_proposal(
    model: nn.Module | str | os.PathLike,
    target: Family,
    glitches: list[str],
    seq_len: int | None = None,
    *,
    top: int = 5,
    per_test: int = PER_TEST,
    floor: float = 0.1,
    exact: bool = True,
    seed: int = 0,
    device: str | torch.device = "auto",
    budget: int | None = None,
) -> GlitchProposal:
    """Glitches (minimal forms) to a weighted mixture of planted patterns, for ``model`` (a
    fast model or a checkpoint spec) at ``seq_len`` tokens (default: its block size).

    1. :func:`from_glitches`: each glitch's writes and reads, its whole window, and mirrors;
    2. :func:`contributions`: the error mass each covers (``per_test`` sequences each);
    3. :func:`shrink` the ``top`` largest contributors (the smallest patterns when none has
       failed yet; 0: no shrinking), and weigh what that finds;
    4. mix them all, :func:`jittered` and (with ``exact``) at the glitch's own spacing too,
       with shares following the contributions plus a ``floor`` spread evenly, so no
       pattern is dropped for an unlucky first look; the cross-entropy rounds of the
       estimate then refine the shares.

    Both forms matter. Jitter reaches spacings nobody saw: on the circuit, exact spacings
    alone missed half the error mass. The exact form keeps a narrow route visible: for
    ``glitchy-128``, ``w1 w1 w1 <8> w0 r`` failed in 7 of 1,024 planted sequences at its own
    spacing and in none of 1,024 jittered. With equal shares the exact forms soaked up the
    cross-entropy weight and the circuit's intervals missed; shares that follow the
    measured contributions fixed that (14 or 15 of 15 covered, over two versions of the shrinking).

    ``budget`` caps the sequences scored (``scored``): weighing every pattern must fit in it,
    and the shrinking stops where it would not.
    """
    fast, t, dev = checked_model(model, seq_len, device)
    patterns = from_glitches(target, glitches, t)
    per_pattern = per_test * (2 if exact else 1)  # weighed jittered, and exactly spaced
    if budget is not None and per_pattern * len(patterns) > budget:
        raise FFInterpError(
            f"weighing the {count(len(patterns), 'pattern')} of {count(len(glitches), 'glitch')} takes "
            f"{per_pattern * len(patterns):,} sequences, more than budget={budget:,}: "
            "give a larger budget or fewer glitches"
        )
    kw = dict(per_test=per_test, seed=seed, device=dev)
    with placed(fast, dev):
        mass = contributions(fast, patterns, **kw)
        scored = per_test * len(patterns)
        if top > 0:
            order = sorted(range(len(patterns)), key=lambda k: (-mass[k], len(patterns[k].pattern)))
            left = None if budget is None else budget - per_pattern * len(patterns)
            found, n = shrink(
                fast, [patterns[k] for k in order[:top]], known={p.key for p in patterns}, budget=left,
                per_found=per_pattern, **kw,
            )  # fmt: skip
            patterns, mass = patterns + found, mass + contributions(fast, found, **kw)
            scored += n + per_test * len(found)
        comps = {}
        for p, m in zip(map(jittered, patterns), mass):
            comps[p.key] = (p, max(m, comps.get(p.key, (p, 0.0))[1]))
        if exact:
            for p, m in zip(patterns, contributions(fast, patterns, jitter=False, **kw)):
                comps.setdefault(p.key, (p, m))
            scored += per_test * len(patterns)
    planted = [p for p, _ in comps.values()]
    mass = [m for _, m in comps.values()]
    total = sum(mass)
    shares = [(1 - floor) * m / total + floor / len(planted) if total > 0 else 1 / len(planted) for m in mass]
    family = planted[0] if len(planted) == 1 else Mixture(tuple(planted), tuple(shares))
    return GlitchProposal(family, planted, mass, scored)


def estimate_planted(
    model: nn.Module | str | os.PathLike,
    target: Family,
    glitches: list[str],
    *,
    budget: int = 20_000,
    build_budget: int | None = 100_000,
    seq_len: int | None = None,
    top: int = 5,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
    **estimate_kw,
) -> TailEstimate:
    """:func:`glitch_proposal` from ``glitches`` on at most ``build_budget`` sequences (None:
    no cap), then :func:`~ffinterp.analysis.tail.estimate` under it on ``budget`` more
    (``estimate_kw``: ``batch_size``, ``journal``, ``dist``, ...). Two budgets, because the
    two stages need very different amounts: on the circuit, shrinking and weighing 5 glitches
    took 79,000 sequences and the estimate 8,000. The result's ``scored`` is ``budget``, its
    ``proposal_scored`` what building took."""
    fast, t, dev = checked_model(model, seq_len, device)
    need = 2 * PER_TEST * len(from_glitches(target, glitches, t))  # the least glitch_proposal spends
    if build_budget is not None and need > build_budget:
        raise FFInterpError(
            f"weighing the patterns of {count(len(glitches), 'glitch')} takes {need:,} sequences, more "
            f"than build_budget={build_budget:,}: raise it or plant fewer glitches",
            flags={"build_budget=": "--plant-budget "},
        )
    built = glitch_proposal(fast, target, glitches, t, top=top, seed=seed, device=dev, budget=build_budget)
    dist = estimate_kw.get("dist") or distributed.current()
    if progress and dist.is_main:
        print(built.summary(), file=sys.stderr)
    result = estimate(
        fast, target, budget=budget, seed=seed, seq_len=t, device=dev, progress=progress,
        proposal=built.family, **estimate_kw,
    )  # fmt: skip
    return replace(result, proposal_scored=built.scored)


__all__ = [
    "GlitchProposal",
    "estimate_planted",
    "from_glitches",
    "glitch_proposal",
    "contributions",
    "jittered",
    "read_glitches",
    "shrink",
]
