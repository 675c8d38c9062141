"""Patching and ablation results as objects: numbers plus the axes that say what they mean.

Every routine in :mod:`~ffinterp.analysis.patching`, :mod:`~ffinterp.analysis.attribution`
and :mod:`~ffinterp.analysis.ablation` returns a :class:`PatchResult`: the tensor, the
name and labels of each axis, and the reference values it is measured against. The same
object prints a top-k table (the CLI), renders in Jupyter and plots as a heatmap.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from ffinterp.language import VOCAB


def head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def position_labels(tokens: Tensor) -> tuple[str, ...]:
    """``"12 w"``: position then token, as the attention figures label keys."""
    return tuple(f"{k} {VOCAB[int(t)]}" for k, t in enumerate(torch.as_tensor(tokens).tolist()))


@dataclass(frozen=True)
class Table:
    """Rows of dicts with a plain-text and an HTML rendering (the CLI prints ``str``)."""

    rows: list[dict]
    title: str = ""

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, k: int) -> dict:
        return self.rows[k]

    @staticmethod
    def _fmt(v) -> str:
        return f"{v:+.4f}" if isinstance(v, float) else str(v)

    def __str__(self) -> str:
        if not self.rows:
            return f"{self.title}\n(no rows)" if self.title else "(no rows)"
        cols = list(self.rows[0])
        cells = [[self._fmt(r[c]) for c in cols] for r in self.rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
        lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
        return "\n".join(([self.title] if self.title else []) + lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        if not self.rows:
            return "<p>(no rows)</p>"
        cols = list(self.rows[0])
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(self._fmt(r[c]))}</td>" for c in cols) + "</tr>"
            for r in self.rows
        )
        cap = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return f"<table class='ffinterp-top'>{cap}<tr>{head}</tr>{body}</table>"


@dataclass(frozen=True)
class PatchResult:
    """A patching or ablation sweep: ``values`` over named ``axes`` with ``labels`` per axis.

    ``null`` is the value that means "no effect" (0 for normalised patching, where clean = 1
    and corrupted = 0; the unablated metric for ablations), so :attr:`effect` and
    :meth:`top` rank sites by how far they move the metric. ``baselines`` holds the raw
    metric on the reference runs; ``notes`` carry caveats (e.g. exactly skipped sites).
    """

    values: Float[Tensor, "..."]
    axes: tuple[str, ...]
    labels: tuple[tuple[str, ...], ...]
    title: str
    metric: str
    null: float = 0.0
    baselines: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.axes) != self.values.ndim or len(self.labels) != self.values.ndim:
            raise ValueError(f"axes {self.axes} do not fit values of shape {tuple(self.values.shape)}")
        for ax, lab, n in zip(self.axes, self.labels, self.values.shape):
            if len(lab) != n:
                raise ValueError(f"{len(lab)} labels for axis {ax!r} of size {n}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def effect(self) -> Float[Tensor, "..."]:
        """``values - null``: the change each intervention makes."""
        return self.values - self.null

    def top(self, k: int = 10) -> Table:
        """The ``k`` sites with the largest absolute effect, largest first."""
        flat = self.effect.detach().float().cpu().flatten()
        size = flat.abs().nan_to_num(nan=0.0)
        k = min(k, int((size > 0).sum()))  # sites with no effect (or not run) are left out
        order = size.argsort(descending=True, stable=True)[:k]
        rows = []
        for rank, i in enumerate(order.tolist(), 1):
            idx = torch.unravel_index(torch.tensor(i), self.shape)
            row: dict = {"rank": rank}
            for ax, lab, j in zip(self.axes, self.labels, idx):
                row[ax] = lab[int(j)]
            row[self.metric] = float(self.values.flatten()[i])
            row["effect"] = float(flat[i])
            rows.append(row)
        return Table(rows, f"{self.title}: top {k} by |effect|")

    # ------------------------------------------------------------ figures

    def _grid(self) -> tuple[Tensor, tuple[str, ...], tuple[str, ...], str, str]:
        """The values as a 2-D grid: (layer, pos, head) and (layer, head, pos) become head rows."""
        v = self.values.detach().float().cpu()
        if v.ndim == 1:
            return v[None], ("",), self.labels[0], "", self.axes[0]
        if v.ndim == 2:
            return v, self.labels[0], self.labels[1], self.axes[0], self.axes[1]
        if v.ndim == 3 and self.axes[0] == "layer":
            if self.axes[1] == "head":  # (layer, head, pos)
                rows = tuple(f"L{a}{b}" for a in self.labels[0] for b in self.labels[1])
                return v.reshape(-1, v.shape[2]), rows, self.labels[2], "head", self.axes[2]
            if self.axes[2] == "head":  # (layer, pos, head)
                rows = tuple(f"L{a}{b}" for a in self.labels[0] for b in self.labels[2])
                grid = v.permute(0, 2, 1).reshape(-1, v.shape[1])
                return grid, rows, self.labels[1], "head", self.axes[1]
        raise ValueError(f"no 2-D view of axes {self.axes}")

    def plot(self, **kwargs):
        """A heatmap, diverging around the no-effect value (red: towards clean)."""
        from ffinterp.viz import heatmap

        grid, rows, cols, ylab, xlab = self._grid()
        span = float((grid - self.null).abs().max()) or 1.0
        small = grid.numel() <= 400
        kw = dict(
            title=self.title,
            xlabel=xlab,
            ylabel=ylab,
            colorscale="RdBu_r",
            zmid=self.null,
            zmin=self.null - span,
            zmax=self.null + span,
            text_fmt=".2f" if small else None,
            colorbar_title=self.metric,
            hover="%{y} @ %{x}: %{z:.4f}",
        )
        kw.update(kwargs)
        fig = heatmap(grid, cols, rows, **kw)
        fig.update_layout(
            width=min(2400, max(480, 22 * len(cols) + 200)), height=min(1600, max(300, 26 * len(rows) + 140))
        )
        return fig

    def save(self, path: str | os.PathLike, **kwargs) -> Path:
        """Export :meth:`plot` by suffix (``.html``, ``.png``, ``.svg`` ...) via the viz module."""
        from ffinterp.viz import save_figure

        return save_figure(self.plot(), path, **kwargs)

    # ------------------------------------------------------------ display

    def summary(self) -> str:
        base = ", ".join(f"{k} {v:+.4f}" for k, v in self.baselines.items())
        dims = " x ".join(f"{a}={n}" for a, n in zip(self.axes, self.shape))
        return f"{self.title} [{dims}] metric={self.metric}" + (f" ({base})" if base else "")

    def __repr__(self) -> str:
        return f"PatchResult({self.summary()})"

    def _repr_html_(self) -> str:
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
        return (
            f"<div class='ffinterp-patch'><p><b>{html.escape(self.summary())}</b></p>"
            + (f"<ul>{notes}</ul>" if notes else "")
            + self.top(10)._repr_html_()
            + "</div>"
        )
