"""Read heads named by what they carry, where they look relative to the last write, and the
circuit that brings the bit there.

A head's attention says where it looks, not what reaches the answer. On every trained model
shipped here the head with the most attention on the last write's ``w`` token carries nothing
(under causal masking that token cannot hold the bit that follows it), while the head that
carries the bit looks at the token *after* the bit. So a read head is named by patching:

* **effect**: the share of the logit difference restored when the head's output (``hook_z``)
  at the read is put from a clean run into a run whose last write's bit is flipped
  (denoising; clean = 1, flipped = 0). Pairs are batched: each sequence gives one random read,
  and every head costs one forward pass over all of them.
* **naming rule**: a head restoring at least half (``threshold`` 0.5). When the flipped and
  clean logit differences are about opposite (as they are for a model that solves the task),
  restoring half moves the read's logit difference past 0: that head alone brings the right
  answer back. With no head over the threshold the best is named and flagged.
* **carrier**: for each named head, its attention at the read by offset from the last write
  (``w`` = +0, its bit = +1, the token after the bit = +2, ...). The offset with most mass in
  distribution is the *carrier* of the last write for this model: where the read head picks
  the bit up. ``last_write_mass`` elsewhere in ffinterp is the mass on the carrier; the old
  mass on the ``w`` token and its bit is ``write_mass``.

:func:`circuit_summary` then asks path patching (Wang et al. 2022) which earlier heads put
the bit on the carrier (flip-last-write pairs, sender -> read head via its values) and which
tell the read head where the last write is (ignore-last-write pairs, via its keys and
queries), and where the main sender looks from the carrier.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from functools import partial

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ffinterp.analysis.attention import PATTERN, START_TOKENS, Labelled, head_name
from ffinterp.analysis.hookcheck import HookCheck
from ffinterp.analysis.pairs import relabel
from ffinterp.errors import FFInterpError
from ffinterp.language import ONE, ZERO, reads

Z = "blocks.{l}.attn.hook_z"
#: Offsets from the last write's ``w`` that get their own bin; the rest are ``later`` (between
#: the last offset and the read) or ``before`` (keys before the last write).
N_OFFSETS = 8
OFFSETS = ("w", "bit", *(f"+{k}" for k in range(2, N_OFFSETS)), "later", "before")
LATER, BEFORE = N_OFFSETS, N_OFFSETS + 1
THRESHOLD = 0.5
#: A companion head: the read needs it (mean-ablating its output at the read loses at least
#: NEEDED of the clean logit difference: the read is then at most half as sure), it carries no
#: bit (restores under CARRIES_NOTHING), and it looks up one key (at least LOOKS_UP of its
#: attention on one offset from the last write), so forcing it back onto that key is a small,
#: meaningful intervention rather than a new input.
NEEDED = 0.5
CARRIES_NOTHING = 0.1
LOOKS_UP = 0.5


def offset_label(offset: int) -> str:
    """``w``, ``bit`` or ``+k``: a key's place relative to the last write's ``w`` token."""
    return OFFSETS[offset] if 0 <= offset < N_OFFSETS else f"+{offset}"


# ---------------------------------------------------------------- flipped pairs, batched


@dataclass(frozen=True)
class FlipBatch:
    """Clean sequences and copies with one read's last write flipped (reads relabelled).

    Row ``b`` scores the read at ``read_pos[b]``, whose last write's ``w`` sits at
    ``write_pos[b]``; ``clean_bit[b]`` is its answer on the clean row (the flipped row's
    answer is the other bit).
    """

    clean: Int[Tensor, "batch seq"]
    corrupted: Int[Tensor, "batch seq"]
    read_pos: Int[Tensor, " batch"]
    write_pos: Int[Tensor, " batch"]
    clean_bit: Int[Tensor, " batch"]

    def __len__(self) -> int:
        return len(self.clean)


def flip_batch(tokens: Int[Tensor, "batch seq"], seed: int = 0) -> FlipBatch:
    """One flip-last-write pair per sequence, at a read drawn uniformly (seeded) among its
    reads past the opening write (among all its reads if it has none), so the pairs follow
    the set's own distribution of gaps. Reads whose last write is the opening pair are left
    out where possible: a head that always looks at the first tokens (an attention sink)
    carries their bit, which says nothing about how the model finds a later write."""
    tokens = torch.as_tensor(tokens).long().cpu()
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    rd = reads(tokens)
    count = torch.bincount(rd.batch, minlength=len(tokens))
    if (count == 0).any():
        raise FFInterpError(f"sequence {int((count == 0).nonzero()[0])} has no read to patch")
    past = rd.write_pos >= START_TOKENS
    has_past = torch.bincount(rd.batch[past], minlength=len(tokens)) > 0
    keep = past | ~has_past[rd.batch]
    idx = keep.nonzero().flatten()
    count = torch.bincount(rd.batch[idx], minlength=len(tokens))
    start = torch.cumsum(count, 0) - count
    gen = torch.Generator().manual_seed(seed)
    pick = idx[start + (torch.rand(len(tokens), generator=gen) * count).long().clamp_max(count - 1)]
    rows = torch.arange(len(tokens))
    wp = rd.write_pos[pick]
    cor = tokens.clone()
    cor[rows, wp + 1] = ZERO + ONE - tokens[rows, wp + 1]
    return FlipBatch(tokens, relabel(cor), rd.pos[pick], wp, tokens[rows, wp + 1])


def _logit_diff(logits: Tensor, fb: FlipBatch) -> Float[Tensor, " batch"]:
    rows = torch.arange(len(fb), device=logits.device)
    at = logits[rows, fb.read_pos.to(logits.device)].float()
    good = fb.clean_bit.to(logits.device)
    return at[rows, good] - at[rows, ZERO + ONE - good]


@dataclass(frozen=True)
class HeadEffects:
    """What each head's output at the read carries, over a batch of flipped pairs."""

    restored: Float[Tensor, "layer head"]  # share of the logit difference restored
    needed: Float[Tensor, "layer head"]  # share of the clean logit difference lost, mean-ablated
    clean_logit_diff: Float[Tensor, " batch"]
    flipped_logit_diff: Float[Tensor, " batch"]
    offsets: Float[Tensor, "layer head offset"]  # mean attention at the read by offset
    write_mass: Float[Tensor, "layer head"]  # mean mass on the w token and its bit
    n_pairs: int


def offset_mass(
    rows: Float[Tensor, "n layer head key"], read_pos: Int[Tensor, " n"], write_pos: Int[Tensor, " n"]
) -> Float[Tensor, "n layer head offset"]:
    """Each attention row binned by key offset from the last write (:data:`OFFSETS`)."""
    n, _, _, seq = rows.shape
    k = torch.arange(seq, device=rows.device)[None, :]
    off = k - write_pos.to(rows.device)[:, None]
    bins = off.clamp(0, N_OFFSETS - 1)
    bins = torch.where(off >= N_OFFSETS, LATER, bins)
    bins = torch.where(off < 0, BEFORE, bins)
    visible = (k <= read_pos.to(rows.device)[:, None]).to(rows.dtype)
    onehot = torch.nn.functional.one_hot(bins, len(OFFSETS)).to(rows.dtype) * visible[..., None]
    return torch.einsum("nlhk,nko->nlho", rows, onehot)


def _chunk(fb: FlipBatch, lo: int, size: int) -> FlipBatch:
    return FlipBatch(
        *(t[lo : lo + size] for t in (fb.clean, fb.corrupted, fb.read_pos, fb.write_pos, fb.clean_bit))
    )


def head_effects(model, fb: FlipBatch, *, batch_size: int = 16) -> HeadEffects:
    """Patch every head's ``hook_z`` at the read from clean into flipped (what it carries), and
    replace it at the read in the clean run by its mean over all the pairs' reads (whether the
    read needs it), one pass each per head per chunk of pairs; also the clean run's attention
    at the read by offset. A first pass over the chunks keeps only each head's output at the
    read, so the mean is the whole set's, whatever the chunking."""
    hk = model.hooked
    if hk is None:
        raise FFInterpError(f"{getattr(model, 'name', 'model')}: no heads to patch (an LSTM)")
    L, H, dev = model.n_layers, model.n_heads, model.device
    z_names = [Z.format(l=l) for l in range(L)]
    p_names = [PATTERN.format(l=l) for l in range(L)]
    parts = [_chunk(fb, lo, batch_size) for lo in range(0, len(fb), batch_size)]
    z_read, clean_ld, flip_ld, offs, wmass = [], [], [], [], []
    for part in parts:  # clean and flipped runs: logit differences, z and attention at the read
        cut = int(part.read_pos.max()) + 1  # causal: nothing after the last scored read matters
        rows, rp = torch.arange(len(part), device=dev), part.read_pos.to(dev)
        check = HookCheck(hk, "detect_read_heads", part.corrupted[:, :cut].to(dev))
        with torch.inference_mode():
            lc, cache = check.cache(part.clean[:, :cut].to(dev), z_names + p_names)
            lx = hk(part.corrupted[:, :cut].to(dev))
            z_read.append(torch.stack([cache[n][rows, rp] for n in z_names]))  # layer n head d
            att = torch.stack([cache[p][rows, :, rp, :].float() for p in p_names], 1)
        offs.append(offset_mass(att, part.read_pos, part.write_pos).cpu())
        wp = part.write_pos.to(dev)
        wmass.append((att[rows, :, :, wp] + att[rows, :, :, wp + 1]).cpu())
        clean_ld.append(_logit_diff(lc, part).cpu())
        flip_ld.append(_logit_diff(lx, part).cpu())
    mean_z = torch.cat(z_read, 1).mean(1)  # layer head d
    gain = torch.zeros(L, H, dtype=torch.float64)
    lost = torch.zeros(L, H, dtype=torch.float64)
    for part, zr, c, x in zip(parts, z_read, clean_ld, flip_ld):
        cut = int(part.read_pos.max()) + 1
        clean, cor = part.clean[:, :cut].to(dev), part.corrupted[:, :cut].to(dev)
        rows, rp = torch.arange(len(part), device=dev), part.read_pos.to(dev)
        check = HookCheck(hk, "detect_read_heads", cor)
        with torch.inference_mode():
            for l in range(L):
                for h in range(H):

                    def put(z, hook=None, value=zr[l, :, h], h=h, rows=rows, rp=rp):
                        z = z.clone()
                        z[rows, rp, h] = value
                        return z

                    patched = _logit_diff(check.run(cor, [(z_names[l], put)]), part).cpu()
                    gain[l, h] += float((patched - x).double().sum())
                    ablate = partial(put, value=mean_z[l, h])
                    ablated = _logit_diff(check.run(clean, [(z_names[l], ablate)]), part).cpu()
                    lost[l, h] += float((c - ablated).double().sum())
    c, x = torch.cat(clean_ld), torch.cat(flip_ld)
    span = float((c - x).double().sum())
    restored = (gain / span).float() if span > 0 else torch.full((L, H), math.nan)
    base = float(c.double().sum())
    needed = (lost / base).float() if base > 0 else torch.full((L, H), math.nan)
    # w+bit mass over reads past the opening write: there an attention sink on the first
    # tokens would look like a head on the last write
    wm, past = torch.cat(wmass), fb.write_pos >= START_TOKENS
    wm = wm[past] if past.any() else wm
    return HeadEffects(restored, needed, c, x, torch.cat(offs).mean(0), wm.mean(0), len(fb))


# ---------------------------------------------------------------- naming


def name_by_effect(
    restored: Float[Tensor, "layer head"], threshold: float = THRESHOLD, top: int | None = None
) -> tuple[list[tuple[int, int]], bool]:
    """Heads restoring at least ``threshold`` (best first), or the ``top`` best; with none over
    the threshold the single best, and False as the second value."""
    n_heads = restored.shape[1]
    flat = torch.nan_to_num(restored.flatten().float(), nan=-math.inf)
    order = [int(k) for k in flat.argsort(descending=True)]
    if top is not None:
        picked = order[:top]
        return [divmod(k, n_heads) for k in picked], all(float(flat[k]) >= threshold for k in picked)
    picked = [k for k in order if float(flat[k]) >= threshold]
    return [divmod(k, n_heads) for k in (picked or order[:1])], bool(picked)


def carrier_of(offsets: Float[Tensor, " offset"]) -> int:
    """The offset (0 = ``w``, 1 = bit, 2 = the token after the bit, ...) holding most mass."""
    return int(offsets[:N_OFFSETS].argmax())


def carrier_positions(
    write_pos: Int[Tensor, "*n"], read_pos: Int[Tensor, "*n"], carrier: int
) -> Int[Tensor, "*n"]:
    """Where the carrier of each read's last write sits: ``write_pos + carrier``, or the read
    itself when the write is so close that the carrier would come after it."""
    return torch.minimum(write_pos + carrier, read_pos)


# ---------------------------------------------------------------- the circuit


@dataclass
class Circuit:
    """How the last write's bit reaches one read head, as far as path patching can tell.

    ``value_senders``: heads whose clean output, by path patching into the read head's values
    only, restores the flipped read (they put the bit on the carrier). ``position_senders``:
    heads whose clean output restores an ignore-last-write pair through the read head's keys
    or queries (they tell it which write is the last). ``sender_offsets``: where the main value
    sender looks from the carrier, by offset from the last write (:data:`OFFSETS`).
    """

    read_head: tuple[int, int]
    restored: float
    carrier: int
    carrier_mass: float
    value_senders: dict[str, float]
    position_senders: dict[str, dict[str, float]]
    sender_offsets: dict[str, float] = field(default_factory=dict)
    n_pairs: int = 0
    n_position_pairs: int = 0
    companions: dict[str, dict] = field(default_factory=dict)  # head -> needed, looks at, mass

    @property
    def main_sender(self) -> str | None:
        best = max(self.value_senders.items(), key=lambda kv: kv[1], default=(None, 0.0))
        return best[0] if best[1] >= 0.25 else None

    def lines(self) -> list[str]:
        rh = head_name(*self.read_head)
        where = offset_label(self.carrier)
        out = [
            f"read head {rh}: its output at the read restores {self.restored:.2f} of the logit difference; "
            f"it reads the last write from its carrier, the {where} token "
            f"({'the bit itself' if self.carrier == 1 else 'write' + where if self.carrier > 1 else 'the w'})"
            f", {self.carrier_mass:.2f} of its attention"
        ]
        senders = ", ".join(
            f"{k} {v:.2f}" for k, v in sorted(self.value_senders.items(), key=lambda kv: -kv[1])
        )
        if self.main_sender is None:
            out.append(
                "the bit on the carrier: no earlier head carries it (path patching to the read head's "
                f"values restores at most {max(self.value_senders.values(), default=0.0):.2f}): "
                "the carrier holds it by its own embedding"
            )
        else:
            look = ", ".join(f"{k} {v:.2f}" for k, v in self.sender_offsets.items() if v >= 0.01)
            out.append(
                f"the bit reaches the carrier through {self.main_sender} (path patching sender -> {rh} "
                f"via v restores: {senders}); from the carrier {self.main_sender} attends by offset from "
                f"the last write: {look}"
            )
        if self.n_position_pairs:
            pos = ", ".join(
                f"{k} via {via} {v:.2f}"
                for k, d in self.position_senders.items()
                for via, v in d.items()
                if v >= 0.1
            )
            out.append(
                "which write is the last one (ignore-last-write pairs, sender -> read head via k/q): "
                + (pos or "no single earlier head restores 0.1 or more")
            )
        for name, c in self.companions.items():
            out.append(
                f"{name} carries no bit (its output at the read restores {c['restored']:.2f}) but the read "
                f"needs it: mean-ablating it at the read loses {c['needed']:.2f} of the logit difference; "
                f"it looks at the last write's {c['looks_at']} token ({c['mass']:.2f} of its attention)"
            )
        out.append(f"({self.n_pairs} flipped pairs, {self.n_position_pairs} ignore pairs)")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def _repr_html_(self) -> str:
        items = "".join(f"<li>{html.escape(x)}</li>" for x in self.lines())
        return f"<div><b>circuit of {head_name(*self.read_head)}</b><ul>{items}</ul></div>"

    def to_dict(self) -> dict:
        return {
            "read_head": head_name(*self.read_head),
            "restored": round(self.restored, 4),
            "carrier": offset_label(self.carrier),
            "carrier_offset": self.carrier,
            "carrier_mass": round(self.carrier_mass, 4),
            "value_senders": {k: round(v, 4) for k, v in self.value_senders.items()},
            "position_senders": {
                k: {a: round(b, 4) for a, b in d.items()} for k, d in self.position_senders.items()
            },
            "main_sender": self.main_sender,
            "sender_offsets": {k: round(v, 4) for k, v in self.sender_offsets.items()},
            "n_pairs": self.n_pairs,
            "n_position_pairs": self.n_position_pairs,
            "companions": self.companions,
            "summary": self.lines(),
        }


def circuit_summary(
    model,
    tokens: Int[Tensor, "batch seq"],
    read_head: tuple[int, int],
    carrier: int,
    restored: float,
    carrier_mass: float,
    *,
    n_pairs: int = 8,
) -> Circuit:
    """Path patching from every head before the read head's layer into it, averaged over
    ``n_pairs`` sequences: via ``v`` on flip-last-write pairs, via ``k`` and ``q`` on
    ignore-last-write pairs."""
    from ffinterp.analysis.pairs import flip_last_write, ignore_last_write
    from ffinterp.analysis.patching import path_patch

    layer = read_head[0]
    senders = [(l, h) for l in range(layer) for h in range(model.n_heads)]
    if not senders:  # a read head in layer 0 has no earlier heads
        return Circuit(tuple(read_head), restored, carrier, carrier_mass, {}, {}, {}, 0, 0)
    value = torch.zeros(len(senders), dtype=torch.float64)
    pos = {via: torch.zeros(len(senders), dtype=torch.float64) for via in ("k", "q")}
    n_v = n_p = 0
    sender_rows = []
    tokens = torch.as_tensor(tokens)[:n_pairs]
    for seq in tokens:
        pair = flip_last_write(seq)
        res = path_patch(model, pair, [read_head], via="v", senders=senders)
        value += torch.stack([res.values[l, h] for l, h in senders]).double()
        n_v += 1
        sender_rows.append(pair)
        try:
            ip = ignore_last_write(seq)
        except FFInterpError:
            continue
        for via in pos:
            res = path_patch(model, ip, [read_head], via=via, senders=senders)
            pos[via] += torch.stack([res.values[l, h] for l, h in senders]).double()
        n_p += 1
    value_senders = {head_name(*s): float(value[k] / n_v) for k, s in enumerate(senders)}
    position = (
        {head_name(*s): {via: float(pos[via][k] / n_p) for via in pos} for k, s in enumerate(senders)}
        if n_p
        else {}
    )
    out = Circuit(tuple(read_head), restored, carrier, carrier_mass, value_senders, position, {}, n_v, n_p)
    main = out.main_sender
    if main is not None:
        l, h = next(s for s in senders if head_name(*s) == main)
        out.sender_offsets = _sender_offsets(model, sender_rows, (l, h), carrier)
    return out


def _sender_offsets(model, pairs, sender: tuple[int, int], carrier: int) -> dict[str, float]:
    """Mean attention of ``sender`` from each pair's carrier position, by offset from the write."""
    total = torch.zeros(len(OFFSETS), dtype=torch.float64)
    name = PATTERN.format(l=sender[0])
    for pair in pairs:
        x = pair.clean[None].to(model.device)
        with torch.inference_mode():
            _, cache = model.hooked.run_with_cache(x, names_filter=lambda n: n == name)
        q = int(carrier_positions(torch.tensor(pair.write_pos), torch.tensor(pair.read_pos), carrier))
        row = cache[name][0, sender[1], q].float().cpu()[None, None, None]
        total += offset_mass(row, torch.tensor([q]), torch.tensor([pair.write_pos]))[0, 0, 0].double()
    mean = total / max(len(pairs), 1)
    return {lab: float(v) for lab, v in zip(OFFSETS, mean)}


# ---------------------------------------------------------------- the result


@dataclass
class ReadHeads:
    """Heads named by what their output at the read carries, with where they look.

    ``effect`` (reference set) and ``check_effect`` (check set): share of the logit difference
    each head restores (:func:`head_effects`). ``offsets``: mean attention at the read by
    offset from the last write (:data:`OFFSETS`). ``carriers``: per named head, the offset
    holding most of its mass; :attr:`carrier` is the first named head's. ``write_mass``: the
    plain mass on the last write's ``w`` and bit (reads past the opening write).
    """

    effect: Float[Tensor, "layer head"]
    heads: list[tuple[int, int]]
    threshold: float
    passed: bool
    reference: str
    n_pairs: int
    offsets: Float[Tensor, "layer head offset"]
    write_mass: Float[Tensor, "layer head"]
    carriers: dict[tuple[int, int], int]
    check_effect: Float[Tensor, "layer head"] | None = None
    check: str | None = None
    n_check_pairs: int = 0
    top: int | None = None
    circuit: Circuit | None = None
    needed: Float[Tensor, "layer head"] | None = None
    companions: dict[tuple[int, int], int] = field(default_factory=dict)

    @property
    def targets(self) -> dict[tuple[int, int], int]:
        """Where each read head and companion head looks in distribution (offset from the last
        write): the read heads' carriers and the companions' typical keys."""
        return {**self.carriers, **self.companions}

    @property
    def carrier(self) -> int:
        """The carrier offset of the first named read head."""
        return self.carriers[self.heads[0]]

    @property
    def score(self) -> Float[Tensor, "layer head"]:
        """The naming score: :attr:`effect`."""
        return self.effect

    @property
    def check_heads(self) -> list[tuple[int, int]] | None:
        if self.check_effect is None:
            return None
        return name_by_effect(self.check_effect, self.threshold, self.top)[0]

    @property
    def stable(self) -> bool | None:
        """True when the check set names the same heads (None without a check set)."""
        ch = self.check_heads
        if ch is None or self.n_check_pairs == 0:
            return None
        return set(ch) == set(self.heads)

    def labelled(self) -> Labelled:
        coords = {"layer": tuple(range(self.effect.shape[0])), "head": tuple(range(self.effect.shape[1]))}
        return Labelled(self.effect, ("layer", "head"), coords, f"restored at the read ({self.reference})")

    def offsets_labelled(self) -> Labelled:
        names = tuple(head_name(l, h) for l, h in self.heads)
        values = torch.stack([self.offsets[l, h] for l, h in self.heads])
        return Labelled(
            values, ("head", "offset"), {"head": names, "offset": OFFSETS}, "attention at the read"
        )

    def rows(self) -> list[dict]:
        """One dict per head, largest effect first."""
        n_heads = self.effect.shape[1]
        order = torch.nan_to_num(self.effect.flatten(), nan=-math.inf).argsort(descending=True).tolist()
        out = []
        for k in order:
            l, h = divmod(k, n_heads)
            out.append(
                {
                    "head": head_name(l, h),
                    "restored": float(self.effect[l, h]),
                    "check_restored": float(self.check_effect[l, h])
                    if self.check_effect is not None
                    else math.nan,
                    "write_mass": float(self.write_mass[l, h]),
                    "carrier": offset_label(carrier_of(self.offsets[l, h])),
                    "carrier_mass": float(self.offsets[l, h, carrier_of(self.offsets[l, h])]),
                    "read_head": (l, h) in self.carriers,
                    "needed": float(self.needed[l, h]) if self.needed is not None else math.nan,
                    "companion": (l, h) in self.companions,
                }
            )
        return out

    def table(self, limit: int | None = None) -> str:
        """Plain text: the causal table first, then where the named heads look."""
        first = (
            f"read heads: {', '.join(head_name(*h) for h in self.heads)}"
            + ("" if self.passed else f" (best head; none restored {self.threshold})")
            + (f"; stable on check set: {'yes' if self.stable else 'no'}" if self.stable is not None else "")
        )
        lines = [
            first,
            f"named by effect: share of the logit difference restored by patching the head's output at the "
            f"read from clean into last-write-flipped runs (threshold {self.threshold}); reference "
            f"{self.reference} ({self.n_pairs} pairs)"
            + (f", check {self.check} ({self.n_check_pairs} pairs)" if self.check_effect is not None else ""),
            f"ablated = share of the clean logit difference lost when the head's output at the read is "
            f"mean-ablated (a companion: >= {NEEDED} without carrying the bit)",
            f"{'head':<8}{'restored':>10}{'check':>8}{'ablated':>9}{'w+bit':>7}{'looks at':>10}"
            f"{'mass':>7}  role",
        ]
        for r in self.rows()[:limit]:
            chk = f"{r['check_restored']:>8.3f}" if not math.isnan(r["check_restored"]) else f"{'-':>8}"
            role = "read head" if r["read_head"] else ("companion" if r["companion"] else "")
            lines.append(
                f"{r['head']:<8}{r['restored']:>10.3f}{chk}{r['needed']:>9.3f}{r['write_mass']:>7.3f}"
                f"{r['carrier']:>10}{r['carrier_mass']:>7.3f}  {role}"
            )
        lines += ["", "where the read (and companion) heads look at the read, by offset from the last write:"]
        lines.append(f"{'head':<8}" + "".join(f"{o:>7}" for o in OFFSETS) + "  looks at")
        for (l, h), target in self.targets.items():
            vals = "".join(f"{float(v):>7.3f}" for v in self.offsets[l, h])
            lines.append(f"{head_name(l, h):<8}{vals}  {offset_label(target)}")
        if self.circuit is not None:
            lines += ["", "circuit:"] + ["  " + x for x in self.circuit.lines()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return self.table()

    def to_dict(self) -> dict:
        return {
            "read_heads": [head_name(*h) for h in self.heads],
            "passed": self.passed,
            "threshold": self.threshold,
            "carrier": {head_name(*h): offset_label(c) for h, c in self.carriers.items()},
            "companions": {head_name(*h): offset_label(c) for h, c in self.companions.items()},
            "targets": {head_name(*h): c for h, c in self.targets.items()},
            "needed": [[round(float(x), 4) for x in row] for row in self.needed]
            if self.needed is not None
            else None,
            "effect": [[round(float(x), 4) for x in row] for row in self.effect],
            "write_mass": [[round(float(x), 4) for x in row] for row in self.write_mass],
            "reference": self.reference,
            "n_pairs": self.n_pairs,
            "circuit": self.circuit.to_dict() if self.circuit is not None else None,
        }

    def _repr_html_(self) -> str:
        text = self.table().split("\n\n")[0].splitlines()
        cap = html.escape(text[0])
        note = html.escape(text[1])
        head = (
            "<tr><th>head</th><th>restored</th><th>check</th><th>w+bit mass</th><th>looks at</th>"
            "<th>mass</th><th>read head</th></tr>"
        )
        body = "".join(
            f"<tr><th>{r['head']}</th><td>{r['restored']:.3f}</td><td>{r['check_restored']:.3f}</td>"
            f"<td>{r['write_mass']:.3f}</td><td>{r['carrier']}</td><td>{r['carrier_mass']:.3f}</td>"
            f"<td>{'★' if r['read_head'] else ''}</td></tr>"
            for r in self.rows()
        )
        offs = self.offsets_labelled()._repr_html_()
        circ = self.circuit._repr_html_() if self.circuit is not None else ""
        return f"<table><caption>{cap}<br><small>{note}</small></caption>{head}{body}</table>{offs}{circ}"

    def plot(self):
        """Restored share per head (reference and check), read heads in red."""
        import plotly.graph_objects as go

        from ffinterp.viz import HIGHLIGHT

        rows = sorted(self.rows(), key=lambda r: r["head"])
        names = [r["head"] for r in rows]
        fig = go.Figure(
            go.Bar(
                name=f"reference: {self.reference}",
                x=names,
                y=[r["restored"] for r in rows],
                marker_color=[HIGHLIGHT if r["read_head"] else "#1f77b4" for r in rows],
            )
        )
        if self.check_effect is not None:
            fig.add_trace(go.Bar(name=f"check: {self.check}", x=names, y=[r["check_restored"] for r in rows]))
        fig.add_trace(
            go.Scatter(name="w+bit attention", x=names, y=[r["write_mass"] for r in rows], mode="markers")
        )
        return fig.update_layout(
            barmode="group",
            title="read heads by effect: share of the logit difference restored by patching at the read",
            yaxis=dict(title="restored / mass"),
            template="plotly_white",
        )


def _resolve(spec, n: int, seq_len: int) -> tuple[Tensor, str]:
    from ffinterp.data import eval_set, eval_set_spec

    if isinstance(spec, str):
        s = eval_set_spec(spec)
        return eval_set(spec, n, seq_len), f"{spec} FFL({s.p_i}), {n}x{seq_len}"
    t = torch.as_tensor(spec)
    t = t[None] if t.ndim == 1 else t
    return t, f"custom, {len(t)}x{t.shape[-1]}"


def detect_read_heads(
    model,
    reference: str | Tensor = "in",
    check: str | Tensor | None = "sparse",
    *,
    n: int = 64,
    seq_len: int | None = None,
    threshold: float = THRESHOLD,
    top: int | None = None,
    batch_size: int = 16,
    circuit: bool = True,
    circuit_pairs: int = 8,
    seed: int = 0,
) -> ReadHeads:
    """Name the read heads by what they carry (:func:`head_effects` on ``reference``), find
    each one's carrier, check the naming on ``check``, and (``circuit``) summarise how the
    bit reaches the first read head (:func:`circuit_summary`).

    Sets are standard set names (``in``, ``sparse``, ``dense``: the first ``n`` sequences at
    ``seq_len``, default the model's block size) or token batches.
    """
    if getattr(model, "hooked", None) is None:
        raise FFInterpError(
            f"{getattr(model, 'name', 'model')}: no heads to analyse (an LSTM has no hooked view)"
        )
    seq_len = seq_len or model.cfg.block_size
    ref, ref_name = _resolve(reference, n, seq_len)
    fx = head_effects(model, flip_batch(ref, seed), batch_size=batch_size)
    heads, passed = name_by_effect(fx.restored, threshold, top)
    carriers = {h: carrier_of(fx.offsets[h]) for h in heads}
    out = ReadHeads(
        fx.restored,
        heads,
        threshold,
        passed,
        ref_name,
        fx.n_pairs,
        fx.offsets,
        fx.write_mass,
        carriers,
        top=top,
    )
    out.needed = fx.needed
    n_heads = model.n_heads
    for k in torch.nan_to_num(fx.needed.flatten(), nan=-math.inf).argsort(descending=True).tolist():
        lh = divmod(k, n_heads)
        target = carrier_of(fx.offsets[lh])
        if (
            lh not in carriers
            and float(fx.needed[lh]) >= NEEDED
            and abs(float(fx.restored[lh])) < CARRIES_NOTHING
            and float(fx.offsets[lh][target]) >= LOOKS_UP
        ):
            out.companions[lh] = target
    if check is not None:
        chk, chk_name = _resolve(check, n, seq_len)
        cx = head_effects(model, flip_batch(chk, seed), batch_size=batch_size)
        out.check_effect, out.check, out.n_check_pairs = cx.restored, chk_name, cx.n_pairs
    if circuit:
        rh = heads[0]
        c = carriers[rh]
        out.circuit = circuit_summary(
            model, ref, rh, c, float(fx.restored[rh]), float(fx.offsets[rh][c]), n_pairs=circuit_pairs
        )
        out.circuit.companions = {
            head_name(*lh): {
                "restored": round(float(fx.restored[lh]), 4),
                "needed": round(float(fx.needed[lh]), 4),
                "looks_at": offset_label(t),
                "mass": round(float(fx.offsets[lh][t]), 4),
            }
            for lh, t in out.companions.items()
        }
    return out


__all__ = [
    "OFFSETS",
    "THRESHOLD",
    "Circuit",
    "FlipBatch",
    "HeadEffects",
    "ReadHeads",
    "carrier_of",
    "carrier_positions",
    "circuit_summary",
    "detect_read_heads",
    "flip_batch",
    "head_effects",
    "name_by_effect",
    "offset_label",
    "offset_mass",
]
