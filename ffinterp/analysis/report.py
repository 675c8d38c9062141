"""The glitch report: the object :func:`ffinterp.find_glitches` returns, its JSONL, its terminal
table and its self-contained offline HTML (plotly.js inlined once)."""

from __future__ import annotations

import html
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from ffinterp.text import count


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write JSON to a temp file, fsync, rename: readers never see half a file."""
    _write_atomic(Path(path), json.dumps(obj, indent=2, default=_plain) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:  # a failed write (a full disk) leaves no temp file behind
        tmp.unlink(missing_ok=True)


def _plain(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _short(text: str, width: int = 36) -> str:
    return text if len(text) <= width else text[: width // 2 - 1] + "…" + text[-(width // 2) :]


def best_clean_patch(diagnosis: dict) -> str:
    """The component whose clean-counterpart output best repairs the read, and the read's
    logit difference after that patch (> 0: repaired); "-" when not measured."""
    clean = (diagnosis.get("causal") or {}).get("clean_output") or {}
    top = (clean.get("top_sites") or [None])[0]
    return f"{top['site']} {top['logit_diff']:+.2f}" if top else "-"


class GlitchReport:
    """Verified glitches of one search with its summary; shows itself in Jupyter.

    ``model`` (an :class:`~ffinterp.hooked.FFLModel`) is kept so the HTML report can draw
    each glitch's read-head heatmap; it is optional.
    """

    def __init__(self, glitches: list[dict], summary: dict, model=None):
        self.glitches = list(glitches)
        self.summary = summary
        self.model = model

    def __len__(self) -> int:
        return len(self.glitches)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.glitches)

    def __getitem__(self, k: int) -> dict:
        return self.glitches[k]

    def headline(self) -> str:
        """One line: how many glitches in how many sequences, on which model."""
        s = self.summary
        return (
            f"GlitchReport({count(len(self), 'glitch')} in {count(s.get('scored', 0), 'sequence')} "
            f"scored, model={s.get('model')!r}, best margin={_fmt(s.get('best_margin'))})"
        )

    def __repr__(self) -> str:
        """The headline and the table of the worst glitches: what ``report`` shows in a REPL
        and ``print(report)`` in a script (Jupyter shows :meth:`_repr_html_` instead)."""
        return self.headline() + ("\n" + self.table(10) if len(self) else "")

    def top(self, n: int = 10) -> list[dict]:
        """The ``n`` glitches with the most negative margin (the surest failures)."""
        return sorted(self.glitches, key=lambda g: (g["margin"], g["id"]))[:n]

    def to_jsonl(self, path: str | os.PathLike | None = None) -> str:
        """The glitches as JSON lines (also written to ``path`` atomically, if given)."""
        text = "".join(json.dumps(g, separators=(",", ":")) + "\n" for g in self.glitches)
        if path is not None:
            _write_atomic(Path(path), text)
        return text

    # ------------------------------------------------------------ text

    def table(self, n: int = 10) -> str:
        """A terminal table of the top glitches."""
        head = ("#", "strategy", "read", "gap", "decoys", "exp", "pred", "margin", "min len", "mode", "fixed",
                "best clean patch")  # fmt: skip
        rows = [head]
        for g in self.top(n):
            d = g.get("diagnosis") or {}
            m = g.get("minimized") or {}
            fixed = (d.get("causal") or {}).get("fixed")
            rows.append(
                (
                    str(g["id"]),
                    g["strategy"],
                    str(g["read_pos"]),
                    str(g["gap"]),
                    str(g["decoys"]),
                    g["expected"],
                    g["prediction"],
                    f"{g['margin']:+.3f}",
                    str(m.get("length", "-")),
                    d.get("label", "-"),
                    "-" if fixed is None else ("yes" if fixed else "no"),
                    best_clean_patch(d),
                )
            )
        widths = [max(len(r[k]) for r in rows) for k in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        for g in self.top(min(n, 3)):
            m = g.get("minimized") or {}
            if m:
                lines.append(f"  #{g['id']} minimal: {_short(m['text'], 100)} (read at {m['read_pos']})")
        return "\n".join(lines)

    # ------------------------------------------------------------ figures

    def plot(self):
        """Error rate of the scored reads against gap length and decoy count (plotly)."""
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, subplot_titles=("error rate vs gap", "error rate vs decoys"))
        panels = ((1, "rate_by_gap", "gap (tokens)"), (2, "rate_by_decoys", "earlier opposite-bit writes"))
        for col, key, title in panels:
            bins = self.summary.get(key) or []
            labels = [
                f"{b['lo']}+"
                if not b["hi"]
                else (str(b["lo"]) if b["hi"] == b["lo"] + 1 else f"{b['lo']}-{b['hi'] - 1}")
                for b in bins
            ]
            fig.add_bar(
                x=labels,
                y=[b["rate"] for b in bins],
                customdata=[[b["errors"], b["reads"]] for b in bins],
                hovertemplate="%{x}: %{y:.2e} (%{customdata[0]} / %{customdata[1]} reads)<extra></extra>",
                row=1,
                col=col,
                showlegend=False,
            )
            fig.update_xaxes(title_text=title, row=1, col=col)
            fig.update_yaxes(title_text="errors / reads scored", row=1, col=col)
        fig.update_layout(height=380, margin=dict(l=60, r=20, t=40, b=60), template="plotly_white")
        return fig

    def heatmap(self, k: int):
        """Attention of every head from glitch ``k``'s read (rows) over the keys (columns)."""
        from ffinterp.analysis.diagnose import attention_rows
        from ffinterp.language import from_text
        from ffinterp.viz import heatmap, token_labels

        if self.model is None or getattr(self.model, "hooked", None) is None:
            raise ValueError("heatmaps need the report's model with a hooked view")
        g = self.glitches[k]
        tokens = from_text(g["text"])
        pos = g["read_pos"]
        rows = attention_rows(self.model, tokens[None], torch.tensor([pos]))[0]  # layer head key
        n_layer, n_head = rows.shape[:2]
        read_heads = {h["head"] for h in (g.get("diagnosis") or {}).get("read_heads", [])}
        names = [f"L{l}H{h}" for l in range(n_layer) for h in range(n_head)]
        labels = [f"{n} *" if n in read_heads else n for n in names]
        z = rows.reshape(n_layer * n_head, -1)[:, : pos + 1]
        lw = g["last_write_pos"]
        fig = heatmap(
            z,
            token_labels(tokens[: pos + 1]),
            labels,
            title=f"glitch #{g['id']}: every head's attention from the read at {pos} "
            f"(last write at {lw}, boxed; * read head)",
            xlabel="key",
            ylabel="head",
            zmin=0,
            zmax=1,
        )
        fig.add_vrect(x0=lw - 0.5, x1=lw + 1.5, line_color="red", line_width=2, fillcolor="rgba(0,0,0,0)")
        fig.update_layout(height=160 + 22 * len(labels), xaxis=dict(showticklabels=pos < 130))
        return fig

    # ------------------------------------------------------------ html

    def _summary_table(self) -> str:
        s = self.summary
        rows = [
            ("model", s.get("model")),
            ("sequences scored", f"{s.get('scored', 0):,}"),
            ("verified glitches", len(self)),
            ("distinct minimal forms", s.get("distinct_minimized")),
            ("mean minimised length", _fmt(s.get("mean_minimized_length"))),
            ("best margin", _fmt(s.get("best_margin"))),
            ("seed / seq_len / device", f"{s.get('seed')} / {s.get('seq_len')} / {s.get('device')}"),
            ("verified by", s.get("verified_by")),
            ("disagreements (internal errors)", s.get("disagreements")),
        ]
        for name, st in (s.get("strategies") or {}).items():
            rows.append(
                (
                    f"strategy {name}",
                    f"{st.get('scored', 0):,} scored, {count(st.get('glitches', 0), 'glitch')}, "
                    f"first at {st.get('first_glitch_at') or '-'}",
                )
            )
        return _html_table(["", ""], rows)

    def _glitch_table(self, n: int | None = None) -> str:
        rows = []
        for g in self.top(n or len(self)):
            d = g.get("diagnosis") or {}
            m = g.get("minimized") or {}
            causal = d.get("causal") or {}
            rows.append(
                (
                    g["id"],
                    g["strategy"],
                    f"<code title='{html.escape(g['text'])}'>{html.escape(_short(g['text'], 48))}</code>",
                    g["read_pos"],
                    g["gap"],
                    g["decoys"],
                    f"{g['expected']} → {g['prediction']}",
                    f"{g['p_correct']:.3f}",
                    f"{g['margin']:+.3f}",
                    f"<code>{html.escape(_short(m.get('text', '-'), 48))}</code>",
                    d.get("label", "-"),
                    "-" if not causal else ("fixed" if causal.get("fixed") else "not fixed"),
                    best_clean_patch(d),
                )
            )
        head = ["#", "strategy", "sequence", "read", "gap", "decoys", "exp → pred", "p(correct)", "margin",
                "minimal form", "mode", "causal check", "best clean patch"]  # fmt: skip
        return _html_table(head, rows, escape=False)

    def _repr_html_(self) -> str:
        return (
            f"<div class='ffinterp-glitches'><b>{html.escape(self.headline())}</b>"
            f"{self._summary_table()}{self._glitch_table(10)}</div>"
        )

    def to_html(self, max_heatmaps: int = 20) -> str:
        """A self-contained offline page (plotly.js inlined once): summary, table, charts of
        error rate against gap and decoys, and the heatmap of the top glitches' read."""
        from ffinterp.viz import figures_html

        items: list = ["<h2>Error rate of the scored reads by gap and decoy count</h2>", self.plot()]
        if self.model is not None and getattr(self.model, "hooked", None) is not None:
            for g in self.top(max_heatmaps):
                fig = self.heatmap(self.glitches.index(g))
                items += [f"<h2>Glitch #{g['id']}: attention at the read</h2>", fig]
        intro = f"{self._summary_table()}<h2>Verified glitches</h2>{self._glitch_table()}"
        return figures_html(items, title=f"Attention glitches: {self.summary.get('model')}", intro=intro)

    def save_html(self, path: str | os.PathLike, max_heatmaps: int = 20) -> Path:
        """Write :meth:`to_html` atomically."""
        path = Path(path)
        _write_atomic(path, self.to_html(max_heatmaps))
        return path


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def _html_table(head, rows, escape: bool = True) -> str:
    def cell(v):
        return html.escape(str(v)) if escape else str(v)

    th = "".join(f"<th>{cell(h)}</th>" for h in head) if any(head) else ""
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table>{'<tr>' + th + '</tr>' if th else ''}{body}</table>"


__all__ = ["GlitchReport", "write_json_atomic"]
