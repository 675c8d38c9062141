"""Scoring reads from logits: the prediction, p(correct bit) and the margin.

At each read position t the model's next-token logits are compared with the last written
bit. An error is any argmax other than the correct bit token; the margin is
logit(correct) - max over the other four tokens, so an error is a margin below 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ffinterp.language import Reads, reads


@dataclass(frozen=True)
class ReadScores:
    """Per-read scores of a batch (flattened like :class:`~ffinterp.language.Reads`)."""

    reads: Reads
    pred: Int[Tensor, " reads"]
    p_correct: Float[Tensor, " reads"]
    margin: Float[Tensor, " reads"]

    @property
    def error(self) -> Bool[Tensor, " reads"]:
        return self.pred != self.reads.bit

    def __len__(self) -> int:
        return len(self.reads)


def score_logits(logits: Float[Tensor, "batch seq vocab"], rd: Reads) -> ReadScores:
    """Score each read from full-sequence logits."""
    return score_read_logits(logits[rd.batch, rd.pos], rd)


def score_read_logits(at: Float[Tensor, "reads vocab"], rd: Reads) -> ReadScores:
    """Score each read from the logits at the reads alone (``rd``'s order: row-major)."""
    at = at.float()
    correct = at.gather(-1, rd.bit[:, None]).squeeze(-1)
    others = at.scatter(-1, rd.bit[:, None], float("-inf")).amax(-1)
    p_correct = at.softmax(-1).gather(-1, rd.bit[:, None]).squeeze(-1)
    return ReadScores(rd, at.argmax(-1), p_correct, correct - others)


@torch.inference_mode()
def score_tokens(
    forward: Callable[[Tensor], Tensor],
    tokens: Int[Tensor, "batch seq"],
    device: torch.device | str | None = None,
) -> ReadScores:
    """Run ``forward`` (any tokens -> logits callable) on a batch and score its reads (on CPU)."""
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    rd = reads(tokens)
    logits = forward(tokens.to(device) if device is not None else tokens)
    s = score_logits(logits, rd.to(logits.device))
    return ReadScores(rd, s.pred.cpu(), s.p_correct.cpu(), s.margin.cpu())
