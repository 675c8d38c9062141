"""Where each read looks: attention at read positions, last-write mass, read-head detection.

Everything runs on the hooked model through ``run_with_cache`` with a ``names_filter`` that
keeps only ``blocks.{l}.attn.hook_pattern``, one chunk of sequences at a time. Each chunk
is reduced to per-read quantities at once (the rows of the read positions, their mass by
key category, their top keys) and the cache is dropped, so memory is bounded by the
chunk, never by the data set.

Key categories (they partition a read's attention exactly: the masses sum to 1). Keys are
taken in instruction-bit pairs (an instruction at an even position and its bit):

* ``last_write``: the read's last write, its ``w`` token and its bit;
* ``earlier_write_same_bit`` / ``earlier_write_opposite_bit``: earlier writes whose bit
  agrees / disagrees with the last write's;
* ``ignores``: ``i`` pairs;
* ``reads``: earlier ``r`` pairs and the read's own ``r`` token (the query attends to itself);
* ``start``: the opening pair (positions 0 and 1, always a write), unless it *is* the last
  write. It is split off from the earlier writes because attention that drifts to the first
  tokens (an attention sink) is a failure mode of its own.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from ffinterp.errors import FFInterpError
from ffinterp.language import VOCAB, R, Reads, W, reads
from ffinterp.text import count

PATTERN = "blocks.{l}.attn.hook_pattern"
CATEGORIES = (
    "last_write",
    "earlier_write_same_bit",
    "earlier_write_opposite_bit",
    "ignores",
    "reads",
    "start",
)
LAST_WRITE, SAME, OPPOSITE, IGNORES, READS, START = range(len(CATEGORIES))
FUTURE = -1
START_TOKENS = 2  # the opening write's pair
DEFAULT_MEMORY_MB = 256.0  # budget for one chunk's cached patterns


# ---------------------------------------------------------------- labelled tensors


@dataclass(frozen=True)
class Labelled:
    """A tensor with named dimensions and optional labels per dimension.

    Results keep their numbers as plain tensors; this is the view that tables, plots and
    notebooks use, so ``sel(layer=1, head=0)`` reads like the question asked.
    """

    values: Tensor
    dims: tuple[str, ...]
    coords: dict[str, tuple] = field(default_factory=dict)
    name: str = "value"

    def __post_init__(self) -> None:
        if len(self.dims) != self.values.ndim:
            raise ValueError(
                f"{len(self.dims)} dims {self.dims} for a tensor of shape {tuple(self.values.shape)}"
            )
        for d, labels in self.coords.items():
            if d not in self.dims:
                raise ValueError(f"labels for unknown dim {d!r} (dims {self.dims})")
            if len(labels) != self.values.shape[self.dims.index(d)]:
                raise ValueError(
                    f"{len(labels)} labels for dim {d!r} of size {self.values.shape[self.dims.index(d)]}"
                )

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def labels(self, dim: str) -> tuple:
        return tuple(self.coords.get(dim, range(self.values.shape[self.dims.index(dim)])))

    def _index(self, dim: str, key) -> int:
        labels = self.labels(dim)
        if key in labels:
            return labels.index(key)
        if isinstance(key, int) and -len(labels) <= key < len(labels):
            return key % len(labels)
        raise KeyError(f"{key!r} is not a label or index of dim {dim!r} (labels {labels[:8]})")

    def sel(self, **keys) -> Labelled:
        """Pick one entry along each named dim (by label, or by index); those dims go away."""
        values, dims, coords = self.values, list(self.dims), dict(self.coords)
        for dim, key in keys.items():
            if dim not in dims:
                raise KeyError(f"no dim {dim!r} (dims {tuple(dims)})")
            axis = dims.index(dim)
            idx = Labelled(values, tuple(dims), coords)._index(dim, key)
            values = values.select(axis, idx)
            dims.pop(axis)
            coords.pop(dim, None)
        return Labelled(values, tuple(dims), coords, self.name)

    def mean(self, dim: str) -> Labelled:
        """Average over one dim."""
        axis = self.dims.index(dim)
        coords = {d: v for d, v in self.coords.items() if d != dim}
        return Labelled(
            self.values.float().mean(axis), self.dims[:axis] + self.dims[axis + 1 :], coords, self.name
        )

    def tolist(self):
        return self.values.tolist()

    def _repr_html_(self) -> str:
        v = self.values.detach().float().cpu()
        if v.ndim == 0:
            return f"<b>{html.escape(self.name)}</b> = {float(v):.4f}"
        if v.ndim == 1:
            head = "".join(f"<th>{html.escape(str(x))}</th>" for x in self.labels(self.dims[0]))
            body = "".join(f"<td>{x:.4f}</td>" for x in v.tolist())
            return (
                f"<table><caption>{html.escape(self.name)} by {self.dims[0]}</caption>"
                f"<tr>{head}</tr><tr>{body}</tr></table>"
            )
        if v.ndim == 2:
            d0, d1 = self.dims
            head = f"<th>{html.escape(d0)} \\ {html.escape(d1)}</th>" + "".join(
                f"<th>{html.escape(str(x))}</th>" for x in self.labels(d1)
            )
            rows = "".join(
                f"<tr><th>{html.escape(str(lab))}</th>" + "".join(f"<td>{x:.4f}</td>" for x in row) + "</tr>"
                for lab, row in zip(self.labels(d0), v.tolist())
            )
            return f"<table><caption>{html.escape(self.name)}</caption><tr>{head}</tr>{rows}</table>"
        return f"<pre>{html.escape(repr(self))}</pre>"

    def __repr__(self) -> str:
        dims = ", ".join(f"{d}={n}" for d, n in zip(self.dims, self.values.shape))
        return f"Labelled({self.name!r}, {dims})"

    def plot(self, **kwargs):
        """A heatmap (2-D) or bar chart (1-D) of the values."""
        import plotly.graph_objects as go

        from ffinterp.viz import heatmap

        v = self.values.detach().float().cpu()
        if v.ndim == 2:
            d0, d1 = self.dims
            kw = dict(title=self.name, xlabel=d1, ylabel=d0, text_fmt=".3f")
            kw.update(kwargs)
            return heatmap(v, self.labels(d1), self.labels(d0), **kw)
        if v.ndim == 1:
            fig = go.Figure(go.Bar(x=[str(x) for x in self.labels(self.dims[0])], y=v.tolist()))
            return fig.update_layout(
                title=self.name, xaxis_title=self.dims[0], template="plotly_white", **kwargs
            )
        raise ValueError(f"plot needs 1 or 2 dims; select some of {self.dims} first")


def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


# ---------------------------------------------------------------- categories


def key_categories(tokens: Int[Tensor, "batch seq"], rd: Reads) -> Int[Tensor, "reads seq"]:
    """The category (index into :data:`CATEGORIES`) of every key for every read; keys after
    the read (which causal attention cannot see) are ``-1``."""
    seq = tokens.shape[-1]
    rows = tokens[rd.batch]
    k = torch.arange(seq, device=tokens.device)
    pair = k - k % 2
    instr = rows[:, pair]
    bit_of_pair = rows[:, (pair + 1).clamp_max(seq - 1)]
    cat = torch.full_like(rows, IGNORES)
    cat[instr == R] = READS
    is_w = instr == W
    same = bit_of_pair == rd.bit[:, None]
    cat[is_w & same] = SAME
    cat[is_w & ~same] = OPPOSITE
    cat[:, :START_TOKENS] = START
    cat[pair[None, :] == rd.write_pos[:, None]] = LAST_WRITE
    cat[k[None, :] > rd.pos[:, None]] = FUTURE
    return cat


def category_mass(
    rows: Float[Tensor, "reads layer head key"], cat: Int[Tensor, "reads key"]
) -> Float[Tensor, "reads layer head category"]:
    """Sum each attention row over the keys of each category."""
    onehot = F.one_hot(cat.clamp_min(0), len(CATEGORIES)).to(rows.dtype) * (cat >= 0)[..., None].to(
        rows.dtype
    )
    return torch.einsum("rlhk,rkc->rlhc", rows, onehot)


# ---------------------------------------------------------------- extraction


def _check_model(model) -> None:
    if getattr(model, "hooked", None) is None:
        name = getattr(model, "name", type(model).__name__)
        raise FFInterpError(f"{name}: no attention to analyse (an LSTM has no hooked view)")


def auto_batch_size(model, seq_len: int, memory_mb: float = DEFAULT_MEMORY_MB) -> int:
    """Sequences per chunk so that one chunk's cached patterns fit in ``memory_mb``."""
    per_seq = model.n_layers * model.n_heads * seq_len * seq_len * 4
    return max(1, int(memory_mb * 2**20 // per_seq))


def _chunks(
    tokens: Tensor | Iterable, batch_size: int | None, model, memory_mb: float
) -> Iterator[Int[Tensor, "batch seq"]]:
    if isinstance(tokens, (str, list, tuple)) and (not tokens or isinstance(tokens[0], str)):
        from ffinterp.data import as_tokens

        tokens = as_tokens(tokens)
    if isinstance(tokens, Tensor):
        t = tokens[None] if tokens.ndim == 1 else tokens
        bs = batch_size or auto_batch_size(model, t.shape[-1], memory_mb)
        yield from t.split(bs)
        return
    for item in tokens:  # an iterable of batches, e.g. data.iter_batches (offset, batch)
        batch = item[1] if isinstance(item, tuple) else item
        batch = torch.as_tensor(batch)
        batch = batch[None] if batch.ndim == 1 else batch
        if batch_size:
            yield from batch.split(batch_size)
        else:
            yield from batch.split(auto_batch_size(model, batch.shape[-1], memory_mb))


def read_rows(
    model, tokens: Int[Tensor, "batch seq"], rd: Reads | None = None
) -> Float[Tensor, "reads layer head key"]:
    """Every head's attention row at every read of one chunk (float32, on the model's device).

    One forward pass with ``run_with_cache`` that keeps only the attention patterns.
    """
    _check_model(model)
    tokens = torch.as_tensor(tokens)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    rd = reads(tokens) if rd is None else rd
    if tokens.shape[-1] > model.cfg.block_size:
        raise FFInterpError(
            f"sequences of length {tokens.shape[-1]} exceed the model's block_size {model.cfg.block_size}"
        )
    names = {PATTERN.format(l=l) for l in range(model.n_layers)}
    dev = model.device
    with torch.inference_mode():
        _, cache = model.hooked.run_with_cache(tokens.to(dev), names_filter=lambda n: n in names)
        b, p = rd.batch.to(dev), rd.pos.to(dev)
        rows = torch.stack([cache[PATTERN.format(l=l)][b, :, p, :].float() for l in range(model.n_layers)], 1)
        del cache
    return rows


def full_patterns(model, tokens: Int[Tensor, "batch seq"]) -> Float[Tensor, "batch layer head query key"]:
    """Whole attention patterns of a few sequences (for heatmaps; memory grows as T^2)."""
    _check_model(model)
    tokens = torch.as_tensor(tokens)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    names = {PATTERN.format(l=l) for l in range(model.n_layers)}
    with torch.inference_mode():
        _, cache = model.hooked.run_with_cache(tokens.to(model.device), names_filter=lambda n: n in names)
        out = torch.stack([cache[PATTERN.format(l=l)].float().cpu() for l in range(model.n_layers)], 1)
    return out


@dataclass
class ReadAttention:
    """Per-read attention of every head: mass by key category, top keys, optionally rows.

    Reads are flattened as in :class:`~ffinterp.language.Reads`; ``reads.batch`` indexes
    ``tokens``. ``rows`` (the full attention rows at read positions) is kept only on
    request, since it grows as reads x T.
    """

    tokens: Int[Tensor, "batch seq"]
    reads: Reads
    mass: Float[Tensor, "reads layer head category"]
    top_pos: Int[Tensor, "reads layer head k"]
    top_mass: Float[Tensor, "reads layer head k"]
    rows: Float[Tensor, "reads layer head key"] | None = None
    read_heads: list[tuple[int, int]] = field(default_factory=list)
    categories: tuple[str, ...] = CATEGORIES

    def __len__(self) -> int:
        return len(self.reads)

    @property
    def n_layers(self) -> int:
        return self.mass.shape[1]

    @property
    def n_heads(self) -> int:
        return self.mass.shape[2]

    @property
    def last_write_mass(self) -> Float[Tensor, "reads layer head"]:
        """Attention from each read to its last write (its ``w`` token plus its bit)."""
        return self.mass[..., LAST_WRITE]

    @property
    def top_token(self) -> Int[Tensor, "reads layer head k"]:
        """Token id at each top position (-1 where a read had fewer than k keys)."""
        tok = self.tokens[self.reads.batch[:, None, None, None], self.top_pos.clamp_min(0)]
        return tok.masked_fill(self.top_pos < 0, -1)

    @property
    def top_distance(self) -> Int[Tensor, "reads layer head k"]:
        """Read position minus key position (0: the read's own token)."""
        return self.reads.pos[:, None, None, None] - self.top_pos

    def read_labels(self) -> tuple[str, ...]:
        return tuple(f"seq{int(b)}@{int(p)}" for b, p in zip(self.reads.batch, self.reads.pos))

    def labelled(self, what: str = "last_write_mass") -> Labelled:
        """``last_write_mass`` [read, layer, head] or ``mass`` [read, layer, head, category]."""
        coords = {
            "read": self.read_labels(),
            "layer": tuple(range(self.n_layers)),
            "head": tuple(range(self.n_heads)),
        }
        if what == "last_write_mass":
            return Labelled(self.last_write_mass, ("read", "layer", "head"), coords, "last_write_mass")
        if what == "mass":
            coords["category"] = self.categories
            return Labelled(self.mass, ("read", "layer", "head", "category"), coords, "attention mass")
        raise ValueError(f"unknown quantity {what!r} (last_write_mass or mass)")

    def head_summary(self) -> Labelled:
        """Mean mass per head and category over all reads: [head, category]."""
        mean = self.mass.float().mean(0).reshape(self.n_layers * self.n_heads, len(self.categories))
        names = tuple(head_name(l, h) for l in range(self.n_layers) for h in range(self.n_heads))
        return Labelled(
            mean, ("head", "category"), {"head": names, "category": self.categories}, "mean mass by category"
        )

    def categories_of(self, read: int, layer: int, head: int) -> dict[str, float]:
        """One read's attention split by category (the values sum to 1)."""
        return {c: float(v) for c, v in zip(self.categories, self.mass[read, layer, head])}

    def top(self, read: int, layer: int, head: int) -> list[dict]:
        """The most-attended keys of one head at one read: position, token, mass, distance."""
        pos, mass = self.top_pos[read, layer, head], self.top_mass[read, layer, head]
        b, t = int(self.reads.batch[read]), int(self.reads.pos[read])
        return [
            {"pos": int(k), "token": VOCAB[int(self.tokens[b, k])], "mass": float(m), "distance": t - int(k)}
            for k, m in zip(pos, mass)
            if k >= 0
        ]

    def plot(self, read: int = 0, head: tuple[int, int] | None = None):
        """Bars of every head's last-write mass at one read and, when rows were kept, the
        chosen head's attention over keys with the last write highlighted."""
        from ffinterp.viz import read_bars

        if not len(self):
            raise ValueError("no reads to plot")
        lw = self.last_write_mass[read]
        if head is None:
            head = self.read_heads[0] if self.read_heads else divmod(int(lw.argmax()), self.n_heads)
        b = int(self.reads.batch[read])
        row = self.rows[read, head[0], head[1]] if self.rows is not None else None
        return read_bars(
            lw,
            row,
            self.tokens[b],
            int(self.reads.pos[read]),
            int(self.reads.write_pos[read]),
            head=tuple(head),
            read_heads=self.read_heads,
        )

    def _repr_html_(self) -> str:
        summary = self.head_summary()
        cap = (
            f"{count(len(self), 'read')} in {count(len(self.tokens), 'sequence')} "
            f"of length {self.tokens.shape[-1]}: "
            "mean attention mass by key category"
        )
        v = summary.values.tolist()
        head = "<th>head</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in self.categories)
        body = "".join(
            f"<tr><th>{name}{' ★' if divmod(k, self.n_heads) in set(self.read_heads) else ''}</th>"
            + "".join(f"<td>{x:.3f}</td>" for x in row)
            + "</tr>"
            for k, (name, row) in enumerate(zip(summary.labels("head"), v))
        )
        return f"<table><caption>{html.escape(cap)}</caption><tr>{head}</tr>{body}</table>"

    def __repr__(self) -> str:
        return (
            f"ReadAttention(reads={len(self)}, sequences={len(self.tokens)}, layers={self.n_layers}, "
            f"heads={self.n_heads}, rows={'kept' if self.rows is not None else 'dropped'})"
        )

    @staticmethod
    def concat(parts: Sequence[ReadAttention]) -> ReadAttention:
        """Join chunk results, renumbering ``reads.batch`` into the joined ``tokens``."""
        if not parts:
            raise ValueError("nothing to concatenate")
        offsets, n = [], 0
        for p in parts:
            offsets.append(n)
            n += len(p.tokens)
        rd = Reads(
            *(
                torch.cat(ts)
                for ts in zip(
                    *[
                        (p.reads.batch + off, p.reads.pos, p.reads.bit, p.reads.write_pos)
                        for p, off in zip(parts, offsets)
                    ]
                )
            )
        )
        rows = torch.cat([p.rows for p in parts]) if all(p.rows is not None for p in parts) else None
        return ReadAttention(
            tokens=torch.cat([p.tokens for p in parts]),
            reads=rd,
            mass=torch.cat([p.mass for p in parts]),
            top_pos=torch.cat([p.top_pos for p in parts]),
            top_mass=torch.cat([p.top_mass for p in parts]),
            rows=rows,
            read_heads=parts[0].read_heads,
        )


def _reduce_chunk(model, tokens: Tensor, top_k: int, keep_rows: bool) -> ReadAttention:
    tokens = tokens.long()
    rd = reads(tokens)
    rows = read_rows(model, tokens, rd)
    cat = key_categories(tokens.to(rows.device), rd.to(rows.device))
    mass = category_mass(rows, cat)
    # Keys after the read cannot be attended; rank them below every real key and report
    # them (only when a read has fewer than k keys) as position -1 with mass 0.
    k = min(top_k, tokens.shape[-1])
    ranked = rows.masked_fill((cat < 0)[:, None, None, :], -1.0)
    top_mass, top_pos = ranked.topk(k, dim=-1)
    top_pos = top_pos.masked_fill(top_mass < 0, -1)
    top_mass = top_mass.clamp_min(0.0)
    return ReadAttention(
        tokens=tokens.cpu(),
        reads=rd,
        mass=mass.cpu(),
        top_pos=top_pos.cpu(),
        top_mass=top_mass.cpu(),
        rows=rows.cpu() if keep_rows else None,
    )


def iter_read_attention(
    model,
    tokens: Int[Tensor, "batch seq"] | Iterable,
    *,
    batch_size: int | None = None,
    top_k: int = 3,
    keep_rows: bool = False,
    memory_mb: float = DEFAULT_MEMORY_MB,
) -> Iterator[ReadAttention]:
    """Stream :class:`ReadAttention` chunk by chunk (each refers to its own chunk's tokens).

    ``tokens`` is a batch, texts, or any iterable of batches (e.g.
    :func:`ffinterp.data.iter_batches`), so a data set never has to be in memory at once.
    """
    _check_model(model)
    for chunk in _chunks(tokens, batch_size, model, memory_mb):
        yield _reduce_chunk(model, chunk, top_k, keep_rows)


def read_attention(
    model,
    tokens: Int[Tensor, "batch seq"] | Iterable,
    *,
    batch_size: int | None = None,
    top_k: int = 3,
    keep_rows: bool = True,
    read_heads: Sequence[tuple[int, int]] = (),
    memory_mb: float = DEFAULT_MEMORY_MB,
) -> ReadAttention:
    """Attention at every read of ``tokens``, joined into one result.

    ``keep_rows`` keeps the full rows (reads x layers x heads x T floats): right for a few
    sequences, wrong for a data set; use :func:`iter_read_attention` or
    :func:`last_write_mass` there.
    """
    parts = list(
        iter_read_attention(
            model, tokens, batch_size=batch_size, top_k=top_k, keep_rows=keep_rows, memory_mb=memory_mb
        )
    )
    out = ReadAttention.concat(parts)
    out.read_heads = [tuple(h) for h in read_heads]
    return out


def last_write_mass(
    model,
    tokens: Int[Tensor, "batch seq"] | Iterable,
    *,
    batch_size: int | None = None,
    memory_mb: float = DEFAULT_MEMORY_MB,
) -> Float[Tensor, "reads layer head"]:
    """Only ``last_write_mass`` for every read, streaming: the cheapest extractor (its
    output is reads x layers x heads floats; nothing else outlives a chunk)."""
    _check_model(model)
    out = []
    for chunk in _chunks(tokens, batch_size, model, memory_mb):
        chunk = chunk.long()
        rd = reads(chunk)
        rows = read_rows(model, chunk, rd)
        idx = torch.arange(len(rd), device=rows.device)
        wp = rd.write_pos.to(rows.device)
        out.append((rows[idx, :, :, wp] + rows[idx, :, :, wp + 1]).cpu())
        del rows
    if not out:
        return torch.zeros(0, model.n_layers, model.n_heads)
    return torch.cat(out)


# ---------------------------------------------------------------- read-head detection


def name_heads(
    score: Float[Tensor, "layer head"], threshold: float = 0.5, top: int | None = None
) -> tuple[list[tuple[int, int]], bool]:
    """The rule that names read heads from per-head scores, in the spirit of TransformerLens's
    ``detect_head``: every head scoring at least ``threshold`` (best first), or the ``top``
    best when given. With no head over the threshold the single best is named, and the
    second value (whether the threshold was met) is False."""
    n_heads = score.shape[1]
    flat = score.flatten().float()
    order = [int(k) for k in flat.argsort(descending=True)]
    if top is not None:
        picked = order[:top]
        passed = all(float(flat[k]) >= threshold for k in picked)
    else:
        picked = [k for k in order if float(flat[k]) >= threshold]
        passed = bool(picked)
        picked = picked or order[:1]
    return [divmod(k, n_heads) for k in picked], passed


def _resolve_set(spec, n: int, seq_len: int) -> tuple[Tensor, str]:
    from ffinterp.data import eval_set, eval_set_spec

    if isinstance(spec, str):
        s = eval_set_spec(spec)
        return eval_set(spec, n, seq_len), f"{spec} FFL({s.p_i}), {n}x{seq_len}"
    t = torch.as_tensor(spec)
    t = t[None] if t.ndim == 1 else t
    return t, f"custom, {len(t)}x{t.shape[-1]}"


def head_scores(
    model,
    tokens: Int[Tensor, "batch seq"] | Iterable,
    *,
    batch_size: int | None = None,
    skip_opening: bool = True,
) -> tuple[Float[Tensor, "layer head"], int]:
    """Mean ``last_write_mass`` of every head over reads (streaming), and the read count.

    ``skip_opening`` leaves out reads whose last write is the opening pair: there a head
    that always attends to the first tokens (an attention sink) looks like a read head,
    which on sparse sets (where most reads only have the opening write) would name it.
    """
    total = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64)
    n = 0
    for chunk in _chunks(tokens, batch_size, model, DEFAULT_MEMORY_MB):
        chunk = chunk.long()
        m = last_write_mass(model, chunk, batch_size=len(chunk))
        if skip_opening:
            m = m[reads(chunk).write_pos >= START_TOKENS]
        total += m.double().sum(0)
        n += len(m)
    return (total / max(n, 1)).float(), n


@dataclass
class ReadHeads:
    """Per-head read-head scores on a reference set and a check set, and the heads named.

    A head's score is its mean ``last_write_mass`` over the reads of a set (those whose last
    write is not the opening pair; see :func:`head_scores`). ``stable`` says
    whether the rule names the same heads from the check set's scores.
    """

    score: Float[Tensor, "layer head"]
    heads: list[tuple[int, int]]
    threshold: float
    passed: bool
    reference: str
    n_reads: int
    check_score: Float[Tensor, "layer head"] | None = None
    check: str | None = None
    n_check_reads: int = 0
    top: int | None = None

    @property
    def check_heads(self) -> list[tuple[int, int]] | None:
        if self.check_score is None:
            return None
        return name_heads(self.check_score, self.threshold, self.top)[0]

    @property
    def stable(self) -> bool | None:
        """True when the check set names the same read heads (None without a check set, or
        when it had no reads to score)."""
        ch = self.check_heads
        if ch is None or self.n_check_reads == 0:
            return None
        return set(ch) == set(self.heads)

    def labelled(self) -> Labelled:
        coords = {"layer": tuple(range(self.score.shape[0])), "head": tuple(range(self.score.shape[1]))}
        return Labelled(self.score, ("layer", "head"), coords, f"read-head score ({self.reference})")

    def rows(self) -> list[dict]:
        """One dict per head, best reference score first."""
        out = []
        named = set(self.heads)
        n_heads = self.score.shape[1]
        for k in self.score.flatten().argsort(descending=True).tolist():
            l, h = divmod(k, n_heads)
            out.append(
                {
                    "head": head_name(l, h),
                    "score": float(self.score[l, h]),
                    "check_score": float(self.check_score[l, h])
                    if self.check_score is not None
                    else math.nan,
                    "read_head": (l, h) in named,
                }
            )
        return out

    def table(self, limit: int | None = None) -> str:
        """A plain-text table (the CLI prints it)."""
        chk = self.check or "-"
        lines = [
            f"read heads: {', '.join(head_name(*h) for h in self.heads)}"
            + ("" if self.passed else f" (best head; none reached {self.threshold})")
            + (f"; stable on check set: {'yes' if self.stable else 'no'}" if self.stable is not None else ""),
            "score = mean last_write_mass over reads; "
            f"reference {self.reference} ({count(self.n_reads, 'read')})"
            + (
                f", check {chk} ({count(self.n_check_reads, 'read')})" if self.check_score is not None else ""
            ),
            f"{'head':<8}{'reference':>10}{'check':>10}  read head",
        ]
        for r in self.rows()[:limit]:
            chk_s = f"{r['check_score']:>10.4f}" if not math.isnan(r["check_score"]) else f"{'-':>10}"
            lines.append(f"{r['head']:<8}{r['score']:>10.4f}{chk_s}  {'*' if r['read_head'] else ''}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        cap = html.escape(self.table().splitlines()[0])
        head = "<tr><th>head</th><th>reference</th><th>check</th><th>read head</th></tr>"
        body = "".join(
            f"<tr><th>{r['head']}</th><td>{r['score']:.4f}</td><td>{r['check_score']:.4f}</td>"
            f"<td>{'★' if r['read_head'] else ''}</td></tr>"
            for r in self.rows()
        )
        note = html.escape(self.table().splitlines()[1])
        return f"<table><caption>{cap}<br><small>{note}</small></caption>{head}{body}</table>"

    def plot(self):
        """Reference and check scores side by side, read heads in red."""
        import plotly.graph_objects as go

        from ffinterp.viz import HIGHLIGHT

        rows = sorted(self.rows(), key=lambda r: r["head"])
        names = [r["head"] for r in rows]
        fig = go.Figure(
            go.Bar(
                name=f"reference: {self.reference}",
                x=names,
                y=[r["score"] for r in rows],
                marker_color=[HIGHLIGHT if r["read_head"] else "#1f77b4" for r in rows],
            )
        )
        if self.check_score is not None:
            fig.add_trace(go.Bar(name=f"check: {self.check}", x=names, y=[r["check_score"] for r in rows]))
        return fig.update_layout(
            barmode="group",
            title="read-head score: mean last_write_mass over reads",
            yaxis=dict(range=[0, 1.05], title="score"),
            template="plotly_white",
        )


def detect_read_heads(
    model,
    reference: str | Tensor = "in",
    check: str | Tensor | None = "sparse",
    *,
    n: int = 128,
    seq_len: int | None = None,
    threshold: float = 0.5,
    top: int | None = None,
    batch_size: int | None = None,
) -> ReadHeads:
    """Score every head by mean ``last_write_mass`` on ``reference`` and name the read heads
    (:func:`name_heads`); score them again on ``check`` to show the naming is stable.

    Sets are standard set names (``in``, ``sparse``, ``dense``: the first ``n`` sequences
    at ``seq_len``, default the model's block size) or token batches.
    """
    _check_model(model)
    seq_len = seq_len or model.cfg.block_size
    ref_tokens, ref_name = _resolve_set(reference, n, seq_len)
    score, n_reads = head_scores(model, ref_tokens, batch_size=batch_size)
    heads, passed = name_heads(score, threshold, top)
    out = ReadHeads(score, heads, threshold, passed, ref_name, n_reads, top=top)
    if check is not None:
        chk_tokens, chk_name = _resolve_set(check, n, seq_len)
        out.check_score, out.n_check_reads = head_scores(model, chk_tokens, batch_size=batch_size)
        out.check = chk_name
    return out


__all__ = [
    "CATEGORIES",
    "Labelled",
    "ReadAttention",
    "ReadHeads",
    "category_mass",
    "detect_read_heads",
    "full_patterns",
    "head_scores",
    "iter_read_attention",
    "key_categories",
    "last_write_mass",
    "name_heads",
    "read_attention",
    "read_rows",
]
