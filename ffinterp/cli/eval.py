"""``ffinterp eval CKPT``: error rates on the standard sets, or on a file of sequences, with
95% intervals that take the sequence as the unit (errors cluster within sequences)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ffinterp.cli import Command, app, at_least, fail
from ffinterp.data import STANDARD_SETS


@app.command("eval", cls=Command)
def eval_command(
    ckpt: str = typer.Argument(
        ..., metavar="CKPT", help="ckpt.pt (ffinterp or nanoGPT), a GPT-2 folder, or pretrained:NAME."
    ),
    sets: str = typer.Option(
        None,
        "--sets",
        help=f"Standard sets, e.g. {','.join(STANDARD_SETS)} (default: all; none with --seq-file).",
    ),
    seq_file: Path = typer.Option(
        None,
        "--seq-file",
        help="Score your own sequences: text lines, jsonl or parquet (as `attention --seq-file` reads).",
    ),
    n: int = typer.Option(
        None,
        "--n",
        "--sequences",
        help="Sequences per standard set (default: each set's full size; under torchrun: --sequences).",
    ),
    seq_len: int = typer.Option(
        None,
        "--seq-len",
        help="Tokens per sequence of the standard sets (even; default: the model's block size).",
    ),
    batch_size: int = typer.Option(64, "--batch-size", help="Sequences per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
) -> None:
    """Error rates on the standard sets or a file, with intervals.

    Scores every read; prints per-read and per-sequence error rates with intervals that take the
    sequence as the unit (0 errors print as an upper bound).
    """
    from ffinterp import distributed
    from ffinterp.evaluate import evaluate

    if n is not None:
        at_least(n, "--n")
    at_least(batch_size, "--batch-size")
    from ffinterp.device import resolve_device

    try:  # before distributed.init, which would raise torch's own error for it
        resolve_device(device)
    except RuntimeError as e:
        fail(f"--device {device!r}: {(str(e).splitlines() or [type(e).__name__])[0]}")
    if seq_file is not None and sets is None and (n is not None or seq_len is not None):
        fail("--n and --seq-len size the standard sets; with only --seq-file there are none (add --sets)")
    given = {}
    if seq_file is not None and str(seq_file) in ("", "."):
        fail("--seq-file: empty path; name a file of sequences")
    if seq_file is not None:
        from ffinterp.data import read_sequences
        from ffinterp.errors import FFInterpError

        try:
            given[seq_file.name] = read_sequences(seq_file)
        except FFInterpError as e:  # under torchrun, rank 0 alone says so
            fail(str(e))
    if sets is None:
        sets = "" if seq_file is not None else ",".join(STANDARD_SETS)
    dist = distributed.init(device)  # under torchrun: this rank's share, counts gathered from all ranks
    result = evaluate(
        ckpt,
        [s.strip() for s in sets.split(",")] if sets.strip() else [],
        n=n,
        seq_len=seq_len,
        sequences=given,
        batch_size=batch_size,
        device=dist.device if dist.active else device,
        progress=progress,
        dist=dist,
    )
    if not dist.is_main:
        return
    typer.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.table())
