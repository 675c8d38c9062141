"""Attribution patching: a first-order estimate of every activation patch at once.

Exact patching needs a forward pass per site (batched, but still one row each).
Attribution patching (Nanda 2023; Syed, Rager and Conmy 2023) linearises the metric
around the corrupted run: the effect of patching site ``a`` is estimated as
``grad_a(metric)(corrupted) . (a_clean - a_corrupted)``. That costs two forward passes
(clean, corrupted with gradients) and one backward pass for every site of every kind.

The estimate is only as good as the linearisation. A saturated softmax, such as a sharp
read head that puts all its attention on the last write, has a gradient near zero even
where patching its query or key moves the answer completely. :func:`compare_attribution`
therefore runs exact patching next to it, reports their correlation and flags the sites
where they disagree by more than a threshold.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ffinterp.analysis.pairs import Pair
from ffinterp.analysis.patching import (
    HOOKS,
    Metric,
    _axis_labels,
    _check_kind,
    _setup,
    _sites,
    activation_patch,
    hooked_of,
    kind_of,
    patch_metric,
)
from ffinterp.analysis.results import PatchResult, Table

DEFAULT_THRESHOLD = 0.25  # in normalised units: a quarter of the clean-corrupted gap


def _site_sums(layout: str, prod: Tensor, by_pos: bool) -> Tensor:
    """Per-site sums of grad * delta for one layer (``prod`` without its batch dim)."""
    if layout == "pos":  # [pos, d]
        per = prod.sum(-1)
        return per if by_pos else per.sum()[None]
    if layout == "head":  # [pos, head, d_head]
        per = prod.sum(-1)
        return per if by_pos else per.sum(0)
    per = prod.sum(-1)  # pattern [head, dest, src] -> [head, dest]
    return per if by_pos else per.sum(-1)


def attribution_patch(
    model,
    pair: Pair,
    what: str = "z",
    *,
    by_pos: bool = True,
    metric: str | Metric = "logit_diff",
) -> PatchResult:
    """The gradient estimate of :func:`~ffinterp.analysis.patching.activation_patch`.

    Same axes, labels and normalisation as the exact sweep, so the two compare cell by
    cell. Sites after the read get 0 (they cannot change it).
    """
    kind = kind_of(what)
    hk = hooked_of(model)
    _check_kind(hk, kind)
    name, layout = HOOKS[kind]
    names = [name.format(l=layer) for layer in range(hk.cfg.n_layers)]
    s = _setup(model, pair, metric, names, "attribution_patch")
    acts: dict[str, Tensor] = {}

    def capture(act: Tensor, hook=None, key: str = "") -> Tensor:
        if not act.requires_grad:  # frozen weights: make the activation a leaf of the graph
            act = act.detach().requires_grad_(True)
        acts[key] = act
        return act

    hooks = [(n, lambda act, hook=None, key=n: capture(act, key=key)) for n in names]
    with torch.enable_grad():
        logits = s.check.run(s.corrupted.clone(), hooks)
        value = s.metric(logits[:, s.metric.read_pos]).sum()
        grads = torch.autograd.grad(value, [acts[n] for n in names], allow_unused=True)
    s.check.check_grads(names, grads)  # no gradient: the captured activation was dropped
    seq = pair.seq_len
    per_layer = []
    for n, g in zip(names, grads):
        delta = s.cache[n][0] - s.cache[n][1]
        g = g[0].detach()
        site = _site_sums(layout, (g * delta).float().cpu(), by_pos)
        if by_pos:  # pad positions after the read with 0
            pad = seq - s.t
            if layout == "pos":
                site = torch.cat([site, site.new_zeros(pad)])
            elif layout == "head":
                site = torch.cat([site, site.new_zeros(pad, site.shape[1])])
            else:
                site = torch.cat([site, site.new_zeros(site.shape[0], pad)], dim=1)
        per_layer.append(site)
    values = torch.stack(per_layer)
    _, axes = _sites(kind, by_pos, s.n_layers, s.n_heads, 1)
    return PatchResult(
        values=values,
        axes=axes,
        labels=_axis_labels(axes, s.n_layers, s.n_heads, pair.clean),
        title=f"attribution patching of {kind}" + (" by position" if by_pos else ""),
        metric=f"normalised {s.metric.name}",
        null=0.0,
        baselines=s.metric.baselines,
        notes=("first-order estimate: grad at the corrupted run x (clean - corrupted)",),
        meta={"kind": kind, "pair": pair.describe(), "method": "attribution"},
    )


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two flattened tensors (NaN if either is constant)."""
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else math.nan


@dataclass(frozen=True)
class AttributionCheck:
    """Attribution next to exact patching: correlation and the sites where they disagree."""

    attribution: PatchResult
    exact: PatchResult
    correlation: float
    correlation_live: float
    threshold: float
    disagreements: Table

    @property
    def agrees(self) -> bool:
        return len(self.disagreements) == 0

    def summary(self) -> str:
        kind = self.exact.meta.get("kind", "")

        def r(x: float) -> str:
            return "undefined (one side is constant)" if math.isnan(x) else f"{x:.3f}"

        text = (
            f"attribution vs exact patching of {kind}: correlation r = {r(self.correlation)} over all "
            f"{self.exact.values.numel()} sites, r = {r(self.correlation_live)} over the sites where "
            "either is non-zero"
        )
        if self.agrees:
            return text + f"; no site differs by more than {self.threshold:g}"
        worst = self.disagreements[0]
        where = " ".join(str(v) for k, v in worst.items() if k in self.exact.axes)
        return (
            text + f"; WARNING: {len(self.disagreements)} sites differ by more than {self.threshold:g} "
            f"(worst {where}: exact {worst['exact']:+.3f}, attribution {worst['attribution']:+.3f}). "
            "The linear estimate breaks down where a softmax is saturated (a sharp read head is the "
            "known case) or the patch is large: trust exact patching there."
        )

    def __str__(self) -> str:
        return self.summary() + ("\n" + str(self.disagreements) if not self.agrees else "")

    def _repr_html_(self) -> str:
        return f"<p>{html.escape(self.summary())}</p>" + (
            self.disagreements._repr_html_() if not self.agrees else ""
        )

    def plot(self):
        """Scatter of attribution against exact patching, one point per site."""
        import plotly.graph_objects as go

        x = self.exact.values.flatten().tolist()
        y = self.attribution.values.flatten().tolist()
        lo, hi = min(x + y + [0.0]), max(x + y + [1.0])
        fig = go.Figure(go.Scatter(x=x, y=y, mode="markers", name="sites"))
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", line=dict(dash="dot")))
        return fig.update_layout(
            title=f"attribution vs exact (r = {self.correlation:.3f})",
            xaxis_title="exact patching",
            yaxis_title="attribution patching",
            template="plotly_white",
        )


def compare_attribution(
    model,
    pair: Pair,
    what: str = "z",
    *,
    by_pos: bool = True,
    metric: str | Metric = "logit_diff",
    threshold: float = DEFAULT_THRESHOLD,
    max_rows: int = 20,
) -> AttributionCheck:
    """Run attribution and exact patching of one kind and say how well they agree."""
    m = metric if isinstance(metric, Metric) else patch_metric(model, pair, metric)
    attr = attribution_patch(model, pair, what, by_pos=by_pos, metric=m)
    exact = activation_patch(model, pair, what, by_pos=by_pos, metric=m)
    gap = (attr.values - exact.values).abs()
    live = (exact.values != 0) | (attr.values != 0)
    r_all = pearson(attr.values, exact.values)
    r_live = pearson(attr.values[live], exact.values[live]) if int(live.sum()) > 1 else math.nan
    bad = (gap > threshold).nonzero()
    order = gap[tuple(bad.T)].argsort(descending=True) if len(bad) else torch.zeros(0, dtype=torch.long)
    rows = []
    for i in order[:max_rows].tolist():
        idx = bad[i].tolist()
        row = {ax: exact.labels[a][j] for a, (ax, j) in enumerate(zip(exact.axes, idx))}
        row["exact"] = float(exact.values[tuple(idx)])
        row["attribution"] = float(attr.values[tuple(idx)])
        rows.append(row)
    table = Table(rows, f"sites where |attribution - exact| > {threshold:g} ({len(bad)} in all)")
    return AttributionCheck(attr, exact, r_all, r_live, threshold, table)


__all__ = ["AttributionCheck", "attribution_patch", "compare_attribution", "pearson"]
