"""Where each read looks: attention at read positions, by key category and on the carrier.

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
    """Every head's attention row at every read (float32, on the model's device).

    ``run_with_cache`` keeps only the attention patterns, over passes of
    :func:`auto_batch_size` rows, so a large batch costs only its output in memory.
    """
    _check_model(model)
    tokens = torch.as_tensor(tokens)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    rd = reads(tokens) if rd is None else rd
    t = tokens.shape[-1]
    if t > model.cfg.block_size:
        raise FFInterpError(f"sequences of length {t} exceed the model's block_size {model.cfg.block_size}")
    dev = model.device
    out = torch.empty(len(rd), model.n_layers, model.n_heads, t, device=dev)
    step = auto_batch_size(model, t)
    with torch.inference_mode():
        for lo in range(0, len(tokens), step):
            mine = ((rd.batch >= lo) & (rd.batch < lo + step)).nonzero().squeeze(1)
            if len(mine):
                patterns = _patterns(model, tokens[lo : lo + step])
                b, p = (rd.batch[mine] - lo).to(dev), rd.pos[mine].to(dev)
                out[mine.to(dev)] = torch.stack([pat[b, :, p, :].float() for pat in patterns], 1)
                del patterns
    return out


def full_patterns(model, tokens: Int[Tensor, "batch seq"]) -> Float[Tensor, "batch layer head query key"]:
    """Whole attention patterns of a few sequences (for heatmaps; the output grows as T^2,
    the passes that fill it by :func:`auto_batch_size` rows)."""
    _check_model(model)
    tokens = torch.as_tensor(tokens)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    b, t = tokens.shape
    out = torch.empty(b, model.n_layers, model.n_heads, t, t)
    step = auto_batch_size(model, t)
    with torch.inference_mode():
        for lo in range(0, b, step):
            out[lo : lo + step] = torch.stack(
                [p.float().cpu() for p in _patterns(model, tokens[lo : lo + step])], 1
            )
    return out


def _patterns(model, tokens: Int[Tensor, "batch seq"]) -> list[Float[Tensor, "batch head query key"]]:
    """Each layer's attention pattern from one ``run_with_cache`` pass that keeps nothing else."""
    names = {PATTERN.format(l=l) for l in range(model.n_layers)}
    _, cache = model.hooked.run_with_cache(tokens.to(model.device), names_filter=lambda n: n in names)
    return [cache[PATTERN.format(l=l)] for l in range(model.n_layers)]


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
    carrier: int | None = None
    carrier_mass: Float[Tensor, "reads layer head"] | None = None

    def __len__(self) -> int:
        return len(self.reads)

    @property
    def n_layers(self) -> int:
        return self.mass.shape[1]

    @property
    def n_heads(self) -> int:
        return self.mass.shape[2]

    @property
    def write_mass(self) -> Float[Tensor, "reads layer head"]:
        """Attention from each read to its last write's ``w`` token plus its bit."""
        return self.mass[..., LAST_WRITE]

    @property
    def last_write_mass(self) -> Float[Tensor, "reads layer head"]:
        """Attention from each read to the carrier of its last write (the key the read head
        takes the bit from: :func:`ffinterp.analysis.readheads.detect_read_heads` finds it);
        without a carrier, :attr:`write_mass`."""
        return self.write_mass if self.carrier_mass is None else self.carrier_mass

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
            carrier=parts[0].carrier,
            carrier_mass=None if parts[0].carrier is None else torch.cat([p.carrier_mass for p in parts]),
        )


def carrier_mass(
    rows: Float[Tensor, "reads layer head key"], rd: Reads, carrier: int
) -> Float[Tensor, "reads layer head"]:
    """Each read's attention on the carrier of its last write: ``write_pos + carrier``, or the
    read itself when that would come after it."""
    idx = torch.arange(len(rd), device=rows.device)
    pos = torch.minimum(rd.write_pos + carrier, rd.pos).to(rows.device)
    return rows[idx, :, :, pos]


def _reduce_chunk(
    model, tokens: Tensor, top_k: int, keep_rows: bool, carrier: int | None = None
) -> ReadAttention:
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
        carrier=carrier,
        carrier_mass=None if carrier is None else carrier_mass(rows, rd.to(rows.device), carrier).cpu(),
    )


def iter_read_attention(
    model,
    tokens: Int[Tensor, "batch seq"] | Iterable,
    *,
    batch_size: int | None = None,
    top_k: int = 3,
    keep_rows: bool = False,
    memory_mb: float = DEFAULT_MEMORY_MB,
    carrier: int | None = None,
) -> Iterator[ReadAttention]:
    """Stream :class:`ReadAttention` chunk by chunk (each refers to its own chunk's tokens).

    ``tokens`` is a batch, texts, or any iterable of batches (e.g.
    :func:`ffinterp.data.iter_batches`), so a data set never has to be in memory at once.
    """
    _check_model(model)
    for chunk in _chunks(tokens, batch_size, model, memory_mb):
        yield _reduce_chunk(model, chunk, top_k, keep_rows, carrier)


def read_attention(
    model,
    tokens: Int[Tensor, "batch seq"] | Iterable,
    *,
    batch_size: int | None = None,
    top_k: int = 3,
    keep_rows: bool = True,
    read_heads: Sequence[tuple[int, int]] = (),
    memory_mb: float = DEFAULT_MEMORY_MB,
    carrier: int | None = None,
) -> ReadAttention:
    """Attention at every read of ``tokens``, joined into one result.

    ``keep_rows`` keeps the full rows (reads x layers x heads x T floats): right for a few
    sequences, wrong for a data set; use :func:`iter_read_attention` or
    :func:`last_write_mass` there. ``carrier`` (from ``detect_read_heads(...).carrier``) makes
    ``last_write_mass`` the mass on the carrier of the last write.
    """
    parts = list(
        iter_read_attention(
            model,
            tokens,
            batch_size=batch_size,
            top_k=top_k,
            keep_rows=keep_rows,
            memory_mb=memory_mb,
            carrier=carrier,
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
    carrier: int | None = None,
) -> Float[Tensor, "reads layer head"]:
    """Only ``last_write_mass`` for every read, streaming: the cheapest extractor (its
    output is reads x layers x heads floats; nothing else outlives a chunk). With ``carrier``
    the mass on the carrier of the last write, else on its ``w`` token and bit."""
    _check_model(model)
    out = []
    for chunk in _chunks(tokens, batch_size, model, memory_mb):
        chunk = chunk.long()
        rd = reads(chunk)
        rows = read_rows(model, chunk, rd)
        if carrier is not None:
            out.append(carrier_mass(rows, rd, carrier).cpu())
        else:
            idx = torch.arange(len(rd), device=rows.device)
            wp = rd.write_pos.to(rows.device)
            out.append((rows[idx, :, :, wp] + rows[idx, :, :, wp + 1]).cpu())
        del rows
    if not out:
        return torch.zeros(0, model.n_layers, model.n_heads)
    return torch.cat(out)


__all__ = [
    "CATEGORIES",
    "Labelled",
    "ReadAttention",
    "carrier_mass",
    "category_mass",
    "full_patterns",
    "iter_read_attention",
    "key_categories",
    "last_write_mass",
    "read_attention",
    "read_rows",
]
