"""``ffinterp estimate CKPT``: how often does the model make a read error, far below sampling?"""

from __future__ import annotations

import json

import typer

from ffinterp.cli import Command, app, at_least, fail


@app.command("estimate", cls=Command)
def estimate_command(
    ckpt: str = typer.Argument(
        ..., metavar="CKPT", help="ckpt.pt (ffinterp or nanoGPT), a GPT-2 folder, or pretrained:NAME."
    ),
    p_i: float = typer.Option(0.98, "--p-i", help="Target distribution FFL(p_i)."),
    seq_len: int = typer.Option(
        None, "--seq-len", help="Tokens per sequence (even; default: the model's block size)."
    ),
    budget: int = typer.Option(
        20_000,
        "--budget",
        help="Sequences the estimate scores, pilot rounds included; with --maximize, the search "
        "and --confirm together. --plant's proposal is built from --plant-budget more.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of every sample drawn."),
    method: str = typer.Option("is", "--method", help="is (importance sampling) or mc (plain sampling)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Sequences per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
    maximize: bool = typer.Option(
        False,
        "--maximize",
        help="Instead: search for the FFL distribution with the most read errors (CMA-ES).",
    ),
    per_eval: int = typer.Option(
        64, "--per-eval", help="With --maximize: sequences per candidate distribution."
    ),
    confirm: int = typer.Option(
        2_000, "--confirm", help="With --maximize: of --budget, fresh sequences to re-measure the best."
    ),
    journal: str = typer.Option(
        None, "--journal", help="Record scored chunks in this file; rerun with it to resume a killed run."
    ),
    plant: str = typer.Option(
        None,
        "--plant",
        help="Start the proposal from these glitches (a find-glitches folder or its glitches.jsonl): "
        "for models with no errors on the sparse set.",
    ),
    shrink_top: int = typer.Option(
        5,
        "--shrink",
        help="With --plant: shrink the N patterns that carry the most errors (0: keep them as found).",
    ),
    plant_budget: int = typer.Option(
        100_000,
        "--plant-budget",
        help="With --plant: at most this many sequences to shrink and weigh the patterns (before --budget).",
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="With --plant: plant glitches another model (or another --seq-len) found, instead of refusing.",
    ),
) -> None:
    """How often reads err, far below what sampling sees.

    P[a sequence has a read error] under FFL(p_i), by importance sampling (or plain sampling).

    With --maximize, search instead for the piecewise FFL distribution (started at FFL(p_i))
    with the highest read-error rate, and re-measure it on --confirm fresh sequences.

    With --plant, the importance-sampling proposal starts from the glitches of a
    find-glitches run (each a pattern of a few writes and reads, planted at random places
    in target sequences). A model with no errors on the sparse set needs this: no smooth
    family reaches its rare error patterns.

    An interval the weights cannot support is never printed: the point estimate comes with
    an "interval not reliable" line instead (and null bounds plus a warning in --json).
    """
    from ffinterp.analysis.families import FFL
    from ffinterp.analysis.tail import METHODS, estimate

    if method not in METHODS:
        fail(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if not 0.0 <= p_i < 1.0:
        fail(f"--p-i must lie in [0, 1), got {p_i}")
    at_least(budget, "--budget")
    at_least(batch_size, "--batch-size")
    if seq_len is not None and (seq_len < 4 or seq_len % 2):
        fail(f"--seq-len must be an even number >= 4, got {seq_len}")
    from ffinterp import distributed

    dist = distributed.init(device)  # under torchrun: each rank scores a share of every sample
    if maximize:
        if dist.active:
            fail("--maximize does not shard across ranks yet: run it without torchrun")
        from ffinterp.analysis.adversary import default_family
        from ffinterp.analysis.adversary import maximize as run_maximize

        at_least(per_eval, "--per-eval")
        at_least(confirm, "--confirm")
        if budget < confirm + per_eval:
            fail(
                f"--budget {budget} must be >= --confirm + --per-eval ({confirm} + {per_eval}): "
                "the search needs at least one candidate's sample"
            )
        found = run_maximize(
            ckpt, start=default_family(p_i=p_i), seq_len=seq_len, budget=budget, per_eval=per_eval,
            confirm=confirm, seed=seed, batch_size=batch_size, device=device, progress=progress,
        )  # fmt: skip
        typer.echo(json.dumps(found.to_dict(), indent=2) if as_json else str(found))
        return
    kw = dict(
        budget=budget, seed=seed, seq_len=seq_len, batch_size=batch_size, progress=progress,
        device=dist.device if dist.active else device, journal=journal, dist=dist,
    )  # fmt: skip
    if plant is None:
        result = estimate(ckpt, FFL.from_p_i(p_i), method=method, **kw)
    else:
        if method != "is":
            fail("--plant shapes the importance-sampling proposal: use it with --method is")
        at_least(shrink_top, "--shrink", 0)
        at_least(plant_budget, "--plant-budget")
        from ffinterp.analysis.patterns import estimate_planted, glitch_mismatch, read_glitches
        from ffinterp.analysis.tail import checked_model

        model, t, _ = checked_model(ckpt, seq_len, kw["device"])  # loaded once, for both stages
        why = glitch_mismatch(plant, model, t)
        if why and not force:
            fail(f"{why}; pass --force to plant them anyway")
        if why and dist.is_main:
            typer.echo(f"warning: planting another model's patterns: {why}", err=True)
        result = estimate_planted(
            model, FFL.from_p_i(p_i), read_glitches(plant), top=shrink_top, build_budget=plant_budget, **kw
        )
    if dist.is_main:
        typer.echo(json.dumps(result.to_dict(), indent=2) if as_json else str(result))
