"""Shrink a glitch to the smallest form that still fails, so a human can read it.

Causality makes the first step exact: nothing after the failing read can change its
prediction, so the sequence is cut right after it (or, keeping the model's length, every
later instruction becomes an ignore). Then, each in batched delta-debugging rounds that try
chunks of every size at once and keep the largest edit that still fails:

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
from ffinterp.language import ONE, ZERO, I, R, W, last_write_pos, to_text


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
    at = model(tokens.to(device))[:, pos].float().cpu()
    correct = at.gather(1, bit[:, None]).squeeze(1)
    others = at.scatter(1, bit[:, None], float("-inf")).amax(1)
    return correct - others


def _chunks(slots: list[int], max_candidates: int) -> list[list[int]]:
    """Consecutive chunks of ``slots`` at every halving size, coarsest first, within a cap."""
    out: list[list[int]] = []
    n = len(slots)
    size = n
    while size >= 1:
        parts = [slots[k : k + size] for k in range(0, n, size)]
        if len(out) + len(parts) > max_candidates:
            break
        out += parts
        if size == 1:
            break
        size = (size + 1) // 2
    return out


class _Minimizer:
    def __init__(self, model, device, batch_size, max_scored):
        self.model, self.device, self.batch_size, self.max_scored = model, device, batch_size, max_scored
        self.scored = 0

    def margins(self, batch: Tensor, pos: int) -> Tensor:
        out = []
        for lo in range(0, len(batch), self.batch_size):
            out.append(margin_at(self.model, batch[lo : lo + self.batch_size], pos, self.device))
        self.scored += len(batch)
        return torch.cat(out)

    def best_edit(self, x: Tensor, pos: int, chunks: list[list[int]], apply) -> tuple[Tensor, bool]:
        """Apply the largest chunk edit that keeps the read failing (ties: lowest margin)."""
        if not chunks or self.scored >= self.max_scored:
            return x, False
        cands = relabel(torch.stack([apply(x.clone(), c) for c in chunks]))
        m = self.margins(cands, pos)
        ok = (m < 0).nonzero().flatten().tolist()
        if not ok:
            return x, False
        k = min(ok, key=lambda j: (-len(chunks[j]), float(m[j]), j))
        return cands[k], True


def _set_ignore(x: Tensor, slots: list[int]) -> Tensor:
    x[[2 * s for s in slots]] = I
    return x


def _zero_bits(x: Tensor, slots: list[int]) -> Tensor:
    x[[2 * s + 1 for s in slots]] = ZERO
    return x


def minimize(
    model: nn.Module,
    tokens: Int[Tensor, " seq"],
    read_pos: int,
    *,
    shorten: bool = True,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    max_scored: int = 20_000,
) -> Minimized:
    """The minimal failing form of the glitch at ``read_pos`` of ``tokens`` (fast model).

    ``shorten=False`` keeps the model's length (later instructions become ignores); else the
    sequence ends at the read and ignore pairs are deleted while the read still fails.
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
    cap = max(1, batch_size)

    def protected(x: Tensor, pos: int) -> set[int]:
        lw = int(last_write_pos(x[None])[0, pos])
        return {0, lw // 2, pos // 2, len(x) // 2 - 1}

    changed = True
    rounds = 0
    while changed and rounds < 4:
        changed = False
        rounds += 1
        # 1. writes and reads to ignores
        while True:
            keep = protected(x, pos)
            slots = [s for s in range(len(x) // 2) if int(x[2 * s]) != I and s not in keep]
            x, ok = mz.best_edit(x, pos, _chunks(slots, cap), _set_ignore)
            if not ok:
                break
            changed = True
        # 2. delete ignore pairs (chunks of equal size give equal lengths: score per size)
        while shorten and len(x) > 4:
            keep = protected(x, pos)
            slots = [s for s in range(len(x) // 2) if int(x[2 * s]) == I and s not in keep]
            best = None
            for size in sorted({len(c) for c in _chunks(slots, cap)}, reverse=True):
                group = [c for c in _chunks(slots, cap) if len(c) == size and len(x) - 2 * size >= 4]
                if not group or mz.scored >= mz.max_scored:
                    continue
                cands = []
                for c in group:
                    drop = torch.ones(len(x), dtype=torch.bool)
                    for s in c:
                        drop[2 * s : 2 * s + 2] = False
                    cands.append(x[drop])
                cands = relabel(torch.stack(cands))
                new_pos = len(cands[0]) - 2
                m = mz.margins(cands, new_pos)
                ok = (m < 0).nonzero().flatten().tolist()
                if ok:
                    k = min(ok, key=lambda j: (float(m[j]), j))
                    best = (cands[k], new_pos)
                    break
            if best is None:
                break
            x, pos = best
            changed = True
    # 3. canonical bits: ignores' bits to 0 where the read still fails
    while True:
        keep = protected(x, pos)
        slots = [s for s in range(len(x) // 2) if int(x[2 * s]) == I and int(x[2 * s + 1]) == ONE]
        x, ok = mz.best_edit(x, pos, _chunks([s for s in slots if s not in keep], cap), _zero_bits)
        if not ok:
            break
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


__all__ = ["Minimized", "margin_at", "minimize", "W"]
