"""``ffinterp attention``: where a model's heads look at the reads of one sequence."""

from __future__ import annotations

from pathlib import Path

import typer

from ffinterp.cli import Command, app, check_out_file, fail
from ffinterp.text import count

SPARSE_P_I = 0.98


def _choose_reads(spec: str | None, n_reads: int) -> list[int]:
    """``--read``: an index among the sequence's reads (negative from the end), a comma
    list of them, or ``all``; default the last read."""
    if n_reads == 0:
        fail("the sequence has no reads")
    if spec is None:
        return [n_reads - 1]
    if spec.strip().lower() == "all":
        return list(range(n_reads))
    out = []
    for part in spec.split(","):
        try:
            k = int(part)
        except ValueError:
            fail(f"--read must be an integer, a comma list of them, or 'all', got {spec!r}")
        if not -n_reads <= k < n_reads:
            fail(
                f"--read {k}: the sequence has {count(n_reads, 'read')} "
                f"(use 0..{n_reads - 1}, or negative from the end)"
            )
        out.append(k % n_reads)
    return out


@app.command(cls=Command)
def attention(
    ckpt: str = typer.Argument(..., metavar="CKPT", help="ckpt.pt, nanoGPT, HF folder or pretrained:NAME."),
    seq: str = typer.Option(None, "--seq", help="One sequence as text, e.g. 'w1i0i1r1'."),
    seq_file: Path = typer.Option(None, "--seq-file", help="Text lines, jsonl or parquet; see --row."),
    row: int = typer.Option(0, "--row", help="Which sequence of --seq-file (0-based)."),
    layer: int = typer.Option(None, "--layer", help="Plot this layer's --head."),
    head: int = typer.Option(None, "--head", help="Head within --layer."),
    all_heads: bool = typer.Option(False, "--all-heads", help="Plot every head's pattern in a grid."),
    read: str = typer.Option(None, "--read", help="Read index K (negative from the end), 'K,L' or 'all'."),
    bars: bool = typer.Option(False, "--bars", help="Plot the chosen read as bars, not a heatmap."),
    out: Path = typer.Option(None, "--out", help="Write the figure: .html, .png or .svg."),
    ref_n: int = typer.Option(32, "--ref-n", min=1, help="Sequences per set for read-head detection."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sparse sequence used without --seq."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA if present), cpu, cuda ..."),
) -> None:
    """Name the read heads by patching, and show where they look.

    Prints the causal table (what each head's output at the read carries), where the read
    and companion heads look relative to the last write, the circuit from path patching, and
    each head's attention on its target at the chosen reads; plots a heatmap with --out.
    """
    from ffinterp.language import reads, sample, validate
    from ffinterp.viz import HTML_SUFFIXES, IMAGE_SUFFIXES

    if seq is not None and seq_file is not None:
        fail("give --seq or --seq-file, not both")
    if (layer is None) != (head is None):
        fail("--layer and --head go together")
    if all_heads and layer is not None:
        fail("give --layer/--head or --all-heads, not both")
    if all_heads and bars:
        fail("--bars plots one head at one read; it does not combine with --all-heads")
    if out is not None and out.suffix.lower() not in HTML_SUFFIXES + IMAGE_SUFFIXES:
        fail(f"--out {out}: unknown figure format {out.suffix or '(no suffix)'!r} (use .html, .png or .svg)")
    check_out_file(out)
    if device != "auto" and not (device == "cpu" or device.startswith("cuda")):
        fail(f"--device must be auto, cpu or cuda[:N], got {device!r}")

    from ffinterp.data import read_sequences
    from ffinterp.language import from_text

    source = None
    if seq is not None:
        validate(seq, where="--seq: ")
        tokens = from_text(seq)[None]
    elif seq_file is not None:
        batch = read_sequences(seq_file)
        if not 0 <= row < len(batch):
            fail(f"--row {row}: {seq_file} holds {len(batch)} sequences")
        tokens = batch[row : row + 1]
    else:
        tokens = None

    from ffinterp.analysis.attention import full_patterns, head_name, read_attention
    from ffinterp.analysis.readheads import detect_read_heads, offset_label
    from ffinterp.hooked import load_model

    model = load_model(ckpt, device=device)
    if model.hooked is None:
        fail(f"{ckpt}: an LSTM has no attention heads to show")
    block = model.cfg.block_size
    if tokens is None:
        tokens = sample(1, block, SPARSE_P_I, seed=seed)
        source = f"sampled sparse FFL({SPARSE_P_I}), seed {seed}"
    if tokens.shape[-1] > block:
        fail(f"the sequence has {tokens.shape[-1]} tokens; {ckpt} takes at most {block}")
    if layer is not None and not (0 <= layer < model.n_layers and 0 <= head < model.n_heads):
        fail(f"--layer {layer} --head {head}: the model has {model.n_layers} layers of {model.n_heads} heads")

    rd = reads(tokens)
    chosen = _choose_reads(read, len(rd))
    rh = detect_read_heads(model, "in", "sparse", n=ref_n, seq_len=block)
    shown = list(rh.targets)  # the read heads, then the companion heads
    if layer is not None and (layer, head) not in shown:
        shown.append((layer, head))
    ra = read_attention(model, tokens, read_heads=rh.heads, carrier=rh.carrier)
    scores = model.predict_reads(tokens)

    typer.echo(f"model: {model.name} ({model.n_layers} layers x {model.n_heads} heads, {model.tl_line})")
    typer.echo(
        f"sequence: {count(tokens.shape[-1], 'token')}, {count(len(rd), 'read')}"
        + (f" ({source})" if source else "")
    )
    typer.echo(rh.table(limit=8))
    typer.echo("")
    cols = "".join(f"{head_name(*h):>8}" for h in shown)
    header = f"{'read':>5}{'pos':>6}{'gap':>6}{'bit':>5}{'pred':>6}{'p(bit)':>8}{cols}"
    looks = ", ".join(f"{head_name(*h)} on {offset_label(t)}" for h, t in rh.targets.items())
    typer.echo(f"attention on each head's target relative to the last write ({looks}) at each chosen read:")
    typer.echo(f"{header}  top keys of {head_name(*shown[0])}")
    l0, h0 = shown[0]
    for k in chosen:
        wp, pos = int(rd.write_pos[k]), int(rd.pos[k])
        vals = "".join(
            f"{float(ra.rows[k, l, h, min(wp + rh.targets.get((l, h), rh.carrier), pos)]):>8.4f}"
            for l, h in shown
        )
        top = " ".join(f"{t['pos']}:{t['token']}({t['mass']:.2f})" for t in ra.top(k, l0, h0))
        bit = "01"[int(rd.bit[k]) - 3]
        pred = "wri01"[int(scores.pred[k])]
        typer.echo(
            f"{k:>5}{int(rd.pos[k]):>6}{int(rd.gap[k]):>6}{bit:>5}{pred:>6}{float(scores.p_correct[k]):>8.4f}"
            f"{vals}  {top}"
        )

    if out is None:
        return
    from ffinterp.viz import pattern_figure, pattern_grid, save_figure

    target = (layer, head) if layer is not None else rh.heads[0]
    if all_heads:
        fig = pattern_grid(full_patterns(model, tokens)[0], tokens[0], read_heads=rh.heads)
    elif bars:
        fig = ra.plot(read=chosen[0], head=target)
    else:
        pat = full_patterns(model, tokens)[0, target[0], target[1]]
        marks = [(int(rd.pos[k]), int(rd.write_pos[k])) for k in chosen]
        star = " (read head)" if target in rh.heads else ""
        fig = pattern_figure(
            pat,
            tokens[0],
            layer=target[0],
            head=target[1],
            reads=marks,
            title=f"{model.name}: {head_name(*target)}{star} attention pattern",
        )
    save_figure(fig, out)
    typer.echo(f"wrote {out}")
