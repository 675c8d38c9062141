"""``ffinterp harden``: rounds of find glitches, fine-tune on them, measure."""

from __future__ import annotations

from pathlib import Path

import typer

from ffinterp.cli import app, check_out_dir, fail


def _ints(text: str, flag: str, n: int) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n or min(values) < 1:
        fail(f"{flag} expects {n} comma-separated sizes >= 1 (in,sparse,dense), got {text!r}")
    return values


@app.command()
def harden(
    ckpt: str = typer.Argument(..., help="ckpt.pt, nanoGPT, HF folder or pretrained:NAME to harden."),
    out: Path = typer.Option(
        ..., "--out", help="Run folder: rounds.jsonl, ckpt.pt, rounds.html, one folder per round."
    ),
    rounds: int = typer.Option(
        5, "--rounds", help="Rounds of find, fix, measure (fewer if nothing is found)."
    ),
    steps: int = typer.Option(500, "--steps", help="Fine-tune steps per round."),
    budget: int = typer.Option(20_000, "--budget", help="Sequences the glitch finder scores per round."),
    seed: int = typer.Option(0, "--seed", help="Seed of every search, sample and fine-tune."),
    replay: float = typer.Option(0.5, "--replay", help="Share of FFL(0.8) replay in every fine-tune batch."),
    strategies: str = typer.Option(
        "distribution,random,families", "--strategies", help="Finder strategies (must include distribution)."
    ),
    max_glitches: int = typer.Option(32, "--max-glitches", help="Stop each search after this many glitches."),
    patterns: int = typer.Option(8, "--patterns", help="Minimal glitches planted per round."),
    pool: int = typer.Option(8, "--pool", help="Adversary distributions trained on, over the last rounds."),
    batch_size: int = typer.Option(16, "--batch-size", help="Fine-tune batch size."),
    lr: float = typer.Option(3e-4, "--lr", help="Fine-tune peak learning rate (warmup, then linear decay)."),
    warmup: int = typer.Option(20, "--warmup", help="Fine-tune warmup steps."),
    ckpt_every: int = typer.Option(
        50, "--ckpt-every", help="Fine-tune checkpoint interval (what a kill costs)."
    ),
    eval_n: str = typer.Option("1000,5000,300", "--eval-n", help="Sequences of the in,sparse,dense subsets."),
    estimate_budget: int = typer.Option(
        20_000, "--estimate-budget", help="Sequences for the sparse-tail estimate (0: skip)."
    ),
    target_n: int = typer.Option(
        256, "--target-n", help="Fresh sequences per glitch distribution, before/after."
    ),
    seq_len: int = typer.Option(0, "--seq-len", help="Sequence length (0: the model's block size)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA if present), cpu, cuda, cuda:1 ..."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --out (after a kill, or with more rounds)."
    ),
    no_png: bool = typer.Option(False, "--no-png", help="Skip rounds.png (it needs chromium)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar and no per-round rows."),
) -> None:
    """Harden a model: find glitches, fine-tune on them, repeat."""
    import math

    from ffinterp.harden import harden as run

    if not ckpt.strip():
        fail("CKPT: empty path; give a checkpoint or pretrained:NAME")
    at_least_1 = {"--rounds": rounds, "--steps": steps, "--budget": budget, "--batch-size": batch_size,
                  "--max-glitches": max_glitches, "--pool": pool, "--target-n": target_n}  # fmt: skip
    for flag, value in at_least_1.items():
        if value < 1:
            fail(f"{flag} must be at least 1, got {value}")
    at_least_0 = {"--patterns": patterns, "--warmup": warmup, "--ckpt-every": ckpt_every,
                  "--estimate-budget": estimate_budget, "--seed": seed, "--seq-len": seq_len}  # fmt: skip
    for flag, value in at_least_0.items():
        if value < 0:
            fail(f"{flag} must be >= 0, got {value}")
    if not 0 <= replay < 1:
        fail(f"--replay must lie in [0, 1), got {replay}")
    if not (math.isfinite(lr) and lr > 0):
        fail(f"--lr must be a positive number, got {lr}")
    if 0 < estimate_budget < 200:
        fail(f"--estimate-budget must be 0 (skip) or at least 200, got {estimate_budget}")
    if seq_len and (seq_len < 4 or seq_len % 2):
        fail(f"--seq-len must be an even number >= 4, got {seq_len}")
    if device != "auto" and not (device == "cpu" or device.startswith("cuda")):
        fail(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    names = tuple(s.strip() for s in strategies.split(",") if s.strip())
    if "distribution" not in names:
        fail(f"--strategies must include distribution (the adversary), got {strategies!r}")
    sizes = _ints(eval_n, "--eval-n", 3)
    check_out_dir(out)
    if out.is_dir() and any(p.name != ".lock" for p in out.iterdir()) and not resume:
        fail(f"--out {out}: folder is not empty; pass --resume to continue the run there, or choose another")
    result = run(
        ckpt, out, rounds=rounds, steps_per_round=steps, budget=budget, seed=seed, replay=replay,
        strategies=names, max_glitches=max_glitches, patterns=patterns, pool=pool, batch_size=batch_size,
        lr=lr, warmup=warmup, ckpt_every=ckpt_every, eval_n=sizes, estimate_budget=estimate_budget,
        target_n=target_n, seq_len=seq_len or None, resume=resume, device=device, progress=not quiet,
        png=not no_png, on_start=lambda command: typer.echo(f"settings: {command}"),
    )  # fmt: skip
    typer.echo(result.stopped)
    files = "rounds.jsonl, ckpt.pt, rounds.html" + (", rounds.png" if (out / "rounds.png").exists() else "")
    typer.echo(f"-> {out}/ ({files})")
    if "png" in result.extra:
        typer.echo(f"rounds.png {result.extra['png']}")
