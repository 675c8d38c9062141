"""Why a glitch happens: the read heads' attention at the failing read, and a causal check.

Per glitch: the read heads (detected once on a reference set), their last-write mass at the
glitch next to their typical mass on correct reads, where the attention went (categories
and top positions), a failure-mode label, and whether forcing the read heads to attend to
the last write fixes the prediction. Everything runs on the hooked model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ffinterp.analysis.search import derive_seed
from ffinterp.language import ONE, VOCAB, ZERO, I, R, W, last_write_pos, reads, sample

PATTERN = "blocks.{l}.attn.hook_pattern"
CATEGORIES = (
    "last_write",
    "earlier_write_same_bit",
    "earlier_write_opposite_bit",
    "start",
    "reads",
    "ignores",
)
START_TOKENS = 2  # the first write's pair


def attention_rows(
    ffl, tokens: Int[Tensor, "batch seq"], pos: Int[Tensor, " n"], batch: Int[Tensor, " n"] | None = None
) -> Float[Tensor, "n layer head key"]:
    """Every head's attention from query ``pos`` of row ``batch`` (hooked model), keeping
    only those rows, so long sequences never hold whole patterns."""
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    batch = torch.zeros_like(pos) if batch is None else batch
    hooked = ffl.hooked
    n_layers = hooked.cfg.n_layers
    got: dict[int, Tensor] = {}

    def grab(pattern, hook):
        layer = int(hook.name.split(".")[1])
        got[layer] = pattern[batch.to(pattern.device), :, pos.to(pattern.device), :].detach().float().cpu()

    hooks = [(PATTERN.format(l=l), grab) for l in range(n_layers)]
    with torch.inference_mode():
        hooked.run_with_hooks(tokens.to(ffl.device), fwd_hooks=hooks)
    return torch.stack([got[l] for l in range(n_layers)], dim=1)


def _pair_mass(row: Tensor, p: int) -> float:
    return float(row[p] + row[p + 1]) if p + 1 < len(row) else float(row[p])


@dataclass
class ReferenceStats:
    """Per head: mean last-write mass on correct reads, its 5th percentile, and the share of
    that mass on the ``w`` token (the rest is on its bit)."""

    mean: Float[Tensor, "layer head"]
    p05: Float[Tensor, "layer head"]
    w_share: Float[Tensor, "layer head"]
    read_heads: list[tuple[int, int]]
    n_reads: int


def reference_stats(ffl, seq_len: int, seed: int = 0, n: int = 64, chunk: int = 8) -> ReferenceStats:
    """Detect the read heads on a reference set (FFL(0.8) and FFL(0.98), half each): the
    heads whose attention at correct reads goes mostly to the last write."""
    half = n // 2
    toks = torch.cat(
        [
            sample(half, seq_len, 0.8, seed=derive_seed(seed, "reference", 8)),
            sample(n - half, seq_len, 0.98, seed=derive_seed(seed, "reference", 98)),
        ]
    )
    masses, wshares = [], []
    for lo in range(0, len(toks), chunk):
        t = toks[lo : lo + chunk]
        rd = reads(t)
        sc = ffl.predict_reads(t)
        ok = ~sc.error
        rows = attention_rows(ffl, t, rd.pos[ok], rd.batch[ok])  # n layer head key
        wp = rd.write_pos[ok]
        idx = torch.arange(len(wp))
        on_w = rows[idx, :, :, wp]
        on_b = rows[idx, :, :, wp + 1]
        masses.append(on_w + on_b)
        wshares.append(on_w / (on_w + on_b).clamp_min(1e-9))
    m = torch.cat(masses)
    ws = torch.cat(wshares)
    mean = m.mean(0)
    p05 = torch.quantile(m, 0.05, dim=0) if len(m) else mean
    flat = mean.flatten()
    heads = [(int(k) // mean.shape[1], int(k) % mean.shape[1]) for k in (flat >= 0.5).nonzero().flatten()]
    if not heads:
        k = int(flat.argmax())
        heads = [(k // mean.shape[1], k % mean.shape[1])]
    heads.sort(key=lambda lh: -float(mean[lh]))
    return ReferenceStats(mean, p05, ws.mean(0), heads, len(m))


def categorize(row: Tensor, tokens: Tensor, read_pos: int) -> dict[str, float]:
    """Attention mass of one query row by what the keys are (pairs: instruction + bit)."""
    t = tokens.tolist()
    lw = int(last_write_pos(tokens[None])[0, read_pos])
    bit = t[lw + 1]
    out = dict.fromkeys(CATEGORIES, 0.0)
    for p in range(0, read_pos + 1, 2):
        mass = _pair_mass(row[: read_pos + 1], p)
        if p == lw:
            out["last_write"] += mass
        elif p < START_TOKENS:
            out["start"] += mass
        elif t[p] == W:
            out["earlier_write_same_bit" if t[p + 1] == bit else "earlier_write_opposite_bit"] += mass
        elif t[p] == R:
            out["reads"] += mass
        else:
            out["ignores"] += mass
    return {k: round(v, 4) for k, v in out.items()}


def top_positions(row: Tensor, tokens: Tensor, read_pos: int, k: int = 3) -> list[dict]:
    """The ``k`` keys with the most attention: position, token, mass, distance to the read."""
    r = row[: read_pos + 1]
    vals, idx = torch.topk(r, min(k, len(r)))
    return [
        {
            "pos": int(p),
            "token": VOCAB[int(tokens[p])],
            "mass": round(float(v), 4),
            "distance": read_pos - int(p),
        }
        for v, p in zip(vals, idx)
    ]


def failure_mode(row: Tensor, tokens: Tensor, read_pos: int, typical: float) -> dict:
    """dilution (mass spread thin), wrong write (locked on an earlier write), start drift
    (mass on the first tokens) or other, from one read head's attention row."""
    t = tokens.tolist()
    lw = int(last_write_pos(tokens[None])[0, read_pos])
    pairs = {p: _pair_mass(row[: read_pos + 1], p) for p in range(0, read_pos + 1, 2)}
    best = max(pairs, key=lambda p: (pairs[p], -p))
    lw_mass = pairs[lw]
    if best != lw and best >= START_TOKENS and t[best] == W and pairs[best] > lw_mass:
        return {
            "label": "wrong write",
            "write_pos": best,
            "bit": VOCAB[t[best + 1]],
            "same_bit": t[best + 1] == t[lw + 1],
            "distance": read_pos - best,
            "mass": round(pairs[best], 4),
        }
    start = sum(pairs[p] for p in pairs if p < START_TOKENS) if lw >= START_TOKENS else 0.0
    if start >= 0.3 and start > lw_mass:
        return {"label": "start drift", "mass": round(start, 4)}
    if pairs[best] < 0.35 and lw_mass < 0.5 * typical:
        ent = -float(sum(m * np.log(max(m, 1e-12)) for m in pairs.values()))
        return {"label": "dilution", "max_pair_mass": round(pairs[best], 4), "entropy": round(ent, 3)}
    return {"label": "other", "max_pair_mass": round(pairs[best], 4), "at": best}


class Diagnoser:
    """Diagnoses glitches of one model; the reference statistics are computed once."""

    def __init__(self, ffl, seq_len: int, seed: int = 0, n_reference: int = 64):
        self.ffl = ffl
        self.ref = reference_stats(ffl, seq_len, seed=seed, n=n_reference)

    def patch_to_last_write(
        self, tokens: Tensor, read_pos: int, heads: list[tuple[int, int]]
    ) -> tuple[str, float]:
        """Rerun with ``heads`` attending only to the last write at the read (split between the
        ``w`` and its bit as on correct reads); return the new prediction and margin."""
        lw = int(last_write_pos(tokens[None])[0, read_pos])
        by_layer: dict[int, list[int]] = {}
        for l, h in heads:
            by_layer.setdefault(l, []).append(h)

        def make(layer):
            def fix(pattern, hook):
                for h in by_layer[layer]:
                    share = float(self.ref.w_share[layer, h])
                    pattern[:, h, read_pos, :] = 0.0
                    pattern[:, h, read_pos, lw] = share
                    pattern[:, h, read_pos, lw + 1] = 1.0 - share
                return pattern

            return fix

        hooks = [(PATTERN.format(l=l), make(l)) for l in by_layer]
        with torch.inference_mode():
            logits = self.ffl.hooked.run_with_hooks(tokens[None].to(self.ffl.device), fwd_hooks=hooks)
        at = logits[0, read_pos].float().cpu()
        bit = int(tokens[lw + 1])
        others = at.clone()
        others[bit] = float("-inf")
        return VOCAB[int(at.argmax())], float(at[bit] - others.max())

    def diagnose(self, tokens: Int[Tensor, " seq"], read_pos: int) -> dict:
        """The diagnosis record stored with a glitch in ``glitches.jsonl``."""
        tokens = torch.as_tensor(tokens).cpu()
        rows = attention_rows(self.ffl, tokens[None], torch.tensor([read_pos]))[0]  # layer head key
        lw = int(last_write_pos(tokens[None])[0, read_pos])
        heads = []
        for l, h in self.ref.read_heads:
            row = rows[l, h]
            heads.append(
                {
                    "head": f"L{l}H{h}",
                    "layer": l,
                    "index": h,
                    "last_write_mass": round(_pair_mass(row, lw), 4),
                    "typical_last_write_mass": round(float(self.ref.mean[l, h]), 4),
                    "p05_last_write_mass": round(float(self.ref.p05[l, h]), 4),
                    "categories": categorize(row, tokens, read_pos),
                    "top_positions": top_positions(row, tokens, read_pos),
                    "mode": failure_mode(row, tokens, read_pos, float(self.ref.mean[l, h])),
                }
            )
        primary = heads[0]
        pred, margin = self.patch_to_last_write(tokens, read_pos, self.ref.read_heads)
        causal = {
            "intervention": "read heads attend only to the last write at the read",
            "heads": [h["head"] for h in heads],
            "prediction": pred,
            "margin": round(margin, 4),
            "fixed": margin > 0,
        }
        if len(self.ref.read_heads) > 1:
            causal["per_head"] = {}
            for lh in self.ref.read_heads:
                p1, m1 = self.patch_to_last_write(tokens, read_pos, [lh])
                one = {"prediction": p1, "margin": round(m1, 4), "fixed": m1 > 0}
                causal["per_head"][f"L{lh[0]}H{lh[1]}"] = one
        return {
            "read_heads": heads,
            "label": primary["mode"]["label"],
            "mode": primary["mode"],
            "causal": causal,
            "reference_reads": self.ref.n_reads,
        }


__all__ = [
    "CATEGORIES",
    "Diagnoser",
    "ReferenceStats",
    "attention_rows",
    "categorize",
    "failure_mode",
    "reference_stats",
    "top_positions",
    "ONE",
    "ZERO",
    "I",
]
