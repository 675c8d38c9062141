"""``ffinterp train``: the paper's recipe and mitigations from the shell."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

from ffinterp.cli import Command, app, check_out_dir, fail


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{flag} expects comma-separated numbers like 0.1,0.9,0.98, got {text!r}")
        raise


@app.command(cls=Command)
def train(
    out: Path = typer.Option(..., "--out", help="Run folder; ckpt.pt is written there."),
    preset: str = typer.Option("tiny", "--preset", help="micro, tiny, small, paper or lstm."),
    steps: int = typer.Option(10_000, "--steps", min=1),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    seq_len: int = typer.Option(512, "--seq-len", min=4),
    block_size: int = typer.Option(
        0, "--block-size", min=0, help="Positions the model holds (default: --seq-len); train short first."
    ),
    lr: float = typer.Option(3e-4, "--lr", min=0.0),
    weight_decay: float = typer.Option(0.1, "--weight-decay", min=0.0),
    warmup: int = typer.Option(50, "--warmup", min=0),
    loss: str = typer.Option("reads", "--loss", help="reads (read targets only) or all (next token)."),
    p_i: float = typer.Option(0.8, "--p-i", help="Train on FFL(p_i)."),
    mixture: str = typer.Option("", "--mixture", help="Train on a mixture, e.g. 0.1,0.9,0.98."),
    embd_dropout: float = typer.Option(0.0, "--embd-dropout", min=0.0, max=0.99),
    attn_dropout: float = typer.Option(0.0, "--attn-dropout", min=0.0, max=0.99),
    resid_dropout: float = typer.Option(0.0, "--resid-dropout", min=0.0, max=0.99),
    pos_embedding: str = typer.Option("learned", "--pos-embedding", help="learned or sinusoidal."),
    sharpen: float = typer.Option(0.0, "--sharpen", min=0.0, help="Attention-entropy penalty weight."),
    sharpen_anneal: str = typer.Option("none", "--sharpen-anneal", help="none or linear (0 -> --sharpen)."),
    eval_every: int = typer.Option(500, "--eval-every", min=0),
    eval_n: int = typer.Option(128, "--eval-n", min=1),
    ckpt_every: int = typer.Option(500, "--ckpt-every", min=0),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device"),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/ckpt.pt."),
    init_from: str = typer.Option(
        "", "--init-from", help="Fine-tune: start from this checkpoint's weights (or pretrained:NAME)."
    ),
) -> None:
    """Train a model on flip-flop data.

    Ctrl-C or SIGTERM saves a valid checkpoint; --resume continues it bit-exactly.
    """
    import math

    from ffinterp.train import TrainConfig
    from ffinterp.train import train as run

    check_out_dir(out)
    for flag, value in (("--lr", lr), ("--weight-decay", weight_decay), ("--sharpen", sharpen)):
        if not math.isfinite(value):
            fail(f"{flag} must be a finite number, got {value}")
    if device != "auto" and not (device == "cpu" or device.startswith("cuda")):
        fail(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda"):
        import torch

        try:
            torch.device(device)
        except RuntimeError:
            fail(f"--device must be auto, cpu or cuda[:N], got {device!r}")
        if not torch.cuda.is_available():
            fail(f"--device {device}: CUDA is not available on this machine")
    if pos_embedding not in ("learned", "sinusoidal"):
        fail(f"--pos-embedding must be learned or sinusoidal, got {pos_embedding!r}")
    try:
        cfg = TrainConfig(
            preset=preset,
            seq_len=seq_len,
            block_size=block_size,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            warmup=warmup,
            loss=loss,
            p_i=p_i,
            mixture=_floats(mixture, "--mixture"),
            embd_dropout=embd_dropout,
            attn_dropout=attn_dropout,
            resid_dropout=resid_dropout,
            pos_embedding=pos_embedding,
            sharpen=sharpen,
            sharpen_anneal=sharpen_anneal,
            eval_every=eval_every,
            eval_n=eval_n,
            ckpt_every=ckpt_every,
            seed=seed,
            device=device,
            init_from=init_from,
        )
    except ValueError as e:
        fail(str(e))
    command = "ffinterp " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["train"] else ""
    result = run(cfg, out, resume=resume, command=command)
    state = "interrupted at" if result.interrupted else "finished"
    evals = ", ".join(f"{k} {v:.2e}" for k, v in result.final_eval.items() if k in ("in", "sparse", "dense"))
    typer.echo(f"{state} step {result.steps} in {result.wall_time:.0f} s -> {result.path}  {evals}")
    if result.interrupted:
        raise typer.Exit(130)
