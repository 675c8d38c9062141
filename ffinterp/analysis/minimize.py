"""Shrink a glitch to the smallest form that still fails, so a human can read it.

Causality makes the first step exact: nothing after the failing read can change its
prediction, so the sequence is cut right after it (or, keeping the model's length, every
later instruction becomes an ignore). Then, each by delta debugging (all at once, then
halves, quarters ...; the chunks of one granularity scored as one batch), keeping every
edit after which the read still fails:

1. writes and reads become ignores (the first write, the failing read and its last write
   stay, so the minimal form is the same glitch: same read, same expected bit);
2. ignore pairs are deleted (``shorten``), which moves the read to a smaller position;
3. ignore bits become ``0`` (a canonical form: only bits that matter stay ``1``).

All candidates are scored on the fast model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from ffinterp.analysis.search import relabel
from ffinterp.language import ONE, ZERO, I, R, last_write_pos, to_text
from ffinterp.scoring import rows_per_pass


@dataclass(frozen=True)
class Minimized:
    """The minimal failing form of a glitch, beside what it cost to find."""

    text: str
    read_pos: int
    length: int
    active: int  # non-ignore instructions (writes and reads), the first write included
    margin: float
    scored: int  # sequences scored on the fast model while minimising

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def margin_at(
    model: nn.Module, tokens: Int[Tensor, "batch seq"], pos: int, device: torch.device | str = "cpu"
) -> Float[Tensor, " batch"]:
    """Margin of each row's read at ``pos`` (logit of the last written bit minus the best other)."""
    bit = tokens[torch.arange(len(tokens)), last_write_pos(tokens)[:, pos] + 1]
    passes = tokens.split(rows_per_pass(model, tokens.shape[1]))  # bounded memory for any batch
    at = torch.cat([model(c.to(device))[:, pos].float().cpu() for c in passes])
    correct = at.gather(1, bit[:, None]).squeeze(1)
    others = at.scatter(1, bit[:, None], float("-inf")).amax(1)
    return correct - others


class _Minimizer:
    """Scores candidates on the fast model and runs delta debugging (Zeller's ddmin) with
    each granularity's chunks scored as one batch."""

    def __init__(self, model, device, batch_size, max_scored):
        self.model, self.device, self.batch_size, self.max_scored = model, device, batch_size, max_scored
        self.scored = 0

    def margins(self, batch: Tensor, pos: int) -> Tensor:
        out = []
        for lo in range(0, len(batch), self.batch_size):
            out.append(margin_at(self.model, batch[lo : lo + self.batch_size], pos, self.device))
        self.scored += len(batch)
        return torch.cat(out)

    def ddmin(self, x: Tensor, pos: int, slots_of, apply) -> tuple[Tensor, int, bool]:
        """Remove chunks of ``slots_of(x, pos)`` with ``apply(x, pos, chunk) -> (x, pos)`` while
        the read still fails: all at once first, then halves, quarters ... (after a success
        the granularity steps back). Candidates of one length are scored in one batch."""
        changed = False
        gran = 1
        while self.scored < self.max_scored:
            slots = slots_of(x, pos)
            if not slots:
                break
            gran = min(gran, len(slots))
            size = -(-len(slots) // gran)
            chunks = [slots[k : k + size] for k in range(0, len(slots), size)]
            groups: dict[tuple[int, int], list[tuple[Tensor, list[int]]]] = {}
            for c in chunks:
                y, p = apply(x.clone(), pos, c)
                groups.setdefault((len(y), p), []).append((relabel(y[None])[0], c))
            best = None
            for (_, p), items in groups.items():
                m = self.margins(torch.stack([y for y, _ in items]), p)
                for (y, c), mj in zip(items, m.tolist()):
                    if mj < 0 and (best is None or (-len(c), mj) < (-len(best[2]), best[3])):
                        best = (y, p, c, mj)
            if best is not None:
                x, pos, changed = best[0], best[1], True
                gran = max(1, gran - 1)
            elif size == 1:
                break
            else:
                gran = min(2 * gran, len(slots))
        return x, pos, changed


def _set_ignore(x: Tensor, pos: int, slots: list[int]) -> tuple[Tensor, int]:
    x[[2 * s for s in slots]] = I
    return x, pos


def _zero_bits(x: Tensor, pos: int, slots: list[int]) -> tuple[Tensor, int]:
    x[[2 * s + 1 for s in slots]] = ZERO
    return x, pos


def _delete_pairs(x: Tensor, pos: int, slots: list[int]) -> tuple[Tensor, int]:
    keep = torch.ones(len(x), dtype=torch.bool)
    for s in slots:
        keep[2 * s : 2 * s + 2] = False
    return x[keep], pos - 2 * sum(1 for s in slots if 2 * s < pos)


def _protected(x: Tensor, pos: int) -> set[int]:
    """Slots that stay: the opening write, the read's last write, the read, the final read."""
    lw = int(last_write_pos(x[None])[0, pos])
    return {0, lw // 2, pos // 2, len(x) // 2 - 1}


def _active(x: Tensor, pos: int) -> list[int]:
    keep = _protected(x, pos)
    return [s for s in range(len(x) // 2) if int(x[2 * s]) != I and s not in keep]


def _ignores(x: Tensor, pos: int) -> list[int]:
    keep = _protected(x, pos)
    return [s for s in range(len(x) // 2) if int(x[2 * s]) == I and s not in keep]


def _ignores_with_one(x: Tensor, pos: int) -> list[int]:
    return [s for s in _ignores(x, pos) if int(x[2 * s + 1]) == ONE]


def minimize(
    model: nn.Module,
    tokens: Int[Tensor, " seq"],
    read_pos: int,
    *,
    shorten: bool = True,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    max_scored: int = 4_000,
) -> Minimized:
    """The minimal failing form of the glitch at ``read_pos`` of ``tokens`` (fast model).

    ``shorten=False`` keeps the model's length (later instructions become ignores); else the
    sequence ends at the read and ignore pairs are deleted while the read still fails.
    ``max_scored`` caps the sequences scored (the result is then smaller, not minimal).
    """
    mz = _Minimizer(model, torch.device(device), batch_size, max_scored)
    x = torch.as_tensor(tokens).clone().long()
    pos = int(read_pos)
    if shorten:
        x = x[: pos + 2].clone()
    else:
        x[pos + 2 : -2 : 2] = I
        x[pos + 3 : -1 : 2] = ZERO
        x[-2] = R
        x = relabel(x[None])[0]
    for _ in range(3):  # deleting pairs can make more instructions removable, and back
        x, pos, a = mz.ddmin(x, pos, _active, _set_ignore)
        c = False
        if shorten and len(x) > 4:
            x, pos, c = mz.ddmin(x, pos, _ignores, _delete_pairs)
        if not (a or c):
            break
    x, pos, _ = mz.ddmin(x, pos, _ignores_with_one, _zero_bits)
    margin = float(mz.margins(x[None], pos)[0])
    instr = x[0::2]
    return Minimized(
        text=str(to_text(x)),
        read_pos=pos,
        length=len(x),
        active=int((instr != I).sum()),
        margin=margin,
        scored=mz.scored,
    )


__all__ = ["Minimized", "margin_at", "minimize"]
