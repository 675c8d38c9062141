"""``ffinterp pretrained list``: the shipped zoo and its measured error rates."""

from __future__ import annotations

import typer

from ffinterp.cli import app

pretrained_app = typer.Typer(help="The shipped pretrained models.", no_args_is_help=True)
app.add_typer(pretrained_app, name="pretrained")


def _rate(e: dict, name: str) -> str:
    r = e.get("eval", {}).get(name)
    if not r:
        return "-"
    if r["errors"] == 0:
        return f"0/{r['reads']} (<{r['ci_high']:.1e})"
    return f"{r['errors']}/{r['reads']} ({r['error_rate']:.1e})"


@pretrained_app.command("list")
def list_models() -> None:
    """Show every shipped model with its error rates on the three standard sets."""
    from ffinterp.pretrained import index

    rows = [("name", "T", "arch", "trained on", "steps", "in", "sparse", "dense")]
    # The paper's regime (T=512) first; the T=128 models are kept for fast tests.
    for e in sorted(index(), key=lambda e: -int(e.get("seq_len", 0))):
        rows.append(
            (
                e["name"],
                str(e.get("seq_len", "?")),
                e.get("architecture", "?"),
                e.get("distribution", "?"),
                str(e.get("steps", "?")),
                _rate(e, "in"),
                _rate(e, "sparse"),
                _rate(e, "dense"),
            )
        )
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if len(rows) == 1:
        typer.echo("(no pretrained models shipped)")
