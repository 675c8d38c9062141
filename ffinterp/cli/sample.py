"""``ffinterp sample`` and ``ffinterp validate``: the language from the shell."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from ffinterp.cli import Command, app, check_out_file, fail
from ffinterp.data import format_sequences, read_sequences, write_sequences
from ffinterp.language import sample as sample_tokens
from ffinterp.text import count


@app.command(cls=Command)
def sample(
    n: int = typer.Option(10, "--n", min=1, help="Number of sequences."),
    seq_len: int = typer.Option(512, "--seq-len", min=2, help="Tokens per sequence (even)."),
    p_i: float = typer.Option(0.8, "--p-i", min=0.0, max=0.999999, help="Ignore probability of FFL(p_i)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the stream."),
    fmt: str = typer.Option("text", "--format", help="text, jsonl or parquet."),
    out: Path = typer.Option(None, "--out", help="Write here instead of stdout."),
) -> None:
    """Sample FFL(p_i) sequences.

    Written in the synthseq/flipflop text format (or jsonl/parquet with a text field).
    """
    if fmt not in ("text", "jsonl", "parquet"):
        fail(f"--format must be text, jsonl or parquet, got {fmt!r}")
    check_out_file(out)
    if seq_len % 2:
        fail(f"--seq-len must be even (instruction-bit pairs), got {seq_len}")
    tokens = sample_tokens(n, seq_len, p_i, seed=seed)
    if out is not None:
        write_sequences(tokens, out, fmt)
    elif fmt == "parquet":
        fail("--format parquet needs --out FILE")
    else:
        sys.stdout.write(format_sequences(tokens, fmt))


@app.command(cls=Command)
def validate(
    file: Path = typer.Argument(
        ..., metavar="FILE", help="Text lines, jsonl with a 'text' field, or parquet."
    ),
    unlabelled: bool = typer.Option(False, "--unlabelled", help="Do not check read bits."),
) -> None:
    """Check every sequence in a file.

    Prints how many valid sequences FILE holds, or the first bad line and position (exit 2).
    """
    tokens = read_sequences(file, labelled=not unlabelled)
    typer.echo(f"{file}: {count(len(tokens), 'valid sequence')} of length {tokens.shape[1]}")
