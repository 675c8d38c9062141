"""Error rates on the paper's evaluation sets, with exact 95% Clopper–Pearson intervals.

Glitches are rare: a good model makes 0 errors in 400k reads, and "0" would be a false
claim. Every rate is reported with its exact binomial interval, so 0 errors in N reads
reads as an upper bound (``< 9.0e-06``) rather than as zero.

Scoring runs on the fast model only, in ``torch.inference_mode``, with the set streamed
from its seed in chunks (the sparse set is 80M tokens; it is never held whole).
Errors are counted on the device; only three integers per batch come back.

Under ``torchrun`` each rank scores a disjoint share of every set's stream (whole sampler
blocks, taken in turn) and the three counts are summed over ranks, so the counts and
intervals are those of one process for any world size (see :mod:`ffinterp.distributed`).
"""

from __future__ import annotations

import html
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch
from jaxtyping import Int
from torch import Tensor, nn

from ffinterp import distributed
from ffinterp.data import STANDARD_SETS, eval_set_spec, iter_eval_set
from ffinterp.device import resolve_device
from ffinterp.errors import FFInterpError
from ffinterp.language import BLOCK_ROWS, last_write_pos, read_mask
from ffinterp.models.gpt import GPT

DEFAULT_SETS = ("in", "sparse", "dense")

# ---------------------------------------------------------------- Clopper–Pearson


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1_000_000):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def beta_ppf(p: float, a: float, b: float) -> float:
    """The p-quantile of Beta(a, b), by bisection on :func:`betainc` (monotone in x)."""
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if betainc(a, b, mid) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def clopper_pearson(errors: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact two-sided (1 - alpha) binomial interval for ``errors`` out of ``n``.

    Closed forms at the edges: 0 errors gives [0, 1 - (alpha/2)^(1/n)].
    """
    if n < 0 or not 0 <= errors <= n:
        raise ValueError(f"need 0 <= errors <= n, got errors={errors}, n={n}")
    if n == 0:
        return 0.0, 1.0
    q = alpha / 2
    lo = 0.0 if errors == 0 else (q ** (1 / n) if errors == n else beta_ppf(q, errors, n - errors + 1))
    hi = (
        1.0 if errors == n else (1 - q ** (1 / n) if errors == 0 else beta_ppf(1 - q, errors + 1, n - errors))
    )
    return lo, hi


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class SetResult:
    """One evaluation set's outcome: counts, exact interval and speed."""

    name: str
    distribution: str
    n_seqs: int
    seq_len: int
    reads: int
    errors: int
    seqs_with_error: int
    ci_low: float
    ci_high: float
    seconds: float
    confidence: float = 0.95

    @property
    def error_rate(self) -> float:
        return self.errors / self.reads if self.reads else math.nan

    @property
    def reads_per_s(self) -> float:
        return self.reads / self.seconds if self.seconds > 0 else math.nan

    @property
    def rate_text(self) -> str:
        """``< 9.0e-06`` for 0 errors (an upper bound), else ``rate [low, high]``."""
        if self.errors == 0:
            return f"< {self.ci_high:.1e}"
        return f"{self.error_rate:.1e} [{self.ci_low:.1e}, {self.ci_high:.1e}]"

    def line(self) -> str:
        pct = f"{self.confidence:.0%}"
        return f"{self.errors} / {self.reads}  ({self.rate_text}, {pct} CP)"

    def to_dict(self) -> dict:
        return {**asdict(self), "error_rate": self.error_rate, "reads_per_s": self.reads_per_s}


@dataclass(frozen=True)
class EvalResult:
    """Per-set results of :func:`evaluate`; prints as a table, renders as HTML in Jupyter."""

    sets: tuple[SetResult, ...]
    model: str
    device: str
    batch_size: int

    def __getitem__(self, name: str) -> SetResult:
        for s in self.sets:
            if s.name == name:
                return s
        raise KeyError(f"no set {name!r} in this result (have {', '.join(s.name for s in self.sets)})")

    def __iter__(self) -> Iterator[SetResult]:
        return iter(self.sets)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "device": self.device,
            "batch_size": self.batch_size,
            "sets": {s.name: s.to_dict() for s in self.sets},
        }

    def _rows(self) -> list[list[str]]:
        return [
            [
                s.name,
                s.distribution,
                f"{s.n_seqs} x {s.seq_len}",
                s.line(),
                str(s.seqs_with_error),
                f"{s.reads_per_s:,.0f}",
            ]
            for s in self.sets
        ]

    HEADER = (
        "set",
        "distribution",
        "seqs x T",
        "errors / reads  (error rate, 95% CP)",
        "bad seqs",
        "reads/s",
    )

    def table(self) -> str:
        rows = [list(self.HEADER), *self._rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.HEADER))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return f"{self.model}  [device {self.device}]\n" + "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.HEADER)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self._rows()
        )
        return (
            f"<div><b>{html.escape(self.model)}</b> <small>device {html.escape(self.device)}</small>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            "<small>0 errors are shown as the upper end of the exact 95% Clopper&ndash;Pearson interval."
            "</small></div>"
        )


# ---------------------------------------------------------------- scoring


@torch.inference_mode()
def count_errors(model: nn.Module, tokens: Int[Tensor, "batch seq"]) -> tuple[int, int, int]:
    """(reads, errors, sequences with an error) of one batch, counted where the model lives.

    An error is an argmax other than the last write's bit at a read (same rule as
    :func:`ffinterp.scoring.score_logits`).
    """
    mask = read_mask(tokens)
    lw = last_write_pos(tokens)
    if bool((mask & (lw < 0)).any()):
        raise FFInterpError("a read comes before any write: not a flip-flop sequence")
    bit = tokens.gather(1, (lw + 1).clamp(0, tokens.shape[1] - 1))
    if isinstance(model, GPT):  # the last block runs at the reads alone
        wrong = torch.zeros_like(mask)
        wrong[mask] = model.logits_at(tokens, mask).argmax(-1) != bit[mask]
    else:
        wrong = mask & (model(tokens).argmax(-1) != bit)
    counts = torch.stack([mask.sum(), wrong.sum(), wrong.any(1).sum()]).tolist()
    return int(counts[0]), int(counts[1]), int(counts[2])


def _chunk_rows(batch_size: int) -> int:
    return max(BLOCK_ROWS, -(-batch_size // BLOCK_ROWS) * BLOCK_ROWS)


def _chunks(
    name: str, n: int, seq_len: int, batch_size: int, part: tuple[int, int] = (0, 1)
) -> Iterator[Int[Tensor, "batch seq"]]:
    """Model batches of a set (``part``: this rank's share of the chunks); generation runs
    one chunk ahead, in whole sampler blocks."""
    chunk = _chunk_rows(batch_size)
    stream = (b for _, b in iter_eval_set(name, n, seq_len, batch_size=chunk, part=part))
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(next, stream, None)
        while (tokens := pending.result()) is not None:
            pending = pool.submit(next, stream, None)
            yield from tokens.split(batch_size)


def _per_set(value: int | Mapping[str, int] | None, name: str, default: int | None) -> int | None:
    if isinstance(value, Mapping):
        return value.get(name, default)
    return default if value is None else value


def _as_model(model: object) -> tuple[nn.Module, str]:
    """A fast model and its description from a module, a checkpoint spec or an FFLModel."""
    if isinstance(model, (str, os.PathLike)):
        from ffinterp.checkpoints import load_checkpoint

        loaded = load_checkpoint(model)
        return loaded.model, f"{model}: {loaded.summary}"
    fast = getattr(model, "fast", None)
    if isinstance(fast, nn.Module):  # an ffinterp.hooked.FFLModel: score on its fast view
        return fast, getattr(model, "name", type(fast).__name__)
    if isinstance(model, nn.Module):
        return model, type(model).__name__
    raise FFInterpError(f"evaluate: expected a model or a checkpoint path, got {type(model).__name__}")


def evaluate(
    model: nn.Module | str | os.PathLike,
    sets: str | Sequence[str] = DEFAULT_SETS,
    *,
    n: int | Mapping[str, int] | None = None,
    seq_len: int | Mapping[str, int] | None = None,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    progress: bool = True,
    confidence: float = 0.95,
    dist: distributed.Dist | None = None,
) -> EvalResult:
    """Score a model's reads on the standard sets (default: each set's full size).

    ``model`` is a fast GPT or LSTM, an ``FFLModel``, or anything :func:`load_checkpoint`
    reads. ``n`` and ``seq_len`` may be one value or a per-set mapping; ``seq_len`` defaults to
    the model's block size (512, the paper's T, for a model without one). The model is put
    back on its device and in its train/eval mode afterwards. Under ``torchrun`` (``dist``:
    default :func:`ffinterp.distributed.current`) every rank calls this on its own device and
    gets the totals over all ranks.
    """
    fast, description = _as_model(model)
    names = [s.strip() for s in sets.split(",")] if isinstance(sets, str) else list(sets)
    if not names or not all(names):
        raise FFInterpError(f"no evaluation sets given (known: {', '.join(STANDARD_SETS)})")
    if batch_size < 1:
        raise FFInterpError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 < confidence < 1:
        raise FFInterpError(f"confidence must be in (0, 1), got {confidence}")
    block = getattr(getattr(fast, "cfg", None), "block_size", None)
    plan = []
    for name in names:
        spec = eval_set_spec(name)
        rows = _per_set(n, name, spec.size)
        t = _per_set(seq_len, name, block or 512)
        if rows is None or rows < 1:
            raise FFInterpError(f"set {name}: n must be >= 1, got {rows}")
        if t is None or t < 4 or t % 2:
            raise FFInterpError(f"set {name}: seq_len must be an even number >= 4, got {t}")
        if block is not None and t > block:
            raise FFInterpError(f"set {name}: seq_len {t} exceeds the model's block_size {block}")
        plan.append((spec, rows, t))
    try:
        dev = resolve_device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
    except RuntimeError as e:
        raise FFInterpError(f"device {device!r}: {str(e).splitlines()[0]}") from None

    from tqdm.auto import tqdm

    dist = dist if dist is not None else distributed.current()
    part = (dist.rank, dist.world_size)

    param = next(fast.parameters(), None)
    home = param.device if param is not None else torch.device("cpu")
    was_training = fast.training
    fast.to(dev).eval()
    results = []
    try:
        for spec, rows, t in plan:
            reads = errors = bad = 0
            start = time.perf_counter()
            chunk = _chunk_rows(batch_size)
            mine = sum(min(chunk, rows - o) for o in dist.shard(range(0, rows, chunk)))
            with tqdm(
                total=mine,
                desc=spec.name if not dist.active else f"{spec.name} (rank 0 of {dist.world_size})",
                unit="seq",
                disable=not (progress and dist.is_main),
                dynamic_ncols=True,
            ) as bar:
                for tokens in _chunks(spec.name, rows, t, batch_size, part):
                    r, e, b = count_errors(fast, tokens.to(dev, non_blocking=True))
                    reads, errors, bad = reads + r, errors + e, bad + b
                    bar.update(len(tokens))
                    bar.set_postfix(errors=errors, refresh=False)
                    distributed.check_stop()  # a SIGTERM stops the scan here, between batches
            reads, errors, bad = dist.all_reduce_sum([reads, errors, bad]).tolist()
            seconds = time.perf_counter() - start  # after the sum: the slowest rank's time
            lo, hi = clopper_pearson(errors, reads, 1 - confidence)
            results.append(
                SetResult(
                    spec.name, f"FFL({spec.p_i})", rows, t, reads, errors, bad, lo, hi, seconds, confidence
                )
            )
    finally:
        fast.to(home).train(was_training)
    where = str(dev) if not dist.active else f"{dev} x {dist.world_size} ranks"
    return EvalResult(tuple(results), description, where, batch_size)


__all__ = ["EvalResult", "SetResult", "beta_ppf", "betainc", "clopper_pearson", "count_errors", "evaluate"]
