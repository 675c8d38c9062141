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
    if clean and not clean.get("applicable"):
        m = clean.get("clean_margin")
        if m is None:
            return "n/a: no clean history"
        return f"n/a: counterpart wrong too ({m:+.2f})" if m <= 0 else "n/a: counterpart changes nothing"
    top = (clean.get("top_sites") or [None])[0]
    return f"{top['site']} {top['logit_diff']:+.2f}" if top else "-"


def forced_fixes(diagnosis: dict) -> bool | None:
    """Whether forcing the read heads onto the last write's carrier fixes the read (None: not
    measured)."""
    return ((diagnosis.get("causal") or {}).get("force_carrier") or {}).get("fixes_read")


LEGEND = (
    ("margin", "logit of the correct bit minus the largest other logit at the read; < 0 is an error"),
    ("gap", "tokens from the last write's w to the read"),
    ("decoys", "earlier writes whose bit is the opposite of the last write's"),
    (
        "mode",
        "how the read head's attention failed, judged on each write's carrier: wrong write (an "
        "earlier write's carrier got more), start drift (the opening write's), dilution (the last "
        "write's carrier leads but below its 5th percentile on correct reads), other (attention "
        "looks normal)",
    ),
    ("forced fixes", "does forcing the read heads onto the last write's carrier at the read fix it?"),
    (
        "best clean patch",
        "the head or MLP whose output from the clean counterpart (earlier writes made ignores) best "
        "repairs the read, and the read's logit difference after it; n/a when the model gets the "
        "counterpart wrong too",
    ),
)


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
        head = ("#", "strategy", "read", "gap", "decoys", "exp", "pred", "margin", "min len", "mode",
                "forced fixes", "best clean patch")  # fmt: skip
        rows = [head]
        for g in self.top(n):
            d = g.get("diagnosis") or {}
            m = g.get("minimized") or {}
            fixed = forced_fixes(d)
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

    def heatmap(self, k: int, window: int = 24):
        """Attention of every head from glitch ``k``'s read (rows) over the keys (columns): the
        keys from ``window`` tokens before the last write to the read (long gaps are cut in the
        middle), the last write's carrier boxed."""
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
        d = g.get("diagnosis") or {}
        read_heads = {h["head"] for h in d.get("read_heads", [])}
        first = (d.get("read_heads") or [{}])[0]
        carrier, offset = first.get("carrier"), first.get("carrier_offset", 1)
        names = [f"L{l}H{h}" for l in range(n_layer) for h in range(n_head)]
        labels = [f"{n} *" if n in read_heads else n for n in names]
        lw = g["last_write_pos"]
        key = min(lw + offset, pos)
        lo = max(0, lw - window)
        keep = list(range(lo, min(lw + window, pos + 1)))
        keep += [p for p in range(max(lw + window, pos + 1 - window), pos + 1) if p not in keep]
        z = rows.reshape(n_layer * n_head, -1)[:, keep]
        ticks = token_labels(tokens)
        xl = [ticks[p] for p in keep]
        fig = heatmap(
            z,
            xl,
            labels,
            title=f"glitch #{g['id']}: attention from the read at {pos} (query) over keys {lo}..{pos} "
            f"(last write at {lw}; its carrier, {carrier or 'bit'}, boxed; * read head)",
            xlabel="key (position: token)",
            ylabel="head (query: the read)",
            zmin=0,
            zmax=1,
        )
        c = keep.index(key)
        fig.add_vrect(x0=c - 0.5, x1=c + 0.5, line_color="red", line_width=2, fillcolor="rgba(0,0,0,0)")
        fig.update_layout(height=160 + 22 * len(labels))
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

    def _circuit_html(self) -> str:
        rh = self.summary.get("read_heads") or {}
        lines = (rh.get("circuit") or {}).get("summary") or []
        if not lines:
            return ""
        items = "".join(f"<li>{html.escape(x)}</li>" for x in lines)
        return f"<h2>The read circuit (path patching)</h2><ul>{items}</ul>"

    def _glitch_table(self, n: int | None = None) -> str:
        rows = []
        for g in self.top(n or len(self)):
            d = g.get("diagnosis") or {}
            m = g.get("minimized") or {}
            fixed = forced_fixes(d)
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
                    "-" if fixed is None else ("fixed" if fixed else "not fixed"),
                    best_clean_patch(d),
                )
            )
        head = ["#", "strategy", "sequence", "read", "gap", "decoys", "exp → pred", "p(correct)", "margin",
                "minimal form", "mode", "forced fixes", "best clean patch"]  # fmt: skip
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
        legend = _html_table(["column", "meaning"], LEGEND)
        intro = (
            f"{self._summary_table()}{self._circuit_html()}<h2>Verified glitches</h2>{self._glitch_table()}"
            f"<h3>How to read the table</h3>{legend}"
        )
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
