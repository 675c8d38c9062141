"""``ffinterp patch``: causal patching of one clean/corrupted pair, as a table and a figure."""

from __future__ import annotations

from pathlib import Path

import typer

from ffinterp.cli import Command, app, check_out_file, fail

WHAT = {
    "heads": "z",
    "resid": "resid_pre",
    "attn": "attn_out",
    "mlp": "mlp_out",
    "q": "q",
    "k": "k",
    "v": "v",
    "pattern": "pattern",
    "path": "path",
}
SAMPLE_TRIES = 256


def _pair_for(
    model, seq: str | None, corrupt: str, read: int | None, seq_len: int, p_i: float, seed: int, metric
):
    """The pair (and its metric) for --seq, or for the first fitting sampled sequence."""
    from ffinterp.analysis.pairs import make_pair
    from ffinterp.analysis.patching import patch_metric
    from ffinterp.errors import FFInterpError
    from ffinterp.language import sample

    if seq is not None:
        pair = make_pair(seq, corrupt, read)
        return pair, patch_metric(model, pair, metric)
    rows = sample(SAMPLE_TRIES, seq_len, p_i, seed=seed)
    last = ""
    for row in rows:
        try:
            pair = make_pair(row, corrupt, read)
            return pair, patch_metric(model, pair, metric)
        except FFInterpError as e:
            last = str(e)
    fail(f"no sampled sequence (seed {seed}, {SAMPLE_TRIES} tries) fits --corrupt {corrupt}: {last}")


@app.command(cls=Command)
def patch(
    ckpt: str = typer.Argument(..., metavar="CKPT", help="ckpt.pt, nanoGPT, HF folder or pretrained:NAME."),
    seq: str = typer.Option(None, "--seq", help="The clean sequence as text (default: a sampled one)."),
    corrupt: str = typer.Option(
        "flip-last-write", "--corrupt", help="flip-last-write, ignore-last-write or move-last-write."
    ),
    what: str = typer.Option("heads", "--what", help="heads, resid, attn, mlp, q, k, v, pattern or path."),
    read: int = typer.Option(None, "--read", help="Score the K-th read (negative from the end)."),
    by_pos: bool = typer.Option(False, "--by-pos", help="Heads/q/k/v/pattern: one site per position."),
    receiver: str = typer.Option(
        "logits", "--receiver", help="--what path: 'logits' or heads like L1H0,L1H1."
    ),
    via: str = typer.Option("k", "--via", help="--what path: the receivers' q, k and/or v (e.g. kv)."),
    metric: str = typer.Option("logit_diff", "--metric", help="logit_diff, prob or ce."),
    top: int = typer.Option(10, "--top", min=1, help="Rows of the printed table."),
    attribution: bool = typer.Option(False, "--attribution", help="Also check attribution patching."),
    out: Path = typer.Option(None, "--out", help="Write the heatmap: .html, .png or .svg."),
    seq_len: int = typer.Option(
        None, "--seq-len", help="Length of the sampled sequence (default: the model's)."
    ),
    p_i: float = typer.Option(0.8, "--p-i", min=0.0, max=0.999999, help="FFL(p_i) of the sampled sequence."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampled sequence."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA if present), cpu, cuda ..."),
) -> None:
    """Causal patching: which sites carry the read's answer.

    Patches clean activations into the corrupted run and prints the sites that restore
    the read.
    """
    from ffinterp.analysis.pairs import CORRUPTIONS
    from ffinterp.analysis.patching import METRICS
    from ffinterp.viz import HTML_SUFFIXES, IMAGE_SUFFIXES

    if what not in WHAT:
        fail(f"--what must be one of {', '.join(WHAT)}, got {what!r}")
    if corrupt not in CORRUPTIONS:
        fail(f"--corrupt must be one of {', '.join(CORRUPTIONS)}, got {corrupt!r}")
    if metric not in METRICS:
        fail(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if out is not None and out.suffix.lower() not in HTML_SUFFIXES + IMAGE_SUFFIXES:
        fail(f"--out {out}: unknown figure format {out.suffix or '(no suffix)'!r} (use .html, .png or .svg)")
    check_out_file(out)
    if device != "auto" and not (device == "cpu" or device.startswith("cuda")):
        fail(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    if seq_len is not None and (seq_len < 4 or seq_len % 2):
        fail(f"--seq-len must be an even number >= 4, got {seq_len}")
    if attribution and what == "path":
        fail("--attribution applies to activation patching, not to --what path")

    from ffinterp.analysis.attribution import compare_attribution
    from ffinterp.analysis.pairs import make_pair
    from ffinterp.analysis.patching import activation_patch, path_patch
    from ffinterp.hooked import load_model

    if seq is not None:
        from ffinterp.language import validate

        validate(seq, where="--seq: ")
        make_pair(seq, corrupt, read)  # bad --seq or --read: say so before loading the model

    model = load_model(ckpt, device=device)
    if model.hooked is None:
        fail(f"{ckpt}: an LSTM has no attention heads to patch")
    n_ctx = model.cfg.block_size
    length = seq_len or int(model.meta.get("seq_len") or n_ctx)
    if length > n_ctx:
        fail(f"--seq-len {length} exceeds the model's context {n_ctx}")
    pair, m = _pair_for(model, seq, corrupt, read, length, p_i, seed, metric)
    typer.echo(f"model {model.name}: {pair.describe()}")
    typer.echo(f"{metric}: clean {m.clean:+.4f}, corrupted {m.corrupted:+.4f} (normalised to 1 and 0)")
    if seq is None:
        typer.echo(f"clean:     {pair.clean_text}")
        typer.echo(f"corrupted: {pair.corrupted_text}")
    positional = what != "path" and (WHAT[what] in ("resid_pre", "attn_out", "mlp_out") or by_pos)
    if what == "path":
        receivers = receiver if receiver == "logits" else [r for r in receiver.split(",") if r.strip()]
        result = path_patch(model, pair, receivers, via=via, metric=m)
    else:
        result = activation_patch(model, pair, WHAT[what], by_pos=positional, metric=m)
    typer.echo(str(result.top(top)))
    for note in result.notes:
        typer.echo(f"note: {note}")
    if attribution:
        typer.echo(str(compare_attribution(model, pair, WHAT[what], by_pos=positional, metric=m)))
    if out is not None:
        result.save(out)
        typer.echo(f"figure -> {out}")
