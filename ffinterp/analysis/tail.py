"""How large is the tail? Rare-event estimates of a model's read-error probability.

A good model errs on one sequence in 10^6 or 10^9 of a sparse distribution: plain sampling
(``method="mc"``) sees nothing and can only give an upper bound. Importance sampling
(``method="is"``) samples from a proposal ``g`` that makes errors common and reweights
each sequence by ``w = p_target(x) / g(x)``, computed exactly from the families'
log-likelihoods (:mod:`ffinterp.analysis.families`).

The proposal is adapted by the cross-entropy method (Rubinstein and Kroese) on pilot
rounds: sample from ``g``, score every read, keep the elite (the sequences whose smallest
read margin is in the lowest ``elite`` fraction, or every erring sequence once there are
enough), refit the proposal family to the elite by weighted maximum likelihood with
weights ``p_target / g``, and smooth. The margin makes the levels continuous, so the search
climbs towards errors before it has seen one. The default family is a first-order
:class:`~ffinterp.analysis.families.Markov` chain (shift-invariant, so a local error
pattern is proposed at every position); ``proposal="piecewise"`` uses a position-tied
:class:`~ffinterp.analysis.families.Piecewise` family, and any family instance can be given.
The final proposal is the defensive mixture
``g = d * target + (1 - d) * ((1 - b) * adapted + b * halfway)`` (``d = 0.1``, ``b = 0.3``,
``halfway`` the adapted family interpolated half-way back to its start), so ``w <= 1/d = 10``
whatever the adaptation did, and error regions the adaptation under-weights keep some mass.

A model with no error on the sparse set needs more than a smooth family: its errors sit in
rare local patterns that no smooth family makes likely without making everything dense.
:mod:`ffinterp.analysis.patterns` builds a mixture of :class:`~ffinterp.analysis.planted.Planted`
glitch patterns from a glitch search (shrunk, mirrored, with jittered gaps) to start from;
the cross-entropy rounds then adapt the mixture's weights (``ffinterp estimate --plant``).

The estimate then comes from a *fresh* sample of the frozen proposal: pilot sequences are
counted in ``scored`` but never in the estimate, so it is the plain unbiased mean of
``w * 1[error]``. Self-normalised IS (dividing by the mean weight) would be biased and is
not used. Its interval is the normal approximation ``mean +- z * sd / sqrt(n)`` with the
sample standard deviation of ``w * 1[error]``, clipped at 0 (a probability). The bounded
weights give the summands a finite variance, so the central limit theorem applies. The
result is flagged ``reliable=False`` (and the CLI prints no interval) when the final sample
holds too few erring sequences, when their weights are dominated by a few (Kish effective
number of error hits, ``ess``), or when the last pilot round, itself an unbiased estimate
from a frozen proposal, disagrees with the final estimate.

Known limit: the interval is only as good as the proposal's coverage of the error region.
When the error region has several modes and the adaptation locks onto some of them, the
others are reached only through the defensive component; the estimate stays unbiased, but
a sample that happens not to visit them gives a confident underestimate that no
diagnostic computed from that sample can detect. Strong smoothing (0.4: each refit moves
the parameters 40% of the way) and the ``halfway`` component keep the proposal broad. On
the hand-built circuit at T=32 with 20,000 sequences, 78 of the 81 intervals not flagged
over 20 seeds at each of five rates from 5e-3 to 4e-10 covered the exact rate (96%); when
in doubt, rerun with other seeds and compare.

``per_read`` is E[errors per sequence] / E[reads per sequence] under the target: the
fraction of reads that err, pooled over sequences (what ``ffinterp eval`` reports). Under IS
the numerator is the unbiased mean of ``w * errors`` and the denominator is exact (the
family knows its expected number of reads), so its interval is the numerator's scaled.
Under MC both come from the sample: ``errors / reads`` with the Clopper-Pearson interval
on reads, as in :func:`ffinterp.evaluate.evaluate`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from ffinterp import distributed
from ffinterp.analysis.families import Family, Markov, Mixture, Piecewise, interpolate
from ffinterp.analysis.planted import Planted
from ffinterp.analysis.search import derive_seed
from ffinterp.checkpoints import model_digest
from ffinterp.device import resolve_device
from ffinterp.errors import FFInterpError
from ffinterp.evaluate import _as_model
from ffinterp.intervals import clopper_pearson
from ffinterp.language import last_write_pos, read_mask
from ffinterp.models.gpt import GPT
from ffinterp.scoring import rows_per_pass
from ffinterp.text import count

METHODS = ("is", "mc")
JOURNAL_ROWS = 2048  # sequences per journalled chunk: what a kill can cost at most


# ---------------------------------------------------------------- scoring


@dataclass(frozen=True)
class RowScores:
    """Per-sequence read scores of one batch: reads, read errors and the smallest margin."""

    reads: Int[Tensor, " batch"]
    errors: Int[Tensor, " batch"]
    min_margin: Float[Tensor, " batch"]

    @property
    def any_error(self) -> Bool[Tensor, " batch"]:
        return self.errors > 0


@torch.inference_mode()
def score_rows(model: nn.Module, tokens: Int[Tensor, "batch seq"]) -> RowScores:
    """Score every read of each sequence on the fast model; the results come back on CPU.

    Same rule as :func:`ffinterp.evaluate.count_errors` (an error is an argmax other than the
    last write's bit), kept per row, plus the smallest read margin (logit of the correct bit
    minus the largest other logit), which the cross-entropy stage uses as a level.
    """
    mask = read_mask(tokens)
    lw = last_write_pos(tokens)
    if bool((mask & (lw < 0)).any()):
        raise FFInterpError("a read comes before any write: not a flip-flop sequence")
    bit = tokens.gather(1, (lw + 1).clamp(0, tokens.shape[1] - 1))
    slots = slice(0, None, 2)
    passes = tokens.split(rows_per_pass(model, tokens.shape[1]))  # bounded memory for any batch
    at = [model(c, positions=slots) if isinstance(model, GPT) else model(c)[:, slots] for c in passes]
    logits = torch.cat(at).float()
    mask, bit = mask[:, slots], bit[:, slots]
    correct = logits.gather(-1, bit[..., None]).squeeze(-1)
    others = logits.scatter(-1, bit[..., None], float("-inf")).amax(-1)
    margin = (correct - others).masked_fill(~mask, float("inf"))
    wrong = mask & (logits.argmax(-1) != bit)
    return RowScores(mask.sum(1).cpu(), wrong.sum(1).cpu(), margin.amin(1).double().cpu())


# ---------------------------------------------------------------- result


@dataclass(frozen=True)
class TailEstimate:
    """P[a sequence has >= 1 read error] under ``target``, with its interval and diagnostics.

    ``scored`` counts every sequence run through the model (pilot rounds included): the
    budget; ``proposal_scored`` those scored before, to build a planted proposal
    (:func:`ffinterp.analysis.patterns.estimate_planted`); ``n`` those in the final
    estimate; ``hits`` the erring ones among them; ``ess`` the Kish effective number of hits,
    ``(sum w e)^2 / sum (w e)^2`` over the final summands (equal to ``hits`` when all weights
    agree, as under MC). When ``reliable`` is False the interval
    must not be quoted: ``warning`` says why.
    """

    estimate: float
    ci_low: float
    ci_high: float
    per_read: float
    per_read_ci_low: float
    per_read_ci_high: float
    scored: int
    n: int
    hits: int
    ess: float
    method: str
    reliable: bool
    warning: str | None
    target: str
    proposal: str
    seq_len: int
    confidence: float
    seconds: float
    proposal_scored: int = 0

    def to_dict(self) -> dict:
        """JSON-ready; an unreliable interval is ``null`` (never a confident-looking number)."""
        d = asdict(self)
        if not self.reliable:
            for k in ("ci_low", "ci_high", "per_read_ci_low", "per_read_ci_high"):
                d[k] = None
        return d

    def lines(self) -> list[str]:
        pct = f"{self.confidence:.0%}"
        out = [f"target {self.target}, T={self.seq_len}, method: {self.method}"]
        if self.reliable:
            out.append(
                f"P[sequence has a read error] = {self.estimate:.3e}  "
                f"[{self.ci_low:.3e}, {self.ci_high:.3e}] ({pct})"
            )
            out.append(
                f"read error rate             = {self.per_read:.3e}  "
                f"[{self.per_read_ci_low:.3e}, {self.per_read_ci_high:.3e}] ({pct})"
            )
        else:
            out.append(f"P[sequence has a read error] = {self.estimate:.3e}  (point estimate only)")
            out.append(f"read error rate             = {self.per_read:.3e}  (point estimate only)")
            out.append(f"interval not reliable: {self.warning}")
        out.append(
            f"{count(self.scored, 'sequence')} scored, {self.n:,} in the estimate, "
            f"{self.hits:,} with an error, "
            f"ESS {self.ess:.1f}, {self.seconds:.1f} s"
            + (
                f"; and {self.proposal_scored:,} before, to build the proposal"
                if self.proposal_scored
                else ""
            )
        )
        if self.proposal != self.target:
            text = self.proposal
            if len(text) > 400:
                text = text[:400] + " ... (all of it in to_dict(), or with --json)"
            out.append(f"proposal {text}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


# ---------------------------------------------------------------- sharding and resume


class Journal:
    """The scores of every chunk scored so far, keyed by its place in the run, on disk.

    Every sample is a pure function of the seed and of the scores before it, so a rerun with
    the same arguments regenerates the same chunks; those in the journal are taken from it
    instead of being scored again, and the result is the uninterrupted run's. The file holds
    tensors and plain values only (read back with ``weights_only=True``) and is replaced
    atomically after each chunk; under torchrun rank 0 writes it and every rank reads it.
    """

    def __init__(self, path: str | os.PathLike | None, fingerprint: dict, dist: distributed.Dist):
        self.path = Path(path) if path is not None else None
        self.fingerprint = json.dumps(fingerprint, sort_keys=True)
        self.dist = dist
        self.chunks: dict[str, Tensor] = {}
        if self.path is not None and not self.path.parent.is_dir():
            raise FFInterpError(f"{self.path}: cannot write the journal (no folder {self.path.parent})")
        if self.path is not None and self.path.exists():
            try:
                saved = torch.load(self.path, map_location="cpu", weights_only=True)
                ok = isinstance(saved, dict) and isinstance(saved.get("chunks"), dict)
            except Exception as e:  # a torn or foreign file: one line, never a traceback
                raise FFInterpError(
                    f"{self.path}: not an estimate journal ({str(e).splitlines()[0]})"
                ) from None
            if not ok:
                raise FFInterpError(f"{self.path}: not an estimate journal")
            if saved.get("fingerprint") != self.fingerprint:
                raise FFInterpError(
                    f"{self.path}: journal of another run (model or arguments differ); "
                    "delete it or give another journal=",
                    flags={"journal=": "--journal"},
                )
            self.chunks = dict(saved["chunks"])

    def get(self, key: str) -> Tensor | None:
        return self.chunks.get(key)

    def put(self, key: str, scores: Tensor) -> None:
        self.chunks[key] = scores
        if self.path is None or not self.dist.is_main:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        try:
            torch.save({"fingerprint": self.fingerprint, "chunks": self.chunks}, tmp)
            os.replace(tmp, self.path)
        except (OSError, RuntimeError) as e:  # torch reports some I/O failures as RuntimeError
            tmp.unlink(missing_ok=True)
            why = getattr(e, "strerror", None) or str(e).splitlines()[0]
            raise FFInterpError(f"{self.path}: cannot write the journal ({why})") from None


def _score_shared(
    fast: nn.Module, tokens: Tensor, dev: torch.device, batch_size: int, dist: distributed.Dist
) -> Tensor:
    """[n, 3] float64 (reads, errors, smallest margin) of every row, each rank scoring rows
    ``rank::world`` and every rank getting all of them back."""
    mine = tokens[dist.rank :: dist.world_size]
    parts = [score_rows(fast, c.to(dev, non_blocking=True)) for c in mine.split(batch_size)]
    cols = [torch.stack([p.reads.double(), p.errors.double(), p.min_margin.double()], 1) for p in parts]
    local = torch.cat(cols) if cols else torch.empty(0, 3, dtype=torch.float64)
    if not dist.active:
        return local
    out = torch.empty(len(tokens), 3, dtype=torch.float64)
    for r, part in enumerate(dist.all_gather(local)):
        out[r :: dist.world_size] = part
    return out


# ---------------------------------------------------------------- estimator


def _mean_and_se(x: Tensor) -> tuple[float, float]:
    return float(x.mean()), (float(x.std()) / math.sqrt(len(x)) if len(x) > 1 else math.inf)


def _kish(x: Tensor) -> float:
    s2 = float((x * x).sum())
    return float(x.sum()) ** 2 / s2 if s2 > 0 else 0.0


PROPOSALS = ("markov", "piecewise")
SEQ_LEN = {"seq_len": "--seq-len"}  # how the CLI spells it (FFInterpError.for_cli)


def checked_model(
    model: nn.Module | str | os.PathLike, seq_len: int | None, device: str | torch.device
) -> tuple[nn.Module, int, torch.device]:
    """The fast model, the sequence length (default: its block size) and the device, each
    checked, for anything that scores sequences of a model here."""
    fast, _ = _as_model(model)
    block = getattr(getattr(fast, "cfg", None), "block_size", None)
    t = seq_len if seq_len is not None else (block or 512)
    if t < 4 or t % 2:
        raise FFInterpError(f"seq_len must be an even number >= 4, got {t}", flags=SEQ_LEN)
    if block is not None and t > block:
        raise FFInterpError(f"seq_len {t} exceeds the model's block size {block}", flags=SEQ_LEN)
    try:
        dev = resolve_device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
    except RuntimeError as e:
        raise FFInterpError(f"device {device!r}: {str(e).splitlines()[0]}") from None
    return fast, t, dev


@contextmanager
def placed(fast: nn.Module, dev: torch.device) -> Iterator[nn.Module]:
    """``fast`` on ``dev`` in eval mode; put back on its device and in its mode afterwards."""
    param = next(fast.parameters(), None)
    home = param.device if param is not None else torch.device("cpu")
    was_training = fast.training
    fast.to(dev).eval()
    try:
        yield fast
    finally:
        fast.to(home).train(was_training)


def _describe(family: Family) -> str:
    """The proposal family in a few words, for the method line."""
    parts = family.components if isinstance(family, Mixture) else (family,)
    if all(isinstance(p, Planted) for p in parts):
        return f"the weights of {count(len(parts), 'planted glitch pattern')}"
    return type(family).__name__


def _init_proposal(target: Family, proposal: str | Family, seq_len: int, segments: int, seed: int) -> Family:
    """The family the cross-entropy stage adapts, fitted to target samples (no model calls).

    ``markov``: a first-order :class:`Markov` chain (shift-invariant: one local pattern at
    every position). ``piecewise``: ``segments`` segments with per-segment bit-1 probabilities
    (position-dependent). A :class:`Family` instance is used as given.
    """
    if isinstance(proposal, Family):
        return proposal
    if proposal == "markov":
        start: Family = Markov(((0.25,) * 4,) * 4)
    elif proposal == "piecewise":
        start = Piecewise.uniform(segments, 1 / 3, 1 / 3, 1 / 3, one=0.5)
    else:
        raise FFInterpError(f"proposal must be one of {', '.join(PROPOSALS)} or a Family, got {proposal!r}")
    fitted = start.fit(target.sample(4096, seq_len, seed=derive_seed(seed, "init")))
    # Keep every probability away from 0 so the first refits can move anywhere.
    return interpolate(start, fitted, 0.99)


def estimate(
    model: nn.Module | str | os.PathLike,
    target: Family,
    *,
    budget: int = 20_000,
    seed: int = 0,
    method: str = "is",
    seq_len: int | None = None,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    progress: bool = True,
    confidence: float = 0.95,
    pilot: float = 0.5,
    rounds: int = 10,
    chains: int = 1,
    broaden: float = 0.3,
    proposal: str | Family = "markov",
    segments: int = 4,
    elite: float = 0.1,
    smoothing: float = 0.4,
    defensive: float = 0.1,
    min_hits: int = 10,
    min_ess: float = 10.0,
    journal: str | os.PathLike | None = None,
    dist: distributed.Dist | None = None,
) -> TailEstimate:
    """Estimate P[>= 1 read error] of ``model`` on sequences from ``target``.

    ``method="mc"`` scores ``budget`` target samples (exact Clopper-Pearson interval).
    ``method="is"`` spends ``pilot * budget`` sequences on ``chains`` independent runs of
    ``rounds`` cross-entropy rounds, each adapting a ``proposal`` family (``markov``,
    ``piecewise`` with ``segments`` segments, or a :class:`Family` to start from), then
    estimates from the rest, drawn fresh from the frozen defensive mixture (see the module
    docstring for the interval and when it is flagged). ``model`` is a fast model, an
    ``FFLModel`` or a checkpoint spec; ``seq_len`` defaults to its block size. The model is
    put back on its device and in its train/eval mode afterwards.

    Under torchrun (``dist``, default :func:`ffinterp.distributed.current`) each rank scores
    a strided share of every sample and the scores are gathered, so every rank adapts the
    same proposal and the result is one process's, for any world size. ``journal`` records
    every scored chunk; rerunning with the same file resumes where a killed run stopped.
    """
    fast, t, dev = checked_model(model, seq_len, device)
    if method not in METHODS:
        raise FFInterpError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not isinstance(target, Family):
        raise FFInterpError(f"target must be a Family, got {type(target).__name__}")
    if budget < 1 or batch_size < 1:
        raise FFInterpError(f"budget and batch_size must be >= 1, got {budget} and {batch_size}")
    if not 0 < confidence < 1:
        raise FFInterpError(f"confidence must be in (0, 1), got {confidence}")
    if not (0 < pilot < 1 and 0 < elite < 1 and 0 < smoothing <= 1 and 0 < defensive < 1 and rounds >= 1):
        raise FFInterpError("need 0 < pilot, elite, defensive < 1, 0 < smoothing <= 1 and rounds >= 1")
    if chains < 1 or not 0 <= broaden < 1:
        raise FFInterpError(f"need chains >= 1 and 0 <= broaden < 1, got {chains} and {broaden}")
    per_round = int(budget * pilot) // (rounds * chains) if method == "is" else 0
    if method == "is" and per_round < 10:
        raise FFInterpError(
            f"budget {budget} is too small for {chains} x {rounds} pilot rounds (need >= 10 sequences each)"
        )
    from tqdm.auto import tqdm

    dist = dist if dist is not None else distributed.current()
    settings = dict(
        target=str(target), budget=budget, seed=seed, method=method, seq_len=t, pilot=pilot, rounds=rounds,
        chains=chains, broaden=broaden, proposal=str(proposal), segments=segments, elite=elite,
        smoothing=smoothing, defensive=defensive,
    )  # fmt: skip
    book = Journal(journal, {"model": model_digest(fast), **settings}, dist) if journal is not None else None
    book = book or Journal(None, {}, dist)
    start = time.perf_counter()
    with placed(fast, dev):
        with tqdm(
            total=budget,
            desc=f"estimate ({method})",
            unit="seq",
            disable=not (progress and dist.is_main),
            dynamic_ncols=True,
        ) as bar:

            def run(tokens: Tensor, key: str) -> RowScores:
                parts = []
                for k, chunk in enumerate(tokens.split(JOURNAL_ROWS)):
                    got = book.get(f"{key}/{k}")
                    if got is None or len(got) != len(chunk):
                        got = _score_shared(fast, chunk, dev, batch_size, dist)
                        book.put(f"{key}/{k}", got)
                    parts.append(got)
                    bar.update(len(chunk))
                    distributed.check_stop()  # a SIGTERM stops the run here, between chunks
                x = torch.cat(parts)
                return RowScores(x[:, 0].long(), x[:, 1].long(), x[:, 2])

            if method == "mc":
                tokens = target.sample(budget, t, seed=derive_seed(seed, "mc"))
                s = run(tokens, "mc")
                hits, reads, errors = int(s.any_error.sum()), int(s.reads.sum()), int(s.errors.sum())
                lo, hi = clopper_pearson(hits, budget, 1 - confidence)
                rlo, rhi = clopper_pearson(errors, reads, 1 - confidence)
                return TailEstimate(
                    hits / budget, lo, hi, errors / reads if reads else math.nan, rlo, rhi,
                    budget, budget, hits, float(hits), "mc (exact Clopper-Pearson interval)",
                    True, None, str(target), str(target), t, confidence, time.perf_counter() - start,
                )  # fmt: skip

            adapted_all, checks, scored = [], [], 0
            for c in range(chains):
                adapted = init = _init_proposal(target, proposal, t, segments, seed)
                for r in range(rounds):
                    g = Mixture((target, adapted), (defensive, 1 - defensive))
                    tokens = g.sample(per_round, t, seed=derive_seed(seed, "pilot", c, r))
                    s = run(tokens, f"pilot/{c}/{r}")
                    scored += len(tokens)
                    logw = target.log_prob(tokens) - g.log_prob(tokens)
                    err = s.any_error
                    if r == rounds - 1:  # drawn from a frozen proposal: an unbiased check
                        checks.append(_mean_and_se(logw.exp() * err.double()) + (int(err.sum()),))
                    if int(err.sum()) >= elite * len(tokens):
                        keep = err
                    else:
                        # The elite: the lowest `elite` fraction of smallest margins. Margins
                        # often tie at the top (one write read cleanly), so a level that keeps
                        # far more than that fraction keeps only what lies strictly below it.
                        margin = s.min_margin.clamp(-1e30, 1e30)
                        level = torch.quantile(margin, elite)
                        keep = margin <= level
                        if int(keep.sum()) > 2 * elite * len(tokens) and bool((margin < level).any()):
                            keep = margin < level
                        keep |= err
                    w = logw[keep].exp()
                    if float(w.sum()) > 0:
                        refit = adapted.fit(tokens[keep], w / w.sum())
                        adapted = interpolate(adapted, refit, smoothing)  # type: ignore[assignment]
                    bar.set_postfix(chain=c, round=r, hits=int(err.sum()), refresh=False)
                adapted_all.append(adapted)
                if broaden > 0:
                    adapted_all.append(interpolate(init, adapted, 0.5))

            parts = [1 - broaden, broaden] * chains if broaden > 0 else [1.0] * chains
            share = [(1 - defensive) * p / chains for p in parts]
            g = Mixture((target, *adapted_all), (defensive, *share))
            n = budget - scored
            tokens = g.sample(n, t, seed=derive_seed(seed, "final"))
            s = run(tokens, "final")
            scored += n

    w = (target.log_prob(tokens) - g.log_prob(tokens)).exp()
    y = w * s.any_error.double()
    ye = w * s.errors.double()
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    est, half = float(y.mean()), z * float(y.std()) / math.sqrt(n) if n > 1 else math.inf
    mean_reads = target.expected_reads(t)
    per_read, rhalf = float(ye.mean()) / mean_reads, z * float(ye.std()) / math.sqrt(n) / mean_reads
    hits, ess = int(s.any_error.sum()), _kish(y)
    reasons = []
    if hits == 0:
        reasons.append(
            "no erring sequence in the final sample, so 0 is not an upper bound: "
            "the proposal never found errors"
        )
    elif hits < min_hits:
        reasons.append(f"only {count(hits, 'erring sequence')} in the final sample (need {min_hits})")
    if hits and ess < min_ess:
        reasons.append(f"effective number of error hits {ess:.1f} < {min_ess:g} (weights degenerate)")
    # Each chain's last pilot round is an independent unbiased estimate (its proposal was
    # frozen while it was drawn); one that found errors but disagrees with the final
    # estimate means some error region weighs differently under the two proposals, so the
    # final sample variance cannot be trusted.
    final_se = half / z
    for c, (m_c, se_c, hits_c) in enumerate(checks):
        if hits_c >= min_hits and abs(m_c - est) > 2 * z * math.hypot(se_c, final_se):
            reasons.append(
                f"the last pilot round of chain {c} estimated {m_c:.2e} against {est:.2e}: "
                "the proposals disagree, some error region may be missed"
            )
    return TailEstimate(
        est, max(0.0, est - half), est + half, per_read, max(0.0, per_read - rhalf), per_read + rhalf,
        scored, n, hits, ess,
        f"is ({count(chains, 'cross-entropy chain')} x {count(rounds, 'pilot round')} adapting "
        f"{_describe(adapted_all[0])}, defensive mixture {defensive:g}; unbiased mean of "
        "w*1[error], normal interval)",
        not reasons, "; ".join(reasons) or None, str(target), str(g), t, confidence,
        time.perf_counter() - start,
    )  # fmt: skip


__all__ = [
    "METHODS",
    "Journal",
    "RowScores",
    "TailEstimate",
    "checked_model",
    "estimate",
    "placed",
    "score_rows",
]
