"""Why a glitch happens: the read heads' attention at the failing read, and causal checks.

Per glitch: the read heads (named once, by what their output at the read carries, with
:func:`ffinterp.analysis.readheads.detect_read_heads` on a reference set), their mass on the
carrier of the last write at the glitch next to their typical mass on correct reads, where
the attention went, a failure-mode label, and two causal checks with one named verdict each:

* ``force_carrier``: force the read heads to attend only to the carrier of the last write at
  the read and re-score (``fixes_read``);
* ``clean_output``: put the read heads' output from the glitch's clean counterpart into the
  glitch run (``fixes_read``), only where the model gets the counterpart right.

Everything runs on the hooked model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ffinterp.analysis.attention import PATTERN, START_TOKENS, head_name, read_attention, read_rows
from ffinterp.analysis.hookcheck import HookCheck
from ffinterp.analysis.pairs import Pair, relabel
from ffinterp.analysis.readheads import detect_read_heads, offset_label
from ffinterp.data import eval_set
from ffinterp.errors import DeadHookError, FFInterpError
from ffinterp.language import VOCAB, I, Reads, W, last_write_pos, reads, to_text
from ffinterp.scoring import score_tokens

LABELS = ("dilution", "wrong write", "start drift", "other")


@contextmanager
def _patterns_cached(routine: str) -> Iterator[None]:
    """The attention module reads patterns from ``run_with_cache``: a pattern hook that never
    fired shows up as a missing cache key, reported here as the dead hook it is."""
    try:
        yield
    except KeyError as e:
        name = e.args[0] if e.args else None
        if isinstance(name, str) and name.startswith("blocks."):
            raise DeadHookError(
                f"{routine}: hook {name} never fired (it is missing from the cache)"
            ) from None
        raise


def attention_rows(
    ffl, tokens: Int[Tensor, "batch seq"], pos: Int[Tensor, " n"], batch: Int[Tensor, " n"] | None = None
) -> Float[Tensor, "n layer head key"]:
    """Every head's attention from query ``pos`` of row ``batch`` (hooked model, on CPU)."""
    tokens = torch.as_tensor(tokens)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    batch = torch.zeros_like(pos) if batch is None else batch
    # read_rows takes the queries as Reads; only their (batch, pos) matter here
    q = Reads(batch=batch, pos=pos, bit=torch.zeros_like(pos), write_pos=torch.zeros_like(pos))
    return read_rows(ffl, tokens, q).cpu()


@dataclass
class ReferenceStats:
    """The read heads named by effect on a reference set, their carrier, the companion heads
    (needed, carrying no bit) and where they look, and per head on the reads the model gets
    right past the opening write: mean and 5th percentile of the mass on its target (carrier,
    or companion's key)."""

    mean: Float[Tensor, "layer head"]
    p05: Float[Tensor, "layer head"]
    read_heads: list[tuple[int, int]]
    carrier: int
    detection: dict  # ReadHeads.to_dict(): effects, carrier, companions, circuit
    n_reads: int
    targets: dict[tuple[int, int], int] = field(default_factory=dict)  # head -> offset it looks at

    def target(self, head: tuple[int, int]) -> int:
        return self.targets.get(tuple(head), self.carrier)


def reference_stats(ffl, seq_len: int, n: int = 64, chunk: int = 8, circuit: bool = True) -> ReferenceStats:
    """Name the read heads by effect on the standard in-distribution set (first ``n``
    sequences at ``seq_len``), and measure how every head attends to the carrier on the
    reads the model gets right."""
    rh = detect_read_heads(ffl, "in", None, n=n, seq_len=seq_len, circuit=circuit)
    targets = rh.targets
    offset = torch.full((ffl.n_layers, ffl.n_heads), rh.carrier)
    for (l, h), t in targets.items():
        offset[l, h] = t
    tokens = eval_set("in", n, seq_len)
    masses, oks = [], []
    for part in tokens.split(chunk):
        rd = reads(part)
        with _patterns_cached("reference_stats"):
            rows = read_rows(ffl, part, rd).cpu()
        key = torch.minimum(rd.write_pos[:, None, None] + offset, rd.pos[:, None, None])  # read layer head
        masses.append(rows.gather(-1, key[..., None])[..., 0])
        # typical behaviour on reads past the opening write: there the heads look up the
        # opening pair itself (its carrier would be another token), which is no failure
        oks.append(~score_tokens(ffl.fast, part, device=ffl.device).error & (rd.write_pos >= START_TOKENS))
    m, ok = torch.cat(masses), torch.cat(oks)
    if not ok.any():  # a model that gets nothing right: no typical behaviour to compare
        z = torch.zeros(ffl.n_layers, ffl.n_heads)
        return ReferenceStats(z, z, rh.heads, rh.carrier, rh.to_dict(), 0, targets)
    m = m[ok]
    return ReferenceStats(
        m.mean(0), torch.quantile(m, 0.05, dim=0), rh.heads, rh.carrier, rh.to_dict(), len(m), targets
    )


def failure_mode(
    row: Float[Tensor, " key"],
    tokens: Int[Tensor, " seq"],
    read_pos: int,
    typical: float,
    low: float,
    carrier: int = 1,
) -> dict:
    """One read head's failure, from its attention row at the read. Each write is judged by
    the mass on its carrier (``write + carrier``, the read itself where that comes later):

    * wrong write: an earlier write's carrier holds more mass than the last write's;
    * start drift: the opening write's carrier holds more than the last write's;
    * dilution: the last write's carrier still leads but holds less than ``low`` (the head's
      5th percentile on correct reads), the rest spread over other keys;
    * other: the attention looks normal; the error comes from elsewhere.
    """
    t = tokens.tolist()
    lw = int(last_write_pos(tokens[None])[0, read_pos])
    r = row[: read_pos + 1]
    writes = [p for p in range(0, read_pos, 2) if t[p] == W]
    on = {p: float(r[min(p + carrier, read_pos)]) for p in writes}
    lw_mass = on[lw]
    rivals = [p for p in writes if p != lw and p >= START_TOKENS]
    best = max(rivals, key=lambda p: (on[p], p), default=None)
    if best is not None and on[best] > lw_mass:
        return {
            "label": "wrong write",
            "write_pos": best,
            "bit": VOCAB[t[best + 1]],
            "same_bit": t[best + 1] == t[lw + 1],
            "distance": read_pos - best,
            "mass": round(on[best], 4),
        }
    start = on[0] if lw >= START_TOKENS else 0.0
    if start >= 0.3 and start > lw_mass:
        return {"label": "start drift", "mass": round(start, 4)}
    if lw_mass < low:
        ent = -sum(float(m) * math.log(max(float(m), 1e-12)) for m in r)
        return {
            "label": "dilution",
            "last_write_mass": round(lw_mass, 4),
            "typical": round(typical, 4),
            "entropy": round(ent, 3),
        }
    at = int(r.argmax())
    return {"label": "other", "max_mass": round(float(r[at]), 4), "at": at}


def blamed_head(heads: list[dict], per_head: dict[str, dict]) -> dict:
    """The head (read head or companion) a glitch is put down to. Forcing is the causal test,
    so a head whose own forcing fixes the read comes first (abnormal-looking before normal),
    then an abnormal head (the largest drop in mass on its target from its typical value),
    then the first read head: one that looks normal must not hide one that failed."""
    fixes = {h["head"] for h in heads if per_head.get(h["head"], {}).get("fixes_read")}
    abnormal = [h for h in heads if h["mode"]["label"] != "other"]
    if not fixes and not abnormal:
        return heads[0]
    return max(
        heads,
        key=lambda h: (
            h["head"] in fixes,
            h in abnormal,
            h["typical_last_write_mass"] - h["last_write_mass"],
        ),
    )


def clean_counterpart(tokens: Int[Tensor, " seq"], read_pos: int) -> Int[Tensor, " seq"]:
    """The glitch with its history cleaned: every write before the last one becomes an ignore
    (the opening write keeps its place but takes the last write's bit). Same length, same
    read, same answer; what differs is exactly the distraction."""
    x = torch.as_tensor(tokens).clone()
    lw = int(last_write_pos(x[None])[0, read_pos])
    if lw >= START_TOKENS:
        before = x[2:lw:2]
        before[before == W] = I
        x[2:lw:2] = before
        x[1] = x[lw + 1]
    return relabel(x)


class Diagnoser:
    """Diagnoses glitches of one model; read heads and reference statistics come once."""

    def __init__(self, ffl, seq_len: int, n_reference: int = 64):
        self.ffl = ffl
        self.ref = reference_stats(ffl, seq_len, n=n_reference)

    def force_carrier(
        self,
        tokens: Int[Tensor, " seq"],
        read_pos: int,
        heads: list[tuple[int, int]],
        check: HookCheck | None = None,
    ) -> tuple[str, float]:
        """Rerun with ``heads`` attending only to their target at the read (a read head: the
        last write's carrier; a companion: its own typical key); the new prediction and margin.
        ``check`` (one per glitch, shared by its calls) proves the hooks fired and took effect."""
        x = tokens[None].to(self.ffl.device)
        check = check or HookCheck(self.ffl.hooked, "diagnose (force_carrier)", x)
        lw = int(last_write_pos(tokens[None])[0, read_pos])
        by_layer: dict[int, list[int]] = {}
        for l, h in heads:
            by_layer.setdefault(l, []).append(h)

        def make(layer):
            def force(pattern, hook):
                for h in by_layer[layer]:
                    pattern[:, h, read_pos, :] = 0.0
                    pattern[:, h, read_pos, min(lw + self.ref.target((layer, h)), read_pos)] = 1.0
                return pattern

            return force

        hooks = [(PATTERN.format(l=l), make(l)) for l in by_layer]
        with torch.inference_mode():
            logits = check.run(x, hooks, dict.fromkeys(name for name, _ in hooks))
        check.verify()
        at = logits[0, read_pos].float().cpu()
        bit = int(tokens[lw + 1])
        others = at.clone()
        others[bit] = float("-inf")
        return VOCAB[int(at.argmax())], float(at[bit] - others.max())

    def patch_clean_output(self, tokens: Int[Tensor, " seq"], read_pos: int) -> dict:
        """Put each read head's output (``hook_z``, all positions) from the clean counterpart
        into the glitch run with :func:`ffinterp.analysis.patching.activation_patch`: does
        the read come out right? Not applicable when the counterpart is no clean run: the
        model gets it wrong too (its logit difference is not positive), or it is the glitch."""
        from ffinterp.analysis.patching import activation_patch

        clean = clean_counterpart(tokens, read_pos)
        if torch.equal(clean, tokens):
            return {"applicable": False, "why": "the only write is the opening one: no clean history"}
        lw = int(last_write_pos(tokens[None])[0, read_pos])
        bit = int(tokens[lw + 1])
        sc = score_tokens(self.ffl.fast, clean[None], device=self.ffl.device)
        margin = float(sc.margin[sc.reads.pos == read_pos][0])
        out = {"clean_text": str(to_text(clean)), "clean_margin": round(margin, 4)}
        if margin <= 0:
            why = f"the model gets the clean counterpart wrong too (margin {margin:+.2f})"
            return {"applicable": False, "why": why, **out}
        pair = Pair(clean, tokens, read_pos, bit, bit, lw, lw, kind="glitch")
        try:
            res = activation_patch(self.ffl, pair, "z", by_pos=False)
        except DeadHookError:
            raise
        except FFInterpError as e:  # e.g. both runs give the same logit difference
            return {"applicable": False, "why": str(e), **out}
        base = res.baselines
        c, g = base["clean logit_diff"], base["corrupted logit_diff"]
        out.update(clean_logit_diff=round(c, 4), glitch_logit_diff=round(g, 4))
        heads = {}
        for l, h in self.ref.read_heads:
            v = float(res.values[l, h])
            heads[head_name(l, h)] = {"restored": round(v, 4), "fixes_read": g + v * (c - g) > 0}
        return {
            "applicable": True,
            **out,
            "per_head": heads,
            "fixes_read": any(x["fixes_read"] for x in heads.values()),
            "top_sites": self._top_sites(pair, res.values, c, g),
        }

    def _top_sites(
        self, pair: Pair, head_values: Tensor, clean: float, glitch: float, k: int = 3
    ) -> list[dict]:
        """The components whose clean output alone best repairs the read, over every head and
        MLP, with the read's logit difference after the patch (> 0: fixed): where to look when
        the read heads' attention is normal (label ``other``)."""
        from ffinterp.analysis.patching import activation_patch

        n_layers, n_heads = head_values.shape
        sites = [(head_name(l, h), float(head_values[l, h])) for l in range(n_layers) for h in range(n_heads)]
        if not getattr(self.ffl.cfg, "attn_only", False):
            mlp = activation_patch(self.ffl, pair, "mlp_out", by_pos=False).values
            sites += [(f"MLP{l}", float(mlp[l])) for l in range(n_layers)]
        after = [(name, glitch + v * (clean - glitch), v) for name, v in sites]
        after.sort(key=lambda s: -s[1])
        return [{"site": n, "logit_diff": round(a, 4), "restored": round(v, 4)} for n, a, v in after[:k]]

    def diagnose(self, tokens: Int[Tensor, " seq"], read_pos: int) -> dict:
        """The diagnosis stored with a glitch in ``glitches.jsonl``."""
        tokens = torch.as_tensor(tokens).cpu().long()
        carrier = self.ref.carrier
        with _patterns_cached("diagnose"):
            # each head's mass on its own target is read from the rows below
            ra = read_attention(self.ffl, tokens[None], top_k=3, keep_rows=True, batch_size=1)
        k = int((ra.reads.pos == read_pos).nonzero()[0])
        lw = int(ra.reads.write_pos[k])
        heads = []
        for l, h in self.ref.targets or self.ref.read_heads:
            target = self.ref.target((l, h))
            typical = float(self.ref.mean[l, h])
            low = float(self.ref.p05[l, h]) if self.ref.n_reads else 0.5
            heads.append(
                {
                    "head": head_name(l, h),
                    "role": "read head" if (l, h) in self.ref.read_heads else "companion",
                    "carrier": offset_label(target),
                    "carrier_offset": target,
                    "last_write_mass": round(float(ra.rows[k, l, h, min(lw + target, read_pos)]), 4),
                    "write_mass": round(float(ra.write_mass[k, l, h]), 4),
                    "typical_last_write_mass": round(typical, 4),
                    "p05_last_write_mass": round(float(self.ref.p05[l, h]), 4),
                    "categories": {c: round(v, 4) for c, v in ra.categories_of(k, l, h).items()},
                    "top_positions": [{**p, "mass": round(p["mass"], 4)} for p in ra.top(k, l, h)],
                    "mode": failure_mode(ra.rows[k, l, h], tokens, read_pos, typical, low, target),
                }
            )
        check = HookCheck(self.ffl.hooked, "diagnose (force_carrier)", tokens[None].to(self.ffl.device))
        pred, margin = self.force_carrier(tokens, read_pos, self.ref.read_heads, check)
        causal = {
            "force_carrier": {
                "intervention": f"the read heads attend only to the last write's carrier "
                f"({offset_label(carrier)}) at the read",
                "heads": [head_name(*lh) for lh in self.ref.read_heads],
                "prediction": pred,
                "margin": round(margin, 4),
                "fixes_read": margin > 0,
            },
            "clean_output": self.patch_clean_output(tokens, read_pos),
        }
        per_head = {}
        if len(heads) > 1:  # each read head and companion alone, onto its own target
            for lh in self.ref.targets:
                p1, m1 = self.force_carrier(tokens, read_pos, [lh], check)
                per_head[head_name(*lh)] = {
                    "target": offset_label(self.ref.target(lh)),
                    "prediction": p1,
                    "margin": round(m1, 4),
                    "fixes_read": m1 > 0,
                }
            causal["force_per_head"] = per_head
        blamed = blamed_head(heads, per_head)
        return {
            "label": blamed["mode"]["label"],
            "read_heads": heads,
            "carrier": offset_label(carrier),
            "mode": {**blamed["mode"], "head": blamed["head"]},
            "causal": causal,
            "reference_reads": self.ref.n_reads,
            "read_heads_passed_threshold": bool(self.ref.detection["passed"]),
        }


__all__ = [
    "LABELS",
    "Diagnoser",
    "blamed_head",
    "ReferenceStats",
    "attention_rows",
    "failure_mode",
    "reference_stats",
]
