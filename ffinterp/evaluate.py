"""Error rates on the paper's evaluation sets (or a caller's own sequences), with intervals.

Glitches are rare: a good model makes 0 errors in 400k reads, and "0" would be a false
claim. Every rate comes with a 95% interval, so 0 errors read as an upper bound
(``< 9.0e-06``) rather than as zero. Errors cluster within sequences (one sequence can hold
seven), so the sequence, not the read, is the independent unit (:mod:`ffinterp.intervals`):
P(a sequence errs) gets an exact Clopper-Pearson interval over sequences, and the per-read
rate an interval from the spread of errors over sequences.

Scoring runs on the fast model only, in ``torch.inference_mode``, with the set streamed
from its seed in chunks (the sparse set is 80M tokens; it is never held whole).
Errors are counted on the device; only two integers per sequence (its reads and errors)
come back.

Under ``torchrun`` each rank scores a disjoint share of every set's stream (whole sampler
blocks, taken in turn) and the per-sequence counts are gathered from all ranks, so the counts
and intervals are those of one process for any world size (see :mod:`ffinterp.distributed`).
"""

from __future__ import annotations

import html
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor, nn

from ffinterp import distributed
from ffinterp.data import STANDARD_SETS, eval_set_spec, iter_eval_set
from ffinterp.device import resolve_device
from ffinterp.errors import FFInterpError
from ffinterp.intervals import clopper_pearson, read_rate_interval
from ffinterp.language import BLOCK_ROWS, last_write_pos, read_mask
from ffinterp.models.gpt import GPT

DEFAULT_SETS = ("in", "sparse", "dense")

# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class SetResult:
    """One evaluation set's outcome: counts, intervals with the sequence as the unit, speed.

    ``ci_low``/``ci_high`` bound the per-read error rate (see
    :func:`ffinterp.intervals.read_rate_interval`: valid although errors cluster within
    sequences); ``seq_ci_low``/``seq_ci_high`` are the exact Clopper-Pearson interval for
    P(a sequence errs at least once). ``max_seq_reads`` is the most reads in one sequence.
    """

    name: str
    distribution: str
    n_seqs: int
    seq_len: int
    reads: int
    errors: int
    seqs_with_error: int
    ci_low: float
    ci_high: float
    seq_ci_low: float
    seq_ci_high: float
    max_seq_reads: int
    seconds: float
    confidence: float = 0.95

    @property
    def error_rate(self) -> float:
        return self.errors / self.reads if self.reads else math.nan

    @property
    def seq_rate(self) -> float:
        """The share of sequences with at least one read error."""
        return self.seqs_with_error / self.n_seqs if self.n_seqs else math.nan

    @property
    def reads_per_s(self) -> float:
        return self.reads / self.seconds if self.seconds > 0 else math.nan

    @property
    def rate_text(self) -> str:
        """``< 2.1e-05`` for 0 errors (an upper bound), else ``rate [low, high]`` (per read)."""
        return _interval_text(self.errors, self.error_rate, self.ci_low, self.ci_high)

    @property
    def seq_rate_text(self) -> str:
        """The same for P(a sequence errs)."""
        return _interval_text(self.seqs_with_error, self.seq_rate, self.seq_ci_low, self.seq_ci_high)

    def read_cell(self) -> str:
        return f"{self.errors} / {self.reads}  ({self.rate_text})"

    def seq_cell(self) -> str:
        return f"{self.seqs_with_error} / {self.n_seqs}  ({self.seq_rate_text})"

    def line(self) -> str:
        pct = f"{self.confidence:.0%}"
        return f"reads {self.read_cell()}; sequences {self.seq_cell()}  ({pct} intervals)"

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "error_rate": self.error_rate,
            "seq_rate": self.seq_rate,
            "reads_per_s": self.reads_per_s,
        }


def _interval_text(count: int, rate: float, lo: float, hi: float) -> str:
    return f"< {hi:.1e}" if count == 0 else f"{rate:.1e} [{lo:.1e}, {hi:.1e}]"


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

    @property
    def _pct(self) -> str:
        return f"{self.sets[0].confidence:.0%}" if self.sets else "95%"

    def _header(self) -> tuple[str, ...]:
        return (
            "set",
            "distribution",
            "seqs x T",
            f"errors / reads  (per read, {self._pct} CI)",
            f"erring seqs / seqs  (per sequence, {self._pct} CP)",
            "reads/s",
        )

    def _rows(self) -> list[list[str]]:
        return [
            [
                s.name,
                s.distribution,
                f"{s.n_seqs} x {s.seq_len}",
                s.read_cell(),
                s.seq_cell(),
                f"{s.reads_per_s:,.0f}",
            ]
            for s in self.sets
        ]

    NOTE = (
        "Errors cluster within sequences, so the intervals take the sequence as the unit: per read, "
        "errors / reads with a t interval over sequences; per sequence, exact Clopper-Pearson. "
        "'<' marks an upper bound (0 errors)."
    )

    def table(self) -> str:
        header = self._header()
        rows = [list(header), *self._rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return f"{self.model}  [device {self.device}]\n" + "\n".join(lines) + "\n" + self.NOTE

    def __str__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self._header())
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self._rows()
        )
        return (
            f"<div><b>{html.escape(self.model)}</b> <small>device {html.escape(self.device)}</small>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            f"<small>{html.escape(self.NOTE)}</small></div>"
        )


# ---------------------------------------------------------------- scoring


@torch.inference_mode()
def count_errors(
    model: nn.Module, tokens: Int[Tensor, "batch seq"]
) -> tuple[Int[Tensor, " batch"], Int[Tensor, " batch"]]:
    """Reads and read errors of each sequence in a batch, counted where the model lives.

    An error is an argmax other than the last write's bit at a read (same rule as
    :func:`ffinterp.scoring.score_logits`). Only the two per-sequence counts come back to
    the CPU (one transfer), never a per-read tensor.
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
    counts = torch.stack([mask.sum(1), wrong.sum(1)]).to(torch.int32).cpu()
    return counts[0], counts[1]


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


def _given_chunks(
    tokens: Int[Tensor, "n seq"], batch_size: int, part: tuple[int, int] = (0, 1)
) -> Iterator[Int[Tensor, "batch seq"]]:
    """Model batches of given sequences, in this rank's share of the same chunks as a set."""
    chunk = _chunk_rows(batch_size)
    k, parts = part
    for offset in range(0, len(tokens), chunk)[k::parts]:
        yield from tokens[offset : offset + chunk].split(batch_size)


def _given_sets(sequences: Mapping[str, Tensor] | None) -> dict[str, Int[Tensor, "n seq"]]:
    """Validated copies of a caller's own named sequence batches."""
    from ffinterp.language import validate_batch

    out = {}
    for name, tokens in (sequences or {}).items():
        if not isinstance(name, str) or not name:
            raise FFInterpError(f"sequences: names must be non-empty strings, got {name!r}")
        t = torch.as_tensor(tokens)
        if t.ndim != 2 or not len(t) or t.is_floating_point() or t.is_complex():
            raise FFInterpError(
                f"sequences[{name!r}]: expected a non-empty 2-D integer batch of tokens, "
                f"got {t.dtype} of shape {tuple(t.shape)}"
            )
        try:
            validate_batch(t, labelled=False)
        except FFInterpError as e:
            raise FFInterpError(f"sequences[{name!r}]: {e}") from None
        out[name] = t.long()
    return out


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


def _set_result(
    name: str,
    distribution: str,
    t: int,
    counts: Int[np.ndarray, "2 seqs"],
    seconds: float,
    confidence: float,
) -> SetResult:
    """Totals and both intervals of one set from its per-sequence (reads, errors) counts."""
    reads, errors = counts
    rows = len(reads)
    lo, hi = read_rate_interval(reads, errors, confidence)
    bad = int((errors > 0).sum())
    slo, shi = clopper_pearson(bad, rows, 1 - confidence)
    return SetResult(
        name=name,
        distribution=distribution,
        n_seqs=rows,
        seq_len=t,
        reads=int(reads.sum()),
        errors=int(errors.sum()),
        seqs_with_error=bad,
        ci_low=lo,
        ci_high=hi,
        seq_ci_low=slo,
        seq_ci_high=shi,
        max_seq_reads=int(reads.max()) if rows else 0,
        seconds=seconds,
        confidence=confidence,
    )


def evaluate(
    model: nn.Module | str | os.PathLike,
    sets: str | Sequence[str] = DEFAULT_SETS,
    *,
    n: int | Mapping[str, int] | None = None,
    seq_len: int | Mapping[str, int] | None = None,
    sequences: Mapping[str, Int[Tensor, "n seq"]] | None = None,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    progress: bool = True,
    confidence: float = 0.95,
    dist: distributed.Dist | None = None,
) -> EvalResult:
    """Score a model's reads on the standard sets (default: each set's full size).

    ``model`` is a fast GPT or LSTM, an ``FFLModel``, or anything :func:`load_checkpoint`
    reads. ``n`` and ``seq_len`` may be one value or a per-set mapping; ``seq_len`` defaults to
    the model's block size (512, the paper's T, for a model without one). ``sequences`` adds
    the caller's own sets, ``{name: tokens}`` (e.g. from :func:`ffinterp.data.read_sequences`),
    scored after ``sets`` and reported the same way; pass ``sets=()`` to score only them.
    The model is put back on its device and in its train/eval mode afterwards. Under
    ``torchrun`` (``dist``: default :func:`ffinterp.distributed.current`) every rank calls this
    on its own device and gets the results over all ranks.
    """
    fast, description = _as_model(model)
    names = [s.strip() for s in sets.split(",")] if isinstance(sets, str) else list(sets)
    given = _given_sets(sequences)
    if not all(names) or not (names or given):
        raise FFInterpError(f"no evaluation sets given (known: {', '.join(STANDARD_SETS)})")
    if batch_size < 1:
        raise FFInterpError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 < confidence < 1:
        raise FFInterpError(f"confidence must be in (0, 1), got {confidence}")
    clash = sorted(set(names) & set(given)) or sorted({x for x in names if names.count(x) > 1})
    if clash:
        raise FFInterpError(f"set {clash[0]!r} is given twice: every set needs its own name")
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
        plan.append((name, f"FFL({spec.p_i})", rows, t, partial(_chunks, name, rows, t, batch_size)))
    for name, tokens in given.items():
        t = tokens.shape[1]
        if block is not None and t > block:
            raise FFInterpError(
                f"sequences[{name!r}]: {t} tokens per sequence, more than the model's block_size {block}"
            )
        plan.append((name, "own sequences", len(tokens), t, partial(_given_chunks, tokens, batch_size)))
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
        for name, distribution, rows, t, batches in plan:
            errors, parts = 0, [torch.zeros(2, 0, dtype=torch.int32)]
            start = time.perf_counter()
            chunk = _chunk_rows(batch_size)
            mine = sum(min(chunk, rows - o) for o in dist.shard(range(0, rows, chunk)))
            with tqdm(
                total=mine,
                desc=name if not dist.active else f"{name} (rank 0 of {dist.world_size})",
                unit="seq",
                disable=not (progress and dist.is_main),
                dynamic_ncols=True,
            ) as bar:
                for tokens in batches(part):
                    r, e = count_errors(fast, tokens.to(dev, non_blocking=True))
                    parts.append(torch.stack([r, e]))
                    errors += int(e.sum())
                    bar.update(len(tokens))
                    bar.set_postfix(errors=errors, refresh=False)
                    distributed.check_stop()  # a SIGTERM stops the scan here, between batches
            # Every rank gets every sequence's two counts (a few bytes each): the intervals
            # need the spread over sequences, not just the sums.
            counts = np.concatenate(dist.all_gather(torch.cat(parts, 1).numpy()), axis=1)
            seconds = time.perf_counter() - start  # after the gather: the slowest rank's time
            results.append(_set_result(name, distribution, t, counts, seconds, confidence))
    finally:
        fast.to(home).train(was_training)
    where = str(dev) if not dist.active else f"{dev} x {dist.world_size} ranks"
    return EvalResult(tuple(results), description, where, batch_size)


__all__ = ["EvalResult", "SetResult", "clopper_pearson", "count_errors", "evaluate", "read_rate_interval"]
