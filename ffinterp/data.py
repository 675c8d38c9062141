"""Standard evaluation sets, batching, and local copies of the synthseq/flipflop dataset.

The three evaluation sets of the paper are regenerated from fixed seeds instead of being
downloaded: the same name, size and length give the same tokens everywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor

from ffinterp.language import FFLError, Mix, from_text, sample, to_text, validate


@dataclass(frozen=True)
class EvalSet:
    """One of the paper's evaluation distributions, with its default size and seed."""

    name: str
    p_i: float
    size: int
    seed: int
    description: str

    @property
    def mix(self) -> Mix:
        return Mix.ffl(self.p_i)


# Sizes follow the public dataset's splits (val, val_sparse, val_dense).
STANDARD_SETS: dict[str, EvalSet] = {
    "in": EvalSet("in", 0.8, 16_000, 1_000_001, "in-distribution FFL(0.8)"),
    "sparse": EvalSet("sparse", 0.98, 160_000, 1_000_002, "sparse FFL(0.98): long gaps"),
    "dense": EvalSet("dense", 0.1, 4_000, 1_000_003, "dense FFL(0.1): many writes and reads"),
}


def eval_set_spec(name: str) -> EvalSet:
    try:
        return STANDARD_SETS[name]
    except KeyError:
        known = ", ".join(STANDARD_SETS)
        raise FFLError(f"unknown evaluation set {name!r} (known: {known})") from None


def eval_set(name: str, n: int | None = None, seq_len: int = 512) -> Int[Tensor, "n seq"]:
    """The first ``n`` sequences (default: the full size) of a standard evaluation set."""
    spec = eval_set_spec(name)
    return sample(spec.size if n is None else n, seq_len, mix=spec.mix, seed=spec.seed)


def iter_batches(
    n: int,
    batch_size: int,
    seq_len: int = 512,
    *,
    mix: Mix,
    seed: int,
    start: int = 0,
    part: tuple[int, int] = (0, 1),
) -> Iterator[tuple[int, Int[Tensor, "batch seq"]]]:
    """Stream rows ``start .. n`` of a seeded stream as (offset, batch), never all at once.

    ``part=(k, parts)`` keeps batches ``k, k + parts, ...`` only: a distributed rank's
    disjoint share of the same stream (the union over ``k`` is the whole stream).
    """
    k, parts = part
    for offset in range(start, n, batch_size)[k::parts]:
        yield offset, sample(min(batch_size, n - offset), seq_len, mix=mix, seed=seed, offset=offset)


def iter_eval_set(
    name: str,
    n: int | None = None,
    seq_len: int = 512,
    batch_size: int = 256,
    part: tuple[int, int] = (0, 1),
) -> Iterator[tuple[int, Int[Tensor, "batch seq"]]]:
    """Stream a standard evaluation set in batches (the sparse set is 80M tokens); ``part``
    as in :func:`iter_batches`."""
    spec = eval_set_spec(name)
    size = spec.size if n is None else n
    yield from iter_batches(size, batch_size, seq_len, mix=spec.mix, seed=spec.seed, part=part)


# ---------------------------------------------------------------- files


def read_sequences(path: str | os.PathLike, *, labelled: bool = True) -> Int[Tensor, "n seq"]:
    """Read a local copy of synthseq/flipflop (parquet, jsonl with ``text``, or plain lines).

    Every sequence is validated; an error names the file, the line and the position.
    """
    path = Path(path)
    if not path.exists():
        raise FFLError(f"{path}: no such file")
    if path.is_dir():
        raise FFLError(f"{path}: is a folder, expected a file of sequences")
    try:
        texts = list(_read_texts(path))
    except OSError as e:
        raise FFLError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    if not texts:
        raise FFLError(f"{path}: no sequences found")
    for line, text in texts:
        validate(text, labelled=labelled, where=f"{path}:{line}: ")
    lengths = {len(t) for _, t in texts}
    if len(lengths) > 1:
        raise FFLError(f"{path}: sequences have different lengths {sorted(lengths)[:5]}")
    return from_text([t for _, t in texts])


def _text_field(path: Path, k: int, value, what: str) -> str:
    """A record's sequence, which must be a string (``str(None)`` would read as 'None')."""
    if not isinstance(value, str):
        raise FFLError(f"{path}:{k}: {what} must be a string, got {type(value).__name__}")
    return value


def _read_texts(path: Path) -> Iterator[tuple[int, str]]:
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise FFLError(f"{path}: not a readable parquet file (truncated or corrupt?): {first}") from None
        if "text" not in table.column_names:
            raise FFLError(f"{path}: parquet file has no 'text' column ({table.column_names})")
        for k, text in enumerate(table.column("text").to_pylist(), start=1):
            yield k, _text_field(path, k, text, "'text'")
        return
    # Lines are decoded one by one, so a bad byte is reported on its own line; a byte-order
    # mark (as Windows editors write) is not part of the first sequence.
    with open(path, "rb") as f:
        for k, data in enumerate(f, start=1):
            try:
                raw = data.decode("utf-8-sig" if k == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise FFLError(
                    f"{path}:{k}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at column {e.start + 1})"
                ) from None
            raw = raw.strip()
            if not raw:
                continue
            if raw.startswith("{"):
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise FFLError(f"{path}:{k}: invalid JSON ({e.msg})") from None
                except RecursionError:
                    raise FFLError(f"{path}:{k}: invalid JSON (nested too deeply)") from None
                if "text" not in record:
                    raise FFLError(f"{path}:{k}: JSON line has no 'text' field")
                yield k, _text_field(path, k, record["text"], "the 'text' field")
            else:
                yield k, raw


def write_sequences(tokens: Int[Tensor, "n seq"], path: str | os.PathLike, fmt: str | None = None) -> None:
    """Write sequences as text lines, jsonl (``{"text": ...}``) or parquet, atomically."""
    path = Path(path)
    fmt = fmt or {".jsonl": "jsonl", ".parquet": "parquet"}.get(path.suffix, "text")
    texts = to_text(tokens)
    texts = [texts] if isinstance(texts, str) else texts
    tmp = path.with_name(path.name + ".tmp")
    if path.is_dir():
        raise FFLError(f"{path}: is a folder, expected a file to write")
    try:
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"text": texts}), tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for text in texts:
                    f.write((json.dumps({"text": text}) if fmt == "jsonl" else text) + "\n")
        os.replace(tmp, path)
    except OSError as e:  # a missing folder, no permission, a full disk: say so, leave nothing behind
        raise FFLError(f"{path}: cannot write ({e.strerror or type(e).__name__})") from None
    finally:
        with contextlib.suppress(OSError):  # below a file, unlink fails too: nothing was written
            tmp.unlink(missing_ok=True)


def format_sequences(tokens: Int[Tensor, "n seq"], fmt: str = "text") -> str:
    """Sequences as the text or jsonl lines that :func:`write_sequences` writes."""
    texts = to_text(tokens)
    texts = [texts] if isinstance(texts, str) else texts
    return "".join((json.dumps({"text": t}) if fmt == "jsonl" else t) + "\n" for t in texts)


def as_tokens(seq: str | Tensor) -> Int[Tensor, "batch seq"]:
    """Accept text, a list of texts, or tokens, and return a validated 2-D token batch."""
    tokens = from_text(seq) if isinstance(seq, (str, list, tuple)) else torch.as_tensor(seq)
    if tokens.ndim == 1:
        tokens = tokens[None]
    for k, row in enumerate(tokens):
        validate(row, labelled=False, where=f"sequence {k}: " if len(tokens) > 1 else "")
    return tokens.long()
