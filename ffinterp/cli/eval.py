"""``ffinterp eval CKPT``: error rates on the standard sets with exact 95% intervals."""

from __future__ import annotations

import json

import typer

from ffinterp.cli import Command, app, at_least
from ffinterp.data import STANDARD_SETS


@app.command("eval", cls=Command)
def eval_command(
    ckpt: str = typer.Argument(
        ..., metavar="CKPT", help="ckpt.pt (ffinterp or nanoGPT), a GPT-2 folder, or pretrained:NAME."
    ),
    sets: str = typer.Option(",".join(STANDARD_SETS), "--sets", help="Comma-separated: in, sparse, dense."),
    n: int = typer.Option(
        None,
        "--n",
        "--sequences",
        help="Sequences per set (default: each set's full size; under torchrun spell it --sequences).",
    ),
    seq_len: int = typer.Option(
        None, "--seq-len", help="Tokens per sequence (even; default: the model's block size)."
    ),
    batch_size: int = typer.Option(64, "--batch-size", help="Sequences per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
) -> None:
    """Error rates on the standard sets, with exact intervals.

    Scores every read of the in, sparse and dense sets; 0 errors print as a 95%
    Clopper-Pearson upper bound.
    """
    from ffinterp import distributed
    from ffinterp.evaluate import evaluate

    if n is not None:
        at_least(n, "--n")
    at_least(batch_size, "--batch-size")
    dist = distributed.init(device)  # under torchrun: this rank's share, counts summed over ranks
    result = evaluate(
        ckpt,
        sets,
        n=n,
        seq_len=seq_len,
        batch_size=batch_size,
        device=dist.device if dist.active else device,
        progress=progress,
        dist=dist,
    )
    if not dist.is_main:
        return
    typer.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.table())
