"""Plotly figures for attention (and a generic heatmap), and export to HTML, PNG and SVG.

Figures are plain ``plotly.graph_objects.Figure`` objects, so they show inline in Jupyter.
:func:`save_figure` picks the format from the suffix: ``.html`` is self-contained (plotly.js
embedded, no network needed to open it); ``.png``/``.svg``/``.pdf`` go through kaleido,
which drives a headless chromium (Debian's ``chromium`` package; ``scripts/setup.sh``
installs it). Every file is written to a temporary name and renamed, so a failed export
never leaves half a file. Other modules (patching, the glitch report) reuse
:func:`heatmap`, :func:`save_figure` and :func:`figures_html`.
"""

from __future__ import annotations

import contextlib
import html
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from plotly.subplots import make_subplots
from torch import Tensor

from ffinterp.errors import FFInterpError
from ffinterp.language import VOCAB

HTML_SUFFIXES = (".html", ".htm")
IMAGE_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg", ".webp")
HIGHLIGHT = "#d62728"  # the last write
MUTED = "#9aa5b1"
ACCENT = "#1f77b4"
PATTERN_SCALE = "Blues"


class ExportError(FFInterpError):
    """A figure that could not be written (unknown suffix, no chromium for kaleido...)."""


# ---------------------------------------------------------------- labels


def token_labels(tokens: Int[Tensor, " seq"]) -> list[str]:
    """``"12 w"``-style axis labels: position then token, unique so plotly keeps their order."""
    return [f"{k} {VOCAB[int(t)]}" for k, t in enumerate(torch.as_tensor(tokens).tolist())]


def causal_z(pattern: Float[Tensor, "query key"], decimals: int = 4) -> list:
    """Pattern values for plotly: rounded (a 512 x 512 head stays ~1 MB of HTML) and NaN
    above the diagonal, which causal attention cannot reach, so it shows blank."""
    z = torch.as_tensor(pattern).detach().float().cpu()
    z = torch.round(z, decimals=decimals)
    q, k = z.shape[-2:]
    future = torch.ones(q, k, dtype=torch.bool).triu(1)
    return z.masked_fill(future, float("nan")).tolist()


# ---------------------------------------------------------------- generic


def heatmap(
    z: Float[Tensor, "rows cols"],
    x: Sequence | None = None,
    y: Sequence | None = None,
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    zmin: float | None = None,
    zmax: float | None = None,
    colorscale: str = PATTERN_SCALE,
    zmid: float | None = None,
    text_fmt: str | None = None,
    colorbar_title: str = "",
    hover: str = "%{y} → %{x}: %{z:.4f}",
) -> go.Figure:
    """A labelled heatmap with row 0 at the top; ``text_fmt`` (e.g. ``".2f"``) prints values.

    The shared building block for attention patterns, head tables and patching results.
    """
    z = torch.as_tensor(z).detach().float().cpu()
    rows, cols = z.shape
    x = [str(v) for v in (x if x is not None else range(cols))]
    y = [str(v) for v in (y if y is not None else range(rows))]
    trace = go.Heatmap(
        z=z.tolist(),
        x=x,
        y=y,
        zmin=zmin,
        zmax=zmax,
        zmid=zmid,
        colorscale=colorscale,
        colorbar=dict(title=colorbar_title) if colorbar_title else None,
        hovertemplate=hover + "<extra></extra>",
    )
    if text_fmt is not None:
        trace.update(text=[[format(v, text_fmt) for v in row] for row in z.tolist()], texttemplate="%{text}")
    fig = go.Figure(trace)
    fig.update_layout(
        title=title or None,
        xaxis=dict(title=xlabel or None, type="category"),
        yaxis=dict(title=ylabel or None, type="category", autorange="reversed"),
        margin=dict(l=60, r=20, t=50 if title else 20, b=50),
        template="plotly_white",
    )
    return fig


# ---------------------------------------------------------------- attention


def pattern_figure(
    pattern: Float[Tensor, "query key"],
    tokens: Int[Tensor, " seq"],
    *,
    layer: int | None = None,
    head: int | None = None,
    reads: Sequence[tuple[int, int]] = (),
    title: str | None = None,
) -> go.Figure:
    """One head's full attention pattern, both axes labelled with position and token.

    ``reads`` are (read position, last-write position) pairs; their last-write keys are
    circled so a glance shows whether the head found them.
    """
    labels = token_labels(tokens)
    name = f"L{layer}H{head}" if layer is not None and head is not None else "attention"
    fig = heatmap(
        torch.zeros(len(labels), len(labels)),
        labels,
        labels,
        title=title if title is not None else f"{name}: attention pattern",
        xlabel="key (attended position)",
        ylabel="query position",
        zmin=0.0,
        zmax=1.0,
        colorbar_title="attention",
    )
    fig.data[0].z = causal_z(pattern)
    fig.update_xaxes(showgrid=False)
    fig.update_yaxes(showgrid=False)
    if reads:
        xs, ys = [], []
        for r, w in reads:
            for k in (w, w + 1):
                xs.append(labels[k])
                ys.append(labels[r])
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="markers",
                marker=dict(symbol="circle-open", size=10, color=HIGHLIGHT, line=dict(width=2)),
                name="last write of each read",
                hoverinfo="skip",
            )
        )
        fig.update_layout(legend=dict(orientation="h", y=-0.15))
    n = len(labels)
    side = min(1100, max(420, 14 * n + 150))
    fig.update_layout(width=side + 80, height=side)
    return fig


def pattern_grid(
    patterns: Float[Tensor, "layer head query key"],
    tokens: Int[Tensor, " seq"],
    *,
    read_heads: Sequence[tuple[int, int]] = (),
    title: str = "attention patterns of all heads",
    cell: int | None = None,
) -> go.Figure:
    """Every head's pattern in a layers x heads grid, read heads marked with a star.

    ``cell`` (pixels per head) defaults to about one pixel per token, within 260..600.
    """
    patterns = torch.as_tensor(patterns).detach().float().cpu()
    n_layer, n_head, seq = patterns.shape[0], patterns.shape[1], patterns.shape[-1]
    cell = cell or min(600, max(260, seq))
    starred = set(map(tuple, read_heads))
    titles = [
        f"L{l}H{h}" + (" ★ read head" if (l, h) in starred else "")
        for l in range(n_layer)
        for h in range(n_head)
    ]
    fig = make_subplots(
        rows=n_layer,
        cols=n_head,
        subplot_titles=titles,
        horizontal_spacing=0.03,
        vertical_spacing=0.08 / max(1, n_layer - 1) if n_layer > 1 else 0.0,
    )
    for l in range(n_layer):
        for h in range(n_head):
            fig.add_trace(
                go.Heatmap(
                    z=causal_z(patterns[l, h]),
                    coloraxis="coloraxis",
                    hovertemplate=f"L{l}H{h} " + "query %{y} → key %{x}: %{z:.4f}<extra></extra>",
                ),
                row=l + 1,
                col=h + 1,
            )
    # Positions as numbers (tokens are in the single-head figure): keeps the HTML small.
    fig.update_xaxes(showticklabels=True, showgrid=False, zeroline=False, nticks=5)
    fig.update_yaxes(autorange="reversed", showticklabels=True, showgrid=False, zeroline=False, nticks=5)
    for l in range(n_layer):  # every panel is query (rows) x key (columns); label the outer ones
        fig.update_yaxes(title_text="query position", row=l + 1, col=1)
    for h in range(n_head):
        fig.update_xaxes(title_text="key position", row=n_layer, col=h + 1)
    fig.update_layout(
        title=title,
        coloraxis=dict(colorscale=PATTERN_SCALE, cmin=0.0, cmax=1.0, colorbar=dict(title="attention")),
        width=min(2400, cell * n_head + 160),
        height=min(2400, cell * n_layer + 100),
        template="plotly_white",
        margin=dict(l=30, r=30, t=80, b=30),
    )
    return fig


def head_bars(
    values: Float[Tensor, "layer head"],
    *,
    read_heads: Sequence[tuple[int, int]] = (),
    title: str = "last-write mass per head",
    yaxis: str = "last_write_mass",
) -> go.Figure:
    """One bar per head (``L0H0``, ``L0H1``...), read heads highlighted."""
    values = torch.as_tensor(values).detach().float().cpu()
    n_layer, n_head = values.shape
    names = [f"L{l}H{h}" for l in range(n_layer) for h in range(n_head)]
    starred = set(map(tuple, read_heads))
    colors = [HIGHLIGHT if (l, h) in starred else ACCENT for l in range(n_layer) for h in range(n_head)]
    fig = go.Figure(go.Bar(x=names, y=values.flatten().tolist(), marker_color=colors))
    fig.update_layout(
        title=title,
        yaxis=dict(title=yaxis, range=[0, 1.05]),
        xaxis=dict(title="head", type="category"),
        template="plotly_white",
        width=max(420, 40 * len(names) + 160),
        height=380,
    )
    return fig


def read_bars(
    head_mass: Float[Tensor, "layer head"],
    row: Float[Tensor, " key"] | None,
    tokens: Int[Tensor, " seq"],
    read_pos: int,
    write_pos: int,
    *,
    head: tuple[int, int] | None = None,
    read_heads: Sequence[tuple[int, int]] = (),
    title: str | None = None,
) -> go.Figure:
    """One read: ``last_write_mass`` of every head (bars, read heads in red) and, when
    ``row`` is given, the chosen head's attention over keys with the last write in red."""
    head_mass = torch.as_tensor(head_mass).detach().float().cpu()
    n_layer, n_head = head_mass.shape
    names = [f"L{l}H{h}" for l in range(n_layer) for h in range(n_head)]
    starred = set(map(tuple, read_heads))
    rows = 2 if row is not None else 1
    hname = f"L{head[0]}H{head[1]}" if head is not None else "head"
    fig = make_subplots(
        rows=rows,
        cols=1,
        subplot_titles=["last_write_mass per head"]
        + (
            [f"{hname}: attention from the read at {read_pos} (last write at {write_pos} in red)"]
            * (rows - 1)
        ),
        vertical_spacing=0.18,
    )
    colors = [HIGHLIGHT if (l, h) in starred else ACCENT for l in range(n_layer) for h in range(n_head)]
    fig.add_trace(
        go.Bar(x=names, y=head_mass.flatten().tolist(), marker_color=colors, name="last_write_mass"),
        row=1,
        col=1,
    )
    fig.update_yaxes(range=[0, 1.05], title_text="mass", row=1, col=1)
    if row is not None:
        row = torch.as_tensor(row).detach().float().cpu()[: read_pos + 1]
        labels = token_labels(torch.as_tensor(tokens)[: read_pos + 1])
        kcolors = [HIGHLIGHT if k in (write_pos, write_pos + 1) else MUTED for k in range(read_pos + 1)]
        fig.add_trace(go.Bar(x=labels, y=row.tolist(), marker_color=kcolors, name="attention"), row=2, col=1)
        fig.update_xaxes(type="category", title_text="key", row=2, col=1)
        fig.update_yaxes(title_text="attention", row=2, col=1)
    lw = float(head_mass[head]) if head is not None else None
    fig.update_layout(
        title=title
        or (
            f"read at {read_pos}: last write at {write_pos}"
            + (f", {hname} last_write_mass {lw:.3f}" if lw is not None else "")
        ),
        showlegend=False,
        template="plotly_white",
        width=max(640, min(1600, 10 * (read_pos + 1) + 200)),
        height=360 * rows + 60,
    )
    return fig


# ---------------------------------------------------------------- export


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


#: Renders tried when kaleido's page was not ready yet (a start-up race under load).
KALEIDO_TRIES = 3


def to_image_bytes(
    fig: go.Figure, fmt: str, *, width: int | None = None, height: int | None = None, scale: float = 1.0
) -> bytes:
    """Render with kaleido (headless chromium); MathJax is off so no network is needed."""
    import kaleido

    layout = fig.layout
    opts = dict(
        format=fmt,
        width=int(width or layout.width or 700),
        height=int(height or layout.height or 500),
        scale=scale,
    )
    error: Exception | None = None
    for _ in range(KALEIDO_TRIES):
        server = getattr(kaleido, "_global_server", None)
        running = server is not None and server.is_running()
        try:
            if running:
                return kaleido.calc_fig_sync(fig.to_dict(), opts=opts)
            return kaleido.calc_fig_sync(fig.to_dict(), opts=opts, kopts={"mathjax": False})
        except Exception as e:  # kaleido raises several types when chromium is missing or dies
            error = e
            # On a loaded machine chromium can take the render call before kaleido's page has
            # loaded its scripts ("kaleido_scopes is not defined"): a fresh try succeeds.
            if "kaleido_scopes" not in str(e):
                break
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    raise ExportError(
        f"could not render {fmt.upper()} with kaleido ({type(error).__name__}: {first}); "
        "PNG/SVG export needs chromium (apt-get install chromium, or scripts/setup.sh)"
    ) from None


@contextlib.contextmanager
def image_server() -> Iterator[None]:
    """Keep one chromium open for many PNG/SVG exports (each one otherwise starts its own)."""
    import kaleido

    kaleido.start_sync_server(mathjax=False, silence_warnings=True)
    try:
        yield
    finally:
        kaleido.stop_sync_server(silence_warnings=True)


def figure_html(fig: go.Figure, *, include_plotlyjs: bool | str = True, full_html: bool = True) -> str:
    """The figure as HTML; the default embeds plotly.js inline so it renders offline."""
    return fig.to_html(include_plotlyjs=include_plotlyjs, full_html=full_html, config={"responsive": True})


def figures_html(figures: Sequence[go.Figure | str], title: str = "ffinterp", intro: str = "") -> str:
    """One self-contained page: plotly.js once, then each figure (or raw HTML string) in order.

    For reports that combine several figures and tables; ``intro`` is raw HTML.
    """
    parts = []
    first = True
    for item in figures:
        if isinstance(item, str):
            parts.append(item)
            continue
        parts.append(figure_html(item, include_plotlyjs=first, full_html=False))
        first = False
    body = "\n".join(f"<section>{p}</section>" for p in parts)
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:24px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{intro}{body}</body></html>"
    )


def save_html(text: str, path: str | os.PathLike) -> Path:
    """Write an HTML page atomically."""
    path = Path(path)
    _atomic_write(path, text.encode("utf-8"))
    return path


def save_figure(
    fig: go.Figure,
    path: str | os.PathLike,
    *,
    width: int | None = None,
    height: int | None = None,
    scale: float = 1.0,
) -> Path:
    """Write ``fig`` by suffix: ``.html`` (self-contained, offline) or ``.png``/``.svg``/
    ``.pdf``/``.jpg``/``.webp`` (kaleido). Width and height default to the figure's layout."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in HTML_SUFFIXES:
        if width or height:
            fig = go.Figure(fig).update_layout(
                width=width or fig.layout.width, height=height or fig.layout.height
            )
        _atomic_write(path, figure_html(fig).encode("utf-8"))
    elif suffix in IMAGE_SUFFIXES:
        fmt = {".jpg": "jpeg"}.get(suffix, suffix[1:])
        _atomic_write(path, to_image_bytes(fig, fmt, width=width, height=height, scale=scale))
    else:
        known = ", ".join(HTML_SUFFIXES + IMAGE_SUFFIXES)
        raise ExportError(
            f"{path}: unknown figure format {path.suffix or '(no suffix)'!r} (use one of {known})"
        )
    return path


__all__ = [
    "ExportError",
    "figure_html",
    "figures_html",
    "head_bars",
    "heatmap",
    "image_server",
    "pattern_figure",
    "pattern_grid",
    "read_bars",
    "save_figure",
    "save_html",
    "to_image_bytes",
    "causal_z",
    "token_labels",
]
