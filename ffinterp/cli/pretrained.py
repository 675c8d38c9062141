"""``ffinterp pretrained list``: the shipped zoo and its measured error rates."""

from __future__ import annotations

import shutil
import textwrap

import typer

from ffinterp.cli import Command, app

pretrained_app = typer.Typer(help="The shipped pretrained models.", no_args_is_help=True)
app.add_typer(pretrained_app, name="pretrained")


def _rate(e: dict, name: str) -> str:
    r = e.get("eval", {}).get(name)
    if not r:
        return "-"
    if r["errors"] == 0:
        return f"0 / {r['reads']} (<{r['ci_high']:.1e})"
    return f"{r['errors']} / {r['reads']} ({r['error_rate']:.1e})"


def fit_table(rows: list[tuple[str, ...]], width: int, wrap_first: tuple[int, ...] = ()) -> list[str]:
    """``rows`` (the first is the header) as aligned lines at most ``width`` wide where the
    words allow. The widest of the ``wrap_first`` columns (the descriptions) give up a
    character at a time, down to 20, then the widest of the others after the first, down to
    their longest word (or hyphenated part); cells wrap onto more lines, and the gap between
    columns narrows to one space when even that is too wide."""
    n = len(rows[0])
    chunks = textwrap.TextWrapper()._split  # the pieces textwrap may break a line between
    least = [max(len(w.strip()) for r in rows for w in chunks(r[k]) or [""]) for k in range(n)]
    widths = [max(len(r[k]) for r in rows) for k in range(n)]
    least[0] = widths[0]  # names stay whole: they are what you type
    gap = 2
    for floor, cols in ((20, wrap_first), (0, range(n))):
        while sum(widths) + gap * (n - 1) > width:
            narrower = [k for k in cols if widths[k] > max(least[k], floor)]
            if not narrower:
                break
            widths[max(narrower, key=widths.__getitem__)] -= 1
    if sum(widths) + gap * (n - 1) > width:
        gap = 1
    lines = []
    for r in rows:
        cells = [textwrap.wrap(c, w) or [""] for c, w in zip(r, widths)]
        for j in range(max(len(c) for c in cells)):
            parts = [(c[j] if j < len(c) else "").ljust(w) for c, w in zip(cells, widths)]
            lines.append((" " * gap).join(parts).rstrip())
    return lines


@pretrained_app.command("list", cls=Command)
def list_models() -> None:
    """The shipped models and their error rates.

    One row per model: length, architecture, what it was trained on, and its errors on the
    three standard sets. The table fits the terminal's width.
    """
    from ffinterp.pretrained import index, trained_on

    entries = index()
    rows = [("name", "T", "arch", "trained on", "steps", "in", "sparse", "dense")]
    # The paper's regime (T=512) first; the T=128 models are kept for fast tests.
    for e in sorted(entries, key=lambda e: -int(e.get("seq_len", 0))):
        rows.append(
            (
                e["name"],
                str(e.get("seq_len", "?")),
                e.get("architecture", "?"),
                trained_on(e, entries),
                str(e.get("steps", "?")),
                _rate(e, "in"),
                _rate(e, "sparse"),
                _rate(e, "dense"),
            )
        )
    for line in fit_table(rows, shutil.get_terminal_size().columns, wrap_first=(2, 3)):
        typer.echo(line)
    if len(rows) == 1:
        typer.echo("(no pretrained models shipped)")
