"""A hand-built flip-flop circuit: ground truth for attention, patching and glitch finding.

An attention-only GPT (no LayerNorm, no MLP) whose weights are set analytically, so it
loads into the same fast and hooked views as a trained model and every number it produces
can be derived on paper. Two layers of two heads on an 8-dimensional residual stream::

    dim  0 one      1 on every token                     (token embedding)
         1 is_w     1 on ``w``                           (token embedding)
         2 is_bit   1 on ``0`` and ``1``                 (token embedding)
         3 sign     +1 on ``1``, -1 on ``0``             (token embedding)
         4 pos      the position k                       (position embedding)
         5 inv_pos  1 / max(k, 1)                        (position embedding)
         6 mark     written by the previous-token head
         7 out      written by the read head

* **L0H0, previous-token head.** Score ``lambda*k - B*is_bit(k)``: from a bit it attends to
  the instruction just before it (by a margin of ``min(2*lambda, B - lambda)`` = 50 nats,
  so the mark is exact in float32); from an instruction, to itself. It copies ``is_w``
  into ``mark``, so ``mark`` is 1 on the bit of every write (and on the ``w`` tokens).
* **L1H0, read head.** From query ``t`` its score for key ``k`` is
  ``A*(mark + is_bit - 1) + rho*k/t``: ``A`` on the bits of writes, 0 on other bits and on
  ``w`` tokens, ``-A`` on ``r``/``i``, plus a recency bias of slope ``rho/t``. It copies
  ``sign`` into ``out``. ``rho`` is the ``sharpness``; ``A = rho + margin`` keeps every
  unmarked key at least ``margin`` (50) nats below the last write.
* **L1H1, start head**: attends to position 0; its output weights are zero (a distractor
  for read-head detection). **L0H1** is all zeros (uniform attention, no output).
* **Unembedding**: ``logit(1) = c*out``, ``logit(0) = -c*out``, instructions ``-M``. The read
  predicts ``1`` when ``out > 0`` and ``0`` otherwise (a tie goes to ``0``, the first max).

The closed form. Neglecting the unmarked keys (weight below e^-50 relative), a read at
``t`` whose write bits sit at positions ``k_j`` with signs ``s_j`` has
``out = sum_j s_j exp(rho*k_j/t) / Z``, so it errs exactly when the earlier writes of the
opposite bit outweigh the last write and the writes agreeing with it:
``sum_disagree exp(rho*k/t) > sum_agree exp(rho*k/t)``. For the decoy family
(:func:`decoy_sequence`: ``n`` opposite-bit writes packed right before the last write,
which sits at pair ``n``, and a read ``gap`` tokens later, so ``t = 2n + gap``) this is
``sum_{i=1..n} q^i > 1`` with ``q = exp(-2*rho/t)``: long gaps raise ``t``, flatten the
recency bias and let the decoys dilute the read head (:func:`predicted_error`). Any
``rho > (T-2)*ln(2)/2`` has ``q < 1/2`` at every read, so the sum stays below 1 and the
circuit solves FFL exactly at length T (:func:`min_exact_sharpness`).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ffinterp.language import ONE, ZERO, I, R, W
from ffinterp.models.gpt import GPT, GPTConfig

ONE_DIM, IS_W, IS_BIT, SIGN, POS, INV_POS, MARK, OUT = range(8)
D_MODEL, N_HEAD, D_HEAD = 8, 2, 4
PREV_TOKEN_HEAD = (0, 0)
READ_HEAD = (1, 0)
START_HEAD = (1, 1)
DEFAULT_SHARPNESS = 1000.0


@dataclass(frozen=True)
class CircuitParams:
    """Every number the circuit's weights are built from; stored in ``ffl["constructed"]``."""

    sharpness: float = DEFAULT_SHARPNESS  # rho: recency slope of the read head (per unit k/t)
    margin: float = 50.0  # nats between a write's bit and any unmarked key at the read head
    prev_slope: float = 25.0  # lambda: previous-token head's recency slope per position
    bit_penalty: float = 75.0  # B: previous-token head's penalty on bit keys
    readout: float = 10.0  # c: logit per unit of ``out``
    instr_logit: float = -1.0  # -M: logit of w, r, i everywhere
    block_size: int = 512

    def __post_init__(self) -> None:
        if not self.sharpness >= 0:
            raise ValueError(f"sharpness must be >= 0, got {self.sharpness}")
        if self.block_size < 4 or self.block_size % 2:
            raise ValueError(f"block_size must be an even number >= 4, got {self.block_size}")

    @property
    def mark_gain(self) -> float:
        """A: the read head's score on a write's bit over other bits."""
        return self.sharpness + self.margin

    def to_meta(self) -> dict:
        """The ``ffl["constructed"]`` entry: parameters plus which head does what."""
        return {
            **asdict(self),
            "mark_gain": self.mark_gain,
            "read_head": list(READ_HEAD),
            "prev_token_head": list(PREV_TOKEN_HEAD),
            "start_head": list(START_HEAD),
        }

    @classmethod
    def from_meta(cls, meta: dict) -> CircuitParams:
        """Rebuild from a checkpoint's ``ffl`` dict (or its ``constructed`` entry)."""
        d = meta.get("constructed", meta)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def build_circuit(sharpness: float = DEFAULT_SHARPNESS, *, block_size: int = 512, **overrides: float) -> GPT:
    """The hand-built circuit as a fast :class:`GPT` (eval mode, weights set analytically).

    Its parameters are on ``model.circuit`` and go in ``ffl["constructed"]`` via
    :func:`circuit_meta`.
    """
    p = CircuitParams(sharpness=float(sharpness), block_size=block_size, **overrides)
    cfg = GPTConfig(
        n_layer=2,
        n_head=N_HEAD,
        n_embd=D_MODEL,
        block_size=p.block_size,
        bias=True,
        layer_norm=False,
        attn_only=True,
    )
    model = GPT(cfg)
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    wte = sd["transformer.wte.weight"]
    for tok in range(5):
        wte[tok, ONE_DIM] = 1.0
    wte[W, IS_W] = 1.0
    wte[ZERO, IS_BIT] = wte[ONE, IS_BIT] = 1.0
    wte[ONE, SIGN], wte[ZERO, SIGN] = 1.0, -1.0
    pos = torch.arange(p.block_size, dtype=torch.float64)
    wpe = sd["transformer.wpe.weight"]
    wpe[:, POS] = pos.float()
    wpe[:, INV_POS] = (1.0 / pos.clamp_min(1)).float()

    # c_attn rows: [q | k | v], each D_MODEL = N_HEAD * D_HEAD rows; scores are divided by
    # sqrt(D_HEAD), so queries carry that factor to make the score exactly q . k.
    s = math.sqrt(D_HEAD)

    def head(layer: int, h: int, q: dict, k: dict, v: dict, o: dict) -> None:
        w = sd[f"transformer.h.{layer}.attn.c_attn.weight"]
        wo = sd[f"transformer.h.{layer}.attn.c_proj.weight"]
        base = h * D_HEAD
        for j, terms in q.items():
            for dim, val in terms.items():
                w[base + j, dim] = s * val
        for j, terms in k.items():
            for dim, val in terms.items():
                w[D_MODEL + base + j, dim] = val
        for j, terms in v.items():
            for dim, val in terms.items():
                w[2 * D_MODEL + base + j, dim] = val
        for j, dim in o.items():
            wo[dim, base + j] = 1.0

    A, rho = p.mark_gain, p.sharpness
    # L0H0: previous-token head. score = lambda*k - B*is_bit(k); value is_w -> mark.
    head(
        0,
        0,
        q={0: {ONE_DIM: 1.0}, 1: {ONE_DIM: 1.0}},
        k={0: {POS: p.prev_slope}, 1: {IS_BIT: -p.bit_penalty}},
        v={0: {IS_W: 1.0}},
        o={0: MARK},
    )
    # L1H0: read head. score = A*(mark + is_bit - 1) + rho * k / t; value sign -> out.
    head(
        1,
        0,
        q={0: {ONE_DIM: 1.0}, 1: {INV_POS: 1.0}},
        k={0: {MARK: A, IS_BIT: A, ONE_DIM: -A}, 1: {POS: rho}},
        v={0: {SIGN: 1.0}},
        o={0: OUT},
    )
    # L1H1: start head (attends to position 0, writes nothing).
    head(1, 1, q={0: {ONE_DIM: 1.0}}, k={0: {POS: -2 * p.prev_slope}}, v={}, o={})
    lm = sd["lm_head.weight"]
    lm[ONE, OUT], lm[ZERO, OUT] = p.readout, -p.readout
    for tok in (W, R, I):
        lm[tok, ONE_DIM] = p.instr_logit
    model.load_state_dict(sd)
    model.circuit = p  # type: ignore[attr-defined]
    return model.eval()


def circuit_meta(model_or_params: GPT | CircuitParams) -> dict:
    """The ``ffl`` metadata that lets anyone recompute the glitch region from a checkpoint."""
    p = model_or_params if isinstance(model_or_params, CircuitParams) else model_or_params.circuit
    return {"constructed": p.to_meta()}


def circuit_model(sharpness: float = DEFAULT_SHARPNESS, *, block_size: int = 512, device: str = "cpu"):
    """The circuit wrapped as an :class:`~ffinterp.hooked.FFLModel` (fast + hooked views)."""
    from ffinterp.hooked import FFLModel

    gpt = build_circuit(sharpness, block_size=block_size)
    return FFLModel.from_fast(
        gpt, device=device, name=f"circuit(sharpness={sharpness:g})", meta=circuit_meta(gpt)
    )


def save_circuit(path: str | os.PathLike, sharpness: float = DEFAULT_SHARPNESS, *, block_size: int = 512):
    """Write the circuit as an ffinterp ``ckpt.pt`` that ``load_model`` opens like any other."""
    from ffinterp.checkpoints import save_checkpoint

    gpt = build_circuit(sharpness, block_size=block_size)
    save_checkpoint(path, gpt, ffl=circuit_meta(gpt))
    return gpt


# ---------------------------------------------------------------- the closed form


def closed_form_pattern(
    tokens: Int[Tensor, "batch seq"], params: CircuitParams | None = None
) -> Float[Tensor, "batch query key"]:
    """The read head's attention, computed from the parameters alone (float64).

    Uses the ideal mark (1 exactly on a write's bit and on ``w`` tokens); the model's
    float32 mark differs by less than e^-50.
    """
    p = params or CircuitParams()
    tokens = torch.as_tensor(tokens)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    seq = tokens.shape[-1]
    is_bit = (tokens >= ZERO).double()
    prev = torch.cat([torch.full_like(tokens[:, :1], -1), tokens[:, :-1]], dim=1)
    mark = ((tokens == W) | ((prev == W) & (tokens >= ZERO))).double()
    k = torch.arange(seq, dtype=torch.float64)
    inv_t = 1.0 / k.clamp_min(1)
    scores = p.mark_gain * (mark + is_bit - 1)[:, None, :] + p.sharpness * inv_t[None, :, None] * k
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


def closed_form_out(
    tokens: Int[Tensor, "batch seq"], params: CircuitParams | None = None
) -> Float[Tensor, "batch seq"]:
    """The read head's output ``out`` at every position: attention-weighted bit signs."""
    tokens = torch.as_tensor(tokens)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    sign = torch.where(tokens == ONE, 1.0, torch.where(tokens == ZERO, -1.0, 0.0)).double()
    return (closed_form_pattern(tokens, params) * sign[:, None, :]).sum(-1)


def closed_form_predictions(
    tokens: Int[Tensor, "batch seq"], params: CircuitParams | None = None
) -> Int[Tensor, "batch seq"]:
    """The predicted next token at every position (``1`` iff out > 0, else ``0``)."""
    out = closed_form_out(tokens, params)
    return torch.where(out > 0, ONE, ZERO)


def decoy_sequence(
    gap: int, n_decoys: int, seq_len: int = 64, *, bit: int = 1
) -> tuple[Int[Tensor, " seq"], int]:
    """The probe of the glitch region: ``n_decoys`` writes of ``1 - bit``, then the last
    write of ``bit`` at pair ``n_decoys``, ignores, and a read ``gap`` tokens after it.

    All other pairs are ignores except the final read the language requires. Returns the
    tokens and the probed read's position ``t = 2*n_decoys + gap``.
    """
    if gap < 2 or gap % 2:
        raise ValueError(f"gap must be an even number >= 2, got {gap}")
    if n_decoys < 0:
        raise ValueError(f"n_decoys must be >= 0, got {n_decoys}")
    t = 2 * n_decoys + gap
    if t > seq_len - 2:
        raise ValueError(f"gap {gap} with {n_decoys} decoys needs seq_len >= {t + 2}, got {seq_len}")
    b, other = (ONE, ZERO) if bit else (ZERO, ONE)
    tokens = torch.full((seq_len,), ZERO, dtype=torch.long)
    tokens[0::2] = I
    tokens[0 : 2 * n_decoys : 2] = W
    tokens[1 : 2 * n_decoys : 2] = other
    tokens[2 * n_decoys], tokens[2 * n_decoys + 1] = W, b
    tokens[t], tokens[t + 1] = R, b
    tokens[seq_len - 2], tokens[seq_len - 1] = R, b
    return tokens, t


def decoy_weights(gap: int, n_decoys: int, sharpness: float) -> Float[Tensor, " n_plus_1"]:
    """Relative read-head weights ``q^i`` of the last write (i=0) and each decoy (i=1..n)."""
    t = 2 * n_decoys + gap
    q = math.exp(-2.0 * sharpness / t)
    return torch.tensor([q**i for i in range(n_decoys + 1)], dtype=torch.float64)


def predicted_error(gap: int, n_decoys: int, sharpness: float) -> bool:
    """Closed form: does the circuit err at the probed read of :func:`decoy_sequence`?

    True iff ``sum_{i=1..n} q^i > 1`` with ``q = exp(-2*sharpness / (2*n_decoys + gap))``.
    """
    w = decoy_weights(gap, n_decoys, sharpness)
    return bool(w[1:].sum() > 1.0)


def predicted_last_write_mass(gap: int, n_decoys: int, sharpness: float) -> float:
    """Closed form: the read head's attention on the last write at the probed read."""
    w = decoy_weights(gap, n_decoys, sharpness)
    return float(1.0 / w.sum())


def glitch_region(
    sharpness: float, gaps: list[int] | range, decoys: list[int] | range
) -> Bool[Tensor, "gap decoys"]:
    """:func:`predicted_error` over a grid: rows are gaps, columns decoy counts."""
    return torch.tensor([[predicted_error(g, n, sharpness) for n in decoys] for g in gaps])


def min_exact_sharpness(seq_len: int) -> float:
    """The sharpness above which the circuit makes no error on any sequence of ``seq_len``:
    ``q = exp(-2*rho/t) < 1/2`` at the latest read ``t = seq_len - 2``."""
    return (seq_len - 2) * math.log(2.0) / 2.0


__all__ = [
    "CircuitParams",
    "DEFAULT_SHARPNESS",
    "PREV_TOKEN_HEAD",
    "READ_HEAD",
    "START_HEAD",
    "build_circuit",
    "circuit_meta",
    "circuit_model",
    "closed_form_out",
    "closed_form_pattern",
    "closed_form_predictions",
    "decoy_sequence",
    "decoy_weights",
    "glitch_region",
    "min_exact_sharpness",
    "predicted_error",
    "predicted_last_write_mass",
    "save_circuit",
]
