"""Clean/corrupted pairs of flip-flop sequences: the inputs of every causal patching routine.

Patching compares two runs whose inputs differ in one controlled way. Each constructor
keeps the token length and the read positions of the clean sequence, so every activation
lines up position by position, and relabels the read bits of the corrupted sequence so it
stays a valid, labelled FFL sequence: the model sees no contradiction, only a different
history.

The chosen read (``read``: the K-th read, negative counts from the end) is scored. By
default it is the last read for which the corruption changes the correct bit, so the
normalised logit difference is well defined (clean = 1, corrupted = 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from ffinterp.errors import FFInterpError
from ffinterp.language import ONE, ZERO, I, W, from_text, last_write_pos, read_mask, to_text, validate
from ffinterp.text import count


def check_read(read: int, rps: list[int]) -> None:
    """Refuse a read index (negative from the end) that the read positions ``rps`` lack."""
    if not -len(rps) <= read < len(rps):
        raise FFInterpError(
            f"read={read} is out of range: the sequence has {count(len(rps), 'read')}",
            flags={"read=": "--read "},
        )


CORRUPTIONS = ("flip-last-write", "ignore-last-write", "move-last-write")


@dataclass(frozen=True)
class Pair:
    """A clean and a corrupted sequence of one length, with one read scored in both.

    ``read_pos`` is the position of the scored ``r`` token; ``clean_bit`` and
    ``corrupted_bit`` (token 3 or 4) are the correct answers there. ``write_pos`` and
    ``corrupted_write_pos`` are the positions of the last write's ``w`` before that read.
    """

    clean: Int[Tensor, " seq"]
    corrupted: Int[Tensor, " seq"]
    read_pos: int
    clean_bit: int
    corrupted_bit: int
    write_pos: int
    corrupted_write_pos: int
    kind: str = "custom"

    @property
    def seq_len(self) -> int:
        return int(self.clean.numel())

    @property
    def other_bit(self) -> int:
        """The bit token that is wrong on the clean sequence."""
        return ZERO + ONE - self.clean_bit

    @property
    def answer_changes(self) -> bool:
        return self.clean_bit != self.corrupted_bit

    @property
    def first_diff(self) -> int:
        """The first position where the sequences differ (``seq_len`` if identical).

        Every activation at earlier positions is identical in both runs (the model is
        causal), which lets the patching sweeps skip those sites exactly.
        """
        diff = (self.clean != self.corrupted).nonzero()
        return int(diff[0]) if diff.numel() else self.seq_len

    @property
    def clean_text(self) -> str:
        return to_text(self.clean)

    @property
    def corrupted_text(self) -> str:
        return to_text(self.corrupted)

    def tokens(self) -> Int[Tensor, "2 seq"]:
        """``[clean, corrupted]`` as one batch."""
        return torch.stack([self.clean, self.corrupted])

    def describe(self) -> str:
        bit = {ZERO: "0", ONE: "1"}
        return (
            f"{self.kind}: read at {self.read_pos}, clean answer {bit[self.clean_bit]} (last write at "
            f"{self.write_pos}), corrupted answer {bit[self.corrupted_bit]} (last write at "
            f"{self.corrupted_write_pos}), first difference at {self.first_diff}"
        )


# ---------------------------------------------------------------- helpers


def relabel(tokens: Int[Tensor, "*batch seq"]) -> Int[Tensor, "*batch seq"]:
    """A copy whose every read bit repeats the last write's bit (the language's rule)."""
    out = torch.as_tensor(tokens).clone()
    flat = out.view(-1, out.shape[-1])
    lw = last_write_pos(flat)
    b, p = read_mask(flat).nonzero(as_tuple=True)
    wp = lw[b, p]
    if (wp < 0).any():
        raise FFInterpError(f"read at position {int(p[wp < 0][0])} comes before any write")
    flat[b, p + 1] = flat[b, wp + 1]
    return out


def _as_seq(seq: str | Tensor, where: str = "") -> Int[Tensor, " seq"]:
    tokens = from_text(seq) if isinstance(seq, str) else torch.as_tensor(seq).cpu().long()
    if tokens.ndim == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.ndim != 1:
        raise FFInterpError(f"{where}expected one sequence, got shape {tuple(tokens.shape)}")
    validate(tokens, labelled=True, where=where)
    return tokens


def read_positions(seq: Int[Tensor, " seq"]) -> list[int]:
    """Positions of the ``r`` tokens, in order."""
    return read_mask(seq[None])[0].nonzero().flatten().tolist()


def _pick_read(seq: Tensor, read: int | None, builder, require_change: bool, kind: str) -> Pair:
    """Build the pair for the chosen read, or for the last read where the answer changes."""
    rps = read_positions(seq)
    if read is not None:
        check_read(read, rps)
        pair = builder(rps[read])
        if require_change and not pair.answer_changes:
            raise FFInterpError(
                f"{kind}: the answer at read {read} (position {rps[read]}) does not change; "
                "choose another read"
            )
        return pair
    why = "no read"
    for p in reversed(rps):
        try:
            pair = builder(p)
        except FFInterpError as e:
            why = str(e)
            continue
        if pair.answer_changes or not require_change:
            return pair
        why = f"the answer at position {p} does not change"
    raise FFInterpError(f"{kind}: no read of this sequence gives an informative pair ({why})")


def _make(clean: Tensor, corrupted: Tensor, p: int, kind: str) -> Pair:
    corrupted = relabel(corrupted)
    validate(corrupted, labelled=True, where=f"{kind}: corrupted sequence: ")
    lw_c = int(last_write_pos(clean[None])[0, p])
    lw_x = int(last_write_pos(corrupted[None])[0, p])
    return Pair(
        clean=clean,
        corrupted=corrupted,
        read_pos=p,
        clean_bit=int(clean[lw_c + 1]),
        corrupted_bit=int(corrupted[lw_x + 1]),
        write_pos=lw_c,
        corrupted_write_pos=lw_x,
        kind=kind,
    )


# ---------------------------------------------------------------- constructors


def flip_last_write(
    seq: str | Int[Tensor, " seq"], read: int | None = None, *, require_change: bool = True
) -> Pair:
    """Flip the bit of the last write before the read: the answer flips, nothing else moves."""
    clean = _as_seq(seq, "clean sequence: ")

    def build(p: int) -> Pair:
        wp = int(last_write_pos(clean[None])[0, p])
        cor = clean.clone()
        cor[wp + 1] = ZERO + ONE - int(clean[wp + 1])
        return _make(clean, cor, p, "flip-last-write")

    return _pick_read(clean, read, build, require_change, "flip-last-write")


def ignore_last_write(
    seq: str | Int[Tensor, " seq"], read: int | None = None, *, require_change: bool = True
) -> Pair:
    """Turn the last write into an ignore: the answer comes from the previous write.

    Probes whether the model tells ``w`` from ``i`` (the instruction, not the bit, moves).
    """
    clean = _as_seq(seq, "clean sequence: ")

    def build(p: int) -> Pair:
        wp = int(last_write_pos(clean[None])[0, p])
        if wp == 0 or int(last_write_pos(clean[None])[0, wp - 1]) < 0:
            raise FFInterpError(
                f"ignore-last-write: the read at position {p} has no earlier write to fall back to "
                f"(its last write is at {wp})"
            )
        cor = clean.clone()
        cor[wp] = I
        return _make(clean, cor, p, "ignore-last-write")

    return _pick_read(clean, read, build, require_change, "ignore-last-write")


def move_last_write(
    seq: str | Int[Tensor, " seq"],
    read: int | None = None,
    *,
    to: int | None = None,
    require_change: bool = True,
) -> Pair:
    """Move the last write (its ``w`` and bit) earlier, to the ignore slot at ``to``.

    Its old slot becomes an ignore with the same bit, so the tokens are a permutation of the
    clean ones apart from the relabelled read bits. By default ``to`` is the latest ignore
    slot before the previous write: the previous write becomes the last one, so the answer
    changes (when the two bits differ) while the content of the writes stays the same, which
    probes recency (positional tie-breaking) rather than content. With ``to`` between the
    previous write and the read the answer stays; pass ``require_change=False`` for that.
    """
    clean = _as_seq(seq, "clean sequence: ")
    n = clean.numel()

    def build(p: int) -> Pair:
        lw = last_write_pos(clean[None])[0]
        wp = int(lw[p])
        target = to
        if target is None:
            prev = int(lw[wp - 1]) if wp > 0 else -1
            if prev < 0:
                raise FFInterpError(
                    f"move-last-write: the read at position {p} has only one write before it (at {wp})"
                )
            slots = [s for s in range(0, prev, 2) if int(clean[s]) == I]
            if not slots:
                raise FFInterpError(
                    f"move-last-write: no ignore slot before the previous write (at {prev}) to move to"
                )
            target = slots[-1]
        if not 0 <= target < n or target % 2:
            raise FFInterpError(f"move-last-write: to={target} is not an instruction slot (even, < {n})")
        if target >= wp:
            raise FFInterpError(
                f"move-last-write: to={target} is not before the last write (at {wp}) of the read at {p}",
            )
        if int(clean[target]) != I:
            raise FFInterpError(
                f"move-last-write: position {target} holds {to_text(clean[target : target + 1])!r}, "
                "not an ignore 'i'; only ignores can take the write (writes and reads stay)"
            )
        cor = clean.clone()
        cor[target], cor[target + 1] = W, clean[wp + 1]
        cor[wp] = I
        return _make(clean, cor, p, "move-last-write")

    return _pick_read(clean, read, build, require_change, "move-last-write")


def custom_pair(
    clean: str | Int[Tensor, " seq"],
    corrupted: str | Int[Tensor, " seq"],
    read: int | None = None,
    *,
    require_change: bool = False,
) -> Pair:
    """A pair from two valid labelled sequences of one length with the same read positions."""
    c = _as_seq(clean, "clean sequence: ")
    x = _as_seq(corrupted, "corrupted sequence: ")
    if c.numel() != x.numel():
        raise FFInterpError(f"clean and corrupted lengths differ: {c.numel()} vs {x.numel()}")
    rc, rx = read_positions(c), read_positions(x)
    if rc != rx:
        k = next((a for a, b in zip(rc, rx) if a != b), min(rc[-1], rx[-1]))
        raise FFInterpError(f"clean and corrupted reads differ (first at position {k}); reads must line up")
    return _pick_read(c, read, lambda p: _make(c, x, p, "custom"), require_change, "custom")


def make_pair(
    seq: str | Int[Tensor, " seq"],
    corruption: str,
    read: int | None = None,
    **kwargs,
) -> Pair:
    """A pair by the corruption's name (the CLI's ``--corrupt``)."""
    builders = {
        "flip-last-write": flip_last_write,
        "ignore-last-write": ignore_last_write,
        "move-last-write": move_last_write,
    }
    if corruption not in builders:
        raise FFInterpError(f"unknown corruption {corruption!r} (known: {', '.join(CORRUPTIONS)})")
    return builders[corruption](seq, read, **kwargs)
