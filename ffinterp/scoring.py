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

from ffinterp.language import VOCAB_SIZE, Reads, read_mask, reads

# Activations one forward pass may hold, for entry points handed a whole batch: they run it
# in passes of rows_per_pass rows, so 3,000 x 512 sequences need no more memory than 30.
PASS_MEMORY_MB = 512.0


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


def rows_per_pass(model, seq_len: int, memory_mb: float | None = None) -> int:
    """Rows of length ``seq_len`` that one forward pass of ``model`` may take so that its
    activations stay within ``memory_mb`` (default :data:`PASS_MEMORY_MB`).

    Per token: about ``16 d_model + 3 d_mlp`` floats, plus, for a TransformerLens model (its
    config names ``n_heads``), three ``n_heads x T`` rows of attention scores and pattern.
    The fast GPT's SDPA keeps no T x T scores; an LSTM counts its hidden size as the width;
    a bare callable counts as the paper's model seen through hooks.
    """
    cfg = getattr(model, "cfg", None)  # none (a bare callable): assume the paper's 8 x 512
    width = getattr(cfg, "d_model", None) or getattr(cfg, "n_embd", None) or getattr(cfg, "hidden", 512)
    d_mlp = getattr(cfg, "d_mlp", None)
    d_mlp = d_mlp if isinstance(d_mlp, int) and d_mlp > 0 else 4 * width
    heads = getattr(cfg, "n_heads", 0) if cfg is not None else 8
    per_row = 4 * seq_len * (3 * heads * seq_len + 16 * width + 3 * d_mlp)
    budget = PASS_MEMORY_MB if memory_mb is None else memory_mb
    return max(1, int(budget * 2**20 // per_row))


@torch.inference_mode()
def score_tokens(
    forward: Callable[[Tensor], Tensor],
    tokens: Int[Tensor, "batch seq"],
    device: torch.device | str | None = None,
    batch_size: int | None = None,
) -> ReadScores:
    """Run ``forward`` (any tokens -> logits callable) on a batch and score its reads (on CPU).

    The batch goes through in passes of ``batch_size`` rows (default: :func:`rows_per_pass`
    of ``forward``, which needs its ``cfg``) and only the logits at reads are kept, so memory
    stays bounded however many sequences come in.
    """
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    rd = reads(tokens)
    rows = batch_size or rows_per_pass(forward, tokens.shape[1])
    at = []
    for chunk in tokens.split(max(1, rows)):
        logits = forward(chunk.to(device) if device is not None else chunk)
        at.append(logits[read_mask(chunk).to(logits.device)].float().cpu())
    return score_read_logits(torch.cat(at) if at else torch.empty(0, VOCAB_SIZE), rd)
