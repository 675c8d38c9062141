"""``ffinterp find-glitches``: search a model for attention glitches, minimise and explain them."""

from __future__ import annotations

from pathlib import Path

import typer

from ffinterp.cli import Command, app, at_least, fail
from ffinterp.pretrained import DEFAULT_MODEL, PREFIX
from ffinterp.text import count


@app.command("find-glitches", cls=Command)
def find_glitches_cmd(
    ckpt: str = typer.Argument(
        None,
        metavar="CKPT",
        help=f"ckpt.pt, nanoGPT, HF folder or pretrained:NAME (default: {PREFIX}{DEFAULT_MODEL}).",
    ),
    strategy: str = typer.Option(
        "all", "--strategy", help="random, families, evolve, gradient, distribution or all (the first four)."
    ),
    budget: int = typer.Option(20_000, "--budget", help="Sequences to score on the fast model (shared)."),
    seed: int = typer.Option(0, "--seed", help="Seed of every search stream."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA if present), cpu, cuda, cuda:1 ..."),
    out: Path = typer.Option(Path("glitches"), "--out", help="Folder for the three output files."),
    no_minimize: bool = typer.Option(False, "--no-minimize", help="Skip minimising each glitch."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run in --out."),
    seq_len: int = typer.Option(None, "--seq-len", help="Sequence length (default: the model's block size)."),
    max_glitches: int = typer.Option(100, "--max-glitches", help="Stop after this many verified glitches."),
    batch_size: int = typer.Option(256, "--batch-size", help="Sequences per scored batch."),
    no_diagnose: bool = typer.Option(False, "--no-diagnose", help="Skip the attention diagnosis."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Search a model for glitches, verify and explain them.

    Finds inputs where a read fails, verifies each on the hooked model, minimises and
    diagnoses it, and writes glitches.jsonl, summary.json and report.html to --out.
    """
    from ffinterp.analysis.glitches import find_glitches
    from ffinterp.analysis.search import STRATEGIES

    if ckpt is not None and not ckpt.strip():  # '' is not "the default model": say so
        fail("CKPT: empty path; give a checkpoint, or leave it out for the shipped default model")
    if strategy != "all" and strategy not in STRATEGIES:
        fail(f"--strategy must be one of {', '.join(sorted(STRATEGIES))} or all, got {strategy!r}")
    at_least(budget, "--budget")
    at_least(max_glitches, "--max-glitches")
    at_least(batch_size, "--batch-size")
    if device != "auto" and not (device == "cpu" or device.startswith("cuda")):
        fail(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    if seq_len is not None and (seq_len < 4 or seq_len % 2):
        fail(f"--seq-len must be an even number >= 4, got {seq_len}")
    if str(out) in ("", "."):  # an empty --out would scatter the output files over the working folder
        fail("--out: empty path; name a folder for glitches.jsonl, summary.json and report.html")
    from ffinterp import distributed

    spec = ckpt or PREFIX + DEFAULT_MODEL
    dist = distributed.init(device)  # under torchrun: shared work, rank 0 writes and prints
    report = find_glitches(
        spec,
        strategy,
        budget,
        seed=seed,
        device=dist.device if dist.active else device,
        out=out,
        minimize=not no_minimize,
        diagnose=not no_diagnose,
        resume=resume,
        seq_len=seq_len,
        batch_size=batch_size,
        max_glitches=max_glitches,
        progress=not quiet,
        dist=dist,
    )
    if not dist.is_main:
        return
    s = report.summary
    found = f"{count(len(report), 'verified glitch')} in {count(s['scored'], 'sequence')} scored"
    typer.echo(
        f"{found} (best margin {s['best_margin']:.4f}) -> {out}/glitches.jsonl, summary.json, report.html"
        if s["best_margin"] is not None
        else f"{found} -> {out}"
    )
    if len(report):
        typer.echo(report.table(10))
    if s["disagreements"]:
        n = count(s["disagreements"], "internal error")
        typer.echo(f"warning: {n} (fast and hooked models disagreed); see summary.json")
