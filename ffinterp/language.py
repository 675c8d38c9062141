"""The flip-flop language: vocabulary, seeded sampling, text I/O, validation, read targets.

Pure tensor code with no model in it. Token ids follow the public ``synthseq/flipflop``
dataset: ``w``=0, ``r``=1, ``i``=2, ``0``=3, ``1``=4. A sequence of T tokens is T/2
instruction-bit pairs; it starts with a write and ends with a read, and the bit after a
read repeats the bit of the most recent write.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from ffinterp.errors import FFInterpError

W, R, I, ZERO, ONE = 0, 1, 2, 3, 4
VOCAB = ("w", "r", "i", "0", "1")
VOCAB_SIZE = len(VOCAB)
INSTRUCTIONS = (W, R, I)
BITS = (ZERO, ONE)
CHAR_TO_ID = {c: k for k, c in enumerate(VOCAB)}

# Rows are generated in fixed blocks, each with its own seed derived from (seed, block),
# so any slice of the stream (a worker thread's, a distributed rank's, a resumed run's)
# is the same whoever generates it.
BLOCK_ROWS = 1024

_LOOKUP = np.full(256, 255, dtype=np.uint8)
for _k, _c in enumerate(VOCAB):
    _LOOKUP[ord(_c)] = _k
_CHARS = np.frombuffer("".join(VOCAB).encode(), dtype=np.uint8)


class FFLError(FFInterpError):
    """A sequence or argument that breaks the flip-flop language; the message is one line."""


@dataclass(frozen=True)
class Mix:
    """Instruction probabilities (p_w, p_r, p_i) of FFL, normalised and checked."""

    p_w: float
    p_r: float
    p_i: float

    @classmethod
    def ffl(cls, p_i: float) -> Mix:
        """FFL(p_i): writes and reads share the remaining mass equally."""
        if not 0.0 <= p_i < 1.0:
            raise FFLError(f"p_i must lie in [0, 1), got {p_i}")
        return cls((1 - p_i) / 2, (1 - p_i) / 2, p_i)

    def __post_init__(self) -> None:
        probs = (self.p_w, self.p_r, self.p_i)
        if any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
            raise FFLError(f"(p_w, p_r, p_i) must be non-negative and sum to 1, got {probs}")


def _sample_block(seed: int, block: int, rows: int, seq_len: int, mix: Mix) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, block])))
    pairs = seq_len // 2
    # Instructions by thresholding uniform 32-bit integers (exact to 2**-32):
    # below t_w is a write (0), below t_wr a read (1), else an ignore (2).
    u = rng.integers(0, 2**32, size=(rows, pairs), dtype=np.uint32)
    t_w = np.uint32(min(int(mix.p_w * 2**32), 2**32 - 1))
    t_wr = np.uint32(min(int((mix.p_w + mix.p_r) * 2**32), 2**32 - 1))
    instr = (u >= t_w).view(np.uint8) + (u >= t_wr).view(np.uint8)
    instr[:, 0] = W
    instr[:, -1] = R
    nbytes = (rows * pairs + 7) // 8
    bits = np.unpackbits(np.frombuffer(rng.bytes(nbytes), dtype=np.uint8))
    bits = bits[: rows * pairs].reshape(rows, pairs)
    # Forward-fill each write's (2 * slot + bit) with a running max; its low bit is then
    # the most recent write's bit, which every read repeats.
    dtype = np.int16 if pairs < 2**14 else np.int32
    stamp = np.arange(pairs, dtype=dtype) * 2
    last = np.where(instr == W, stamp + bits, dtype(0))
    np.maximum.accumulate(last, axis=1, out=last)
    bits = np.where(instr == R, (last & 1).astype(np.uint8), bits)
    out = np.empty((rows, seq_len), dtype=np.uint8)
    out[:, 0::2] = instr
    out[:, 1::2] = bits + ZERO
    return out


def sample(
    n: int,
    seq_len: int = 512,
    p_i: float = 0.8,
    *,
    mix: Mix | tuple[float, float, float] | None = None,
    seed: int = 0,
    offset: int = 0,
    threads: int | None = None,
) -> Int[Tensor, "n seq"]:
    """Rows ``offset .. offset+n`` of the seeded FFL stream, as int64 tokens.

    ``mix`` overrides ``p_i`` with explicit (p_w, p_r, p_i). The stream depends only on
    (seed, seq_len, mix), never on thread count or machine, so slices can be generated
    independently and concatenated.
    """
    if seq_len < 4 or seq_len % 2:
        raise FFLError(f"seq_len must be an even number >= 4 (a write and a read), got {seq_len}")
    if n < 0 or offset < 0:
        raise FFLError(f"n and offset must be non-negative, got n={n}, offset={offset}")
    if seed < 0:
        raise FFLError(f"seed must be a non-negative integer, got {seed}")
    if mix is None:
        mix = Mix.ffl(p_i)
    elif not isinstance(mix, Mix):
        mix = Mix(*mix)
    first, last = offset // BLOCK_ROWS, (offset + n - 1) // BLOCK_ROWS
    blocks = range(first, last + 1) if n else range(0)

    out = torch.empty((n, seq_len), dtype=torch.long)

    def fill(block: int) -> None:
        # Each block writes its own rows of the output: no concatenation pass.
        lo = max(offset, block * BLOCK_ROWS)
        hi = min(offset + n, (block + 1) * BLOCK_ROWS)
        arr = _sample_block(seed, block, BLOCK_ROWS, seq_len, mix)
        start = lo - block * BLOCK_ROWS
        out[lo - offset : hi - offset] = torch.from_numpy(arr[start : start + hi - lo])

    workers = threads or min(len(blocks), os.cpu_count() or 1) or 1
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fill, blocks))
    else:
        for b in blocks:
            fill(b)
    return out


# ---------------------------------------------------------------- text


def to_text(tokens: Int[Tensor, "*batch seq"]) -> str | list[str]:
    """Tokens to the dataset's text (``'w1i0r1'``); a batch gives a list of strings."""
    arr = torch.as_tensor(tokens).cpu().numpy()
    if arr.size and (arr.min() < 0 or arr.max() >= VOCAB_SIZE):
        raise FFLError(f"token ids must lie in 0..{VOCAB_SIZE - 1}")
    chars = _CHARS[arr]
    if arr.ndim == 1:
        return chars.tobytes().decode()
    return [row.tobytes().decode() for row in chars]


def from_text(text: str | list[str] | tuple[str, ...]) -> Int[Tensor, "*batch seq"]:
    """The dataset's text to token ids; a list gives a batch (all the same length).

    Only the characters are checked here; use :func:`validate` for the grammar.
    """
    if isinstance(text, str):
        return torch.from_numpy(_encode(text.strip(), where="")).long()
    rows = [_encode(t.strip(), where=f"sequence {k}: ") for k, t in enumerate(text)]
    lengths = {len(r) for r in rows}
    if len(lengths) > 1:
        raise FFLError(f"sequences in a batch must share one length, got {sorted(lengths)}")
    if not rows:
        return torch.empty((0, 0), dtype=torch.long)
    return torch.from_numpy(np.stack(rows)).long()


def _encode(text: str, where: str) -> np.ndarray:
    raw = np.frombuffer(text.encode("utf-8", "replace"), dtype=np.uint8)
    ids = _LOOKUP[raw]
    bad = np.flatnonzero(ids == 255)
    if bad.size or len(raw) != len(text):
        pos = int(bad[0]) if bad.size else next(k for k, c in enumerate(text) if c not in VOCAB)
        raise FFLError(f"{where}position {pos}: unknown character {text[pos]!r} (expected one of w r i 0 1)")
    return ids


# ---------------------------------------------------------------- validation


def validate(seq: str | Int[Tensor, " seq"], *, labelled: bool = True, where: str = "") -> None:
    """Raise :class:`FFLError` naming the first position and rule broken, if any.

    ``labelled`` also checks that every read's bit equals the last written bit.
    """
    if isinstance(seq, str):
        arr = _encode(seq.strip(), where=where)
    else:
        arr = torch.as_tensor(seq).cpu().numpy()
        if arr.ndim != 1:
            raise FFLError(f"{where}expected one sequence, got shape {tuple(arr.shape)}")
        bad = np.flatnonzero((arr < 0) | (arr >= VOCAB_SIZE))
        if bad.size:
            p = int(bad[0])
            raise FFLError(f"{where}position {p}: unknown token id {int(arr[p])}")
    if len(arr) == 0:
        raise FFLError(f"{where}empty sequence")
    # The first structural problem in reading order: a bit where an instruction belongs,
    # or an instruction where a bit belongs.
    slot_is_bit = (np.arange(len(arr)) % 2).astype(bool)
    bad = np.flatnonzero(slot_is_bit != (arr >= ZERO))
    if bad.size:
        p = int(bad[0])
        if slot_is_bit[p]:
            raise FFLError(
                f"{where}position {p}: missing bit after {VOCAB[arr[p - 1]]!r} (got {VOCAB[arr[p]]!r})"
            )
        raise FFLError(f"{where}position {p}: expected an instruction (w r i), got bit {VOCAB[arr[p]]!r}")
    if len(arr) % 2:
        raise FFLError(f"{where}odd length {len(arr)}: every instruction needs its bit")
    instr, bits = arr[0::2], arr[1::2]
    if instr[0] != W:
        raise FFLError(f"{where}position 0: must start with a write 'w', got {VOCAB[instr[0]]!r}")
    if instr[-1] != R:
        raise FFLError(f"{where}position {len(arr) - 2}: must end with a read 'r', got {VOCAB[instr[-1]]!r}")
    if labelled:
        idx = np.where(instr == W, np.arange(len(instr)), 0)
        np.maximum.accumulate(idx, out=idx)
        wrong = np.flatnonzero((instr == R) & (bits != bits[idx]))
        if wrong.size:
            k = int(wrong[0])
            raise FFLError(
                f"{where}position {2 * k + 1}: read bit {VOCAB[bits[k]]!r} contradicts the last "
                f"write {VOCAB[bits[idx[k]]]!r} at position {2 * int(idx[k])}"
            )


def validate_batch(tokens: Int[Tensor, "batch seq"], *, labelled: bool = True) -> None:
    """Validate every row, naming the first bad sequence."""
    for k, row in enumerate(torch.as_tensor(tokens)):
        validate(row, labelled=labelled, where=f"sequence {k}: ")


# ---------------------------------------------------------------- read targets


@dataclass(frozen=True)
class Reads:
    """Every read in a batch, flattened: the unit every score and analysis works on.

    For read k in row ``batch[k]``: the ``r`` token sits at ``pos[k]``, and the model's
    prediction at ``pos[k]`` is scored against ``bit[k]`` (token 3 or 4). The last write's
    ``w`` token sits at ``write_pos[k]`` and its bit at ``write_pos[k] + 1``.
    """

    batch: Int[Tensor, " reads"]
    pos: Int[Tensor, " reads"]
    bit: Int[Tensor, " reads"]
    write_pos: Int[Tensor, " reads"]

    def __len__(self) -> int:
        return int(self.pos.numel())

    @property
    def gap(self) -> Int[Tensor, " reads"]:
        """Distance in tokens from the last write's ``w`` to the read's ``r``."""
        return self.pos - self.write_pos

    def to(self, device: torch.device | str) -> Reads:
        return Reads(*(t.to(device) for t in (self.batch, self.pos, self.bit, self.write_pos)))


def last_write_pos(tokens: Int[Tensor, "batch seq"]) -> Int[Tensor, "batch seq"]:
    """Position of the most recent ``w`` token at or before each position (-1 if none)."""
    seq = tokens.shape[-1]
    ar = torch.arange(seq, device=tokens.device).expand_as(tokens)
    marked = torch.where(tokens == W, ar, torch.full_like(ar, -1))
    # The token before a bit is its instruction; restrict to instruction slots so a
    # bit token equal to 0 never counts (ids are disjoint, but keep intent explicit).
    return torch.cummax(marked, dim=-1).values


def read_mask(tokens: Int[Tensor, "batch seq"]) -> Bool[Tensor, "batch seq"]:
    """True at instruction slots that hold a read (the positions that are scored)."""
    mask = tokens == R
    mask[..., 1::2] = False
    return mask


def reads(tokens: Int[Tensor, "batch seq"]) -> Reads:
    """All reads of a batch with their correct bit and the position of their last write.

    The correct bit is the last write's bit (the language's rule), so it is right even for
    an unlabelled sequence whose read bits are placeholders.
    """
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    lw = last_write_pos(tokens)
    b, p = read_mask(tokens).nonzero(as_tuple=True)
    wp = lw[b, p]
    if (wp < 0).any():
        k = int((wp < 0).nonzero()[0])
        raise FFLError(f"sequence {int(b[k])}: position {int(p[k])}: read before any write")
    bit = tokens[b, wp + 1]
    return Reads(batch=b, pos=p, bit=bit, write_pos=wp)
