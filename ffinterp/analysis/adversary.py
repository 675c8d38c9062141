"""The distribution adversary: which natural-looking FFL distribution breaks a model most?

The glitch strategies search single sequences. This one searches *distributions*: the
parameters of a family from :mod:`ffinterp.analysis.families` (by default a
:class:`~ffinterp.analysis.families.Piecewise` FFL with four segments, each with its own
``(p_w, p_r, p_i)`` and bit-1 probability), by CMA-ES from the maintained ``cma`` package.
Every distribution it proposes is an FFL-style generator, so what it finds is a regime a
model might meet, not a hand-crafted sequence.

Each candidate is scored on a small sample (``per_eval`` sequences, 64 by default, where the
public adversary used 2,000). What keeps the small sample usable is the objective: the
hard read-error rate plus the *soft* error rate, the mean probability the model puts on
anything but the correct bit. The soft term is continuous, so CMA-ES climbs towards
errors before the sample contains one, and its variance is far below that of a 0/1 count.
The reported figure is never the objective: the best distribution is re-scored on a fresh
sample of ``confirm`` sequences and its read- and sequence-error rates come with exact
Clopper-Pearson intervals.

Two entry points share :func:`search`: :func:`maximize` (``ffinterp estimate --maximize``)
and the ``distribution`` glitch strategy (``ffinterp find-glitches --strategy
distribution``), whose every scored batch goes through the finder's verify, minimise and
diagnose path and whose best distribution lands in ``summary.json`` under the strategy's
``findings``.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ffinterp.analysis.families import Family, Piecewise
from ffinterp.analysis.search import Scored, SearchContext, Strategy, register
from ffinterp.analysis.tail import checked_model, placed
from ffinterp.errors import FFInterpError
from ffinterp.intervals import clopper_pearson
from ffinterp.text import count

BOUND = 8.0  # box on the unconstrained vector: probabilities stay above ~e^-16


def default_family(segments: int = 4, p_i: float = 0.9) -> Piecewise:
    """The search space: ``segments`` FFL segments with their own bit-1 probabilities,
    started at FFL(p_i) with fair bits."""
    return Piecewise.uniform(segments, (1 - p_i) / 2, (1 - p_i) / 2, p_i, one=0.5)


def _cma():
    with warnings.catch_warnings():  # cma warns once that matplotlib is absent
        warnings.simplefilter("ignore")
        import cma
    return cma


@dataclass(frozen=True)
class Candidate:
    """One scored distribution: its sample's hard and soft read-error rates."""

    family: Family
    reads: int
    errors: int
    soft: float
    sequences: int
    erring_sequences: int

    @property
    def rate(self) -> float:
        return self.errors / self.reads if self.reads else 0.0

    def objective(self, soft: bool = True) -> float:
        """What CMA-ES maximises: hard plus soft read-error rate (see the module docstring),
        or the hard rate alone (the public adversary's objective) with ``soft=False``."""
        return self.rate + self.soft if soft else self.rate


def _candidate(family: Family, sc: Scored) -> Candidate:
    s = sc.scores
    n_reads = len(s)
    soft = float((1 - s.p_correct).mean()) if n_reads else 0.0
    return Candidate(
        family, n_reads, int(s.error.sum()), soft, len(sc.tokens), int((sc.min_margin < 0).sum())
    )


@dataclass
class SearchTrace:
    """The course of one search: best objective and sequences spent after each generation."""

    scored: list[int] = field(default_factory=list)
    best_rate: list[float] = field(default_factory=list)
    best_objective: list[float] = field(default_factory=list)


def search(
    score: Callable[[torch.Tensor, dict], Scored],
    start: Family,
    seq_len: int,
    *,
    seed: int,
    generations: int = 25,
    popsize: int | None = None,
    per_eval: int = 64,
    sigma0: float = 1.0,
    soft: bool = True,
    stop: Callable[[], bool] = lambda: False,
) -> tuple[Candidate, SearchTrace]:
    """CMA-ES over ``start``'s parameter vector; returns the best candidate seen and the trace.

    ``score(tokens, origin)`` runs a sample through the model. Each candidate's sample comes
    from a generator seeded by (seed, generation, index), so a search is a pure function of
    its arguments. NumPy's global random state, which ``cma`` reseeds, is restored after.
    """
    if per_eval < 1 or generations < 1:
        raise FFInterpError(f"need per_eval >= 1 and generations >= 1, got {per_eval} and {generations}")
    cma = _cma()
    x0 = start.to_vector().clamp(-BOUND, BOUND).numpy()
    opts = {"seed": int(seed % (2**31 - 2)) + 1, "verbose": -9, "bounds": [-BOUND, BOUND]}
    if popsize is not None:
        opts["popsize"] = int(popsize)
    saved = np.random.get_state()
    trace, best, spent = SearchTrace(), None, 0
    try:
        es = cma.CMAEvolutionStrategy(x0, sigma0, opts)
        for gen in range(generations):
            if stop():
                break
            xs = es.ask()
            losses = []
            for j, x in enumerate(xs):
                fam = start.from_vector(torch.as_tensor(x))
                rng = np.random.Generator(np.random.PCG64([seed, gen, j]))
                tokens = fam.draw(per_eval, seq_len, rng)
                cand = _candidate(
                    fam, score(tokens, {"generation": gen, "candidate": j, "distribution": str(fam)})
                )
                spent += cand.sequences
                losses.append(-cand.objective(soft))
                if best is None or cand.objective(soft) > best.objective(soft):
                    best = cand
                if stop():
                    break
            if len(losses) == len(xs):
                es.tell(xs, losses)
            trace.scored.append(spent)
            trace.best_rate.append(best.rate)
            trace.best_objective.append(best.objective(soft))
    finally:
        np.random.set_state(saved)
    if best is None:
        raise FFInterpError("the distribution search scored nothing (budget spent before it started)")
    return best, trace


# ---------------------------------------------------------------- maximize


def segment_table(segments: list[dict]) -> list[str]:
    """:meth:`Piecewise.describe` rows as an aligned table: segment, token positions, p_w,
    p_r, p_i and the write bits' law."""
    bits = (
        "P(write 1)"
        if any("one" in d for d in segments)
        else "P(flip)"
        if any("flip" in d for d in segments)
        else ""
    )
    rows = [("segment", "positions", "p_w", "p_r", "p_i", bits)]
    for d in segments:
        law = d.get("one", d.get("flip"))
        rows.append((str(d["segment"]), f"{d['start']}-{d['end']}", f"{d['p_w']:.3g}", f"{d['p_r']:.3g}",
                     f"{d['p_i']:.3g}", "" if law is None else f"{law:.3g}"))  # fmt: skip
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


@dataclass(frozen=True)
class AdversaryResult:
    """The most damaging distribution found, re-measured on a fresh sample.

    ``scored`` (``search_scored`` plus ``sequences``, the confirming sample) is at most the
    budget: the search spends whole generations of the budget left after confirming.
    """

    distribution: str
    vector: list[float]
    read_errors: int
    reads: int
    read_rate: float
    read_ci_low: float
    read_ci_high: float
    erring_sequences: int
    sequences: int
    sequence_rate: float
    sequence_ci_low: float
    sequence_ci_high: float
    search_scored: int
    scored: int
    seq_len: int
    seconds: float
    trace: dict
    budget: int = 0
    segments: list[dict] = field(default_factory=list)  # Piecewise.describe(seq_len), if piecewise

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        if self.segments:
            head = "most damaging distribution (piecewise FFL; each segment's instruction probabilities):"
            rows = [head, *segment_table(self.segments)]
        else:
            rows = [f"most damaging distribution: {self.distribution}"]
        return rows + [
            f"read error rate     = {self.read_rate:.3e}  [{self.read_ci_low:.3e}, {self.read_ci_high:.3e}] "
            f"({self.read_errors:,}/{count(self.reads, 'read')}, fresh sample, 95% Clopper-Pearson)",
            f"P[sequence errs]    = {self.sequence_rate:.3e}  [{self.sequence_ci_low:.3e}, "
            f"{self.sequence_ci_high:.3e}] ({self.erring_sequences:,}/{count(self.sequences, 'sequence')})",
            f"{count(self.scored, 'sequence')} scored"
            + (f" of a budget of {self.budget:,}" if self.budget else "")
            + f": {self.search_scored:,} in the search, {self.sequences:,} to confirm; "
            f"T={self.seq_len}, {self.seconds:.1f} s",
        ]

    def __str__(self) -> str:
        return "\n".join(self.lines())


def maximize(
    model: nn.Module | str | os.PathLike,
    *,
    start: Family | None = None,
    seq_len: int | None = None,
    budget: int = 20_000,
    per_eval: int = 64,
    popsize: int | None = None,
    confirm: int = 2_000,
    soft: bool = True,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> AdversaryResult:
    """Search ``start``'s family (default :func:`default_family`) for the distribution with the
    highest read-error rate, then confirm it on ``confirm`` fresh sequences, within ``budget``
    sequences in all: the search spends what whole CMA-ES generations of ``per_eval``-sequence
    samples take of ``budget - confirm``.
    ``soft=False`` searches on the hard error rate alone (the public adversary's
    objective, which needs ~2,000 sequences per candidate to see rare errors). The model is
    put back on its device and mode afterwards."""
    fast, t, dev = checked_model(model, seq_len, device)
    start = start or default_family()
    if not isinstance(start, Family):
        raise FFInterpError(f"start must be a Family, got {type(start).__name__}")
    flags = {"budget": "--budget", "confirm": "--confirm", "per_eval": "--per-eval"}
    if confirm < 1 or per_eval < 1:
        raise FFInterpError(f"confirm and per_eval must be >= 1, got {confirm} and {per_eval}", flags=flags)
    if budget < confirm + per_eval:
        raise FFInterpError(
            f"budget must be >= confirm + per_eval, got {budget} < {confirm} + {per_eval}: the search "
            "needs one candidate's sample besides the final re-measurement",
            flags=flags,
        )
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    pop = popsize or (4 + int(3 * math.log(start.n_params)))
    candidates = (budget - confirm) // per_eval
    generations = max(1, candidates // pop)  # whole generations, unless not even one fits
    searching = min(generations * pop, candidates) * per_eval  # known up front: the bar's total
    ctx = SearchContext(
        fast, t, seed=seed, budget=searching, batch_size=batch_size, device=dev, strategy="distribution"
    )
    with placed(fast, dev):
        with tqdm(
            total=searching + confirm, desc="distribution search", unit="seq", disable=not progress
        ) as bar:

            def score(tokens, origin):
                sc = ctx.score(tokens, origin=origin)
                bar.update(len(sc.tokens))
                return sc

            best, trace = search(
                score, start, t, seed=seed, generations=generations, popsize=pop, per_eval=per_eval,
                soft=soft, stop=lambda: ctx.remaining < per_eval,
            )  # fmt: skip
            searched = ctx.scored
            ctx.budget = ctx.scored + confirm
            rng = np.random.Generator(np.random.PCG64([seed, 2**32]))  # apart from every search sample
            final = _candidate(best.family, ctx.score(best.family.draw(confirm, t, rng)))
            bar.update(confirm)
    rlo, rhi = clopper_pearson(final.errors, final.reads)
    slo, shi = clopper_pearson(final.erring_sequences, final.sequences)
    return AdversaryResult(
        str(best.family), [round(float(x), 6) for x in best.family.to_vector()],
        final.errors, final.reads, final.rate, rlo, rhi,
        final.erring_sequences, final.sequences, final.erring_sequences / final.sequences, slo, shi,
        searched, ctx.scored, t, time.perf_counter() - t0,
        {"scored": trace.scored, "best_rate": trace.best_rate, "best_objective": trace.best_objective},
        budget, best.family.describe(t) if isinstance(best.family, Piecewise) else [],
    )  # fmt: skip


# ---------------------------------------------------------------- glitch strategy


@register
@dataclass(frozen=True)
class Distribution(Strategy):
    """find-glitches strategy: unit k is one CMA-ES search over :func:`default_family`, then a
    fresh sample of ``confirm`` sequences from its best distribution.

    Every sample is scored through the context, so its errors are verified, minimised and
    diagnosed like any other strategy's; the best distribution (its text and its exact
    ``parameters``) and its confirmed rates are the unit's finding (``summary.json``:
    ``strategies.distribution.findings``), from which ``ffinterp harden`` trains.
    """

    name: ClassVar[str] = "distribution"
    segments: int = 4
    start_p_i: float = 0.9
    per_eval: int = 64
    generations: int = 20
    confirm: int = 512

    def run(self, ctx: SearchContext, unit: int) -> None:
        from ffinterp.analysis.search import derive_seed

        seed = derive_seed(ctx.seed, self.name, unit) % (2**31)
        start = default_family(self.segments, self.start_p_i)
        pop = 4 + int(3 * math.log(start.n_params))
        batch = max(1, min(self.per_eval, ctx.batch_size))
        best, trace = search(
            lambda tokens, origin: ctx.score(tokens, origin={"unit": unit, **origin}, record=None),
            start, ctx.seq_len, seed=seed, generations=self.generations, popsize=pop, per_eval=batch,
            stop=lambda: ctx.done,
        )  # fmt: skip
        finding = {
            "unit": unit,
            "distribution": str(best.family),
            # the fields of the Piecewise family, exactly: Piecewise(**parameters) rebuilds it
            "parameters": asdict(best.family),
            "search_scored": trace.scored[-1] if trace.scored else 0,
        }
        if not ctx.done:
            rng = np.random.Generator(np.random.PCG64([seed, 2**32]))
            sc = ctx.score(
                best.family.draw(self.confirm, ctx.seq_len, rng), origin={"unit": unit, "confirm": True}
            )
            final = _candidate(best.family, sc)
            lo, hi = clopper_pearson(final.errors, final.reads)
            finding |= {
                "read_errors": final.errors,
                "reads": final.reads,
                "read_rate": final.rate,
                "read_ci_low": lo,
                "read_ci_high": hi,
                "confirm_sequences": final.sequences,
            }
        ctx.findings.append(finding)


__all__ = ["AdversaryResult", "Candidate", "Distribution", "default_family", "maximize", "search"]
