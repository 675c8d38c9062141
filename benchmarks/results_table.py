"""The paper-style results of the shipped zoo, written to docs/results.md.

    python benchmarks/results_table.py            # from the index's measured figures
    python benchmarks/results_table.py --reeval   # re-measure every model first (slow)

Each cell is errors / reads scored with the per-read error rate and its 95% interval, then
the erring sequences with P(a sequence errs) and its exact Clopper-Pearson interval; zero
errors are an upper bound, never "0". The per-read interval takes the sequence as the unit
(errors cluster within sequences, see ``ffinterp.intervals``); index entries measured before
that carry the read-level Clopper-Pearson interval instead and no sequence counts, and their
cells are marked. Beside the table go the paper's and a
public reproduction's figures, the baseline's seed spread, and one paragraph per finding with
the ratios measured here. Whether the glitch finder still breaks each mitigated model comes
from ``docs/glitch_search.json``, written by ``python benchmarks/glitches.py --json ...``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ffinterp.data import STANDARD_SETS
from ffinterp.pretrained import PREFIX, index, trained_on
from ffinterp.text import count

SETS = (("in", "in-distribution FFL(0.8)"), ("sparse", "sparse FFL(0.98)"), ("dense", "dense FFL(0.1)"))
DOCS = Path(__file__).resolve().parent.parent / "docs"
OUT = DOCS / "results.md"
SEARCH = DOCS / "glitch_search.json"

BASELINE = "glitchy-512"
MITIGATIONS = {
    "dropout-512": "embedding dropout",
    "sharpen-512": "attention sharpening",
    "mixture-512": "the rare-sequence mixture (R4)",
}
LSTM = "lstm-512"

# The paper (Liu et al. 2023) and a public reproduction of its 6-layer baseline, at T=512.
REFERENCE = [
    (
        "paper: test-set sizes",
        "10^3 seqs, 26,508 reads",
        "10^5 seqs, 353,875 reads",
        "3,000 seqs, 345,781 reads",
    ),
    (
        "paper: 6L/512d/8H transformer (25 seeds)",
        "0 (but a few non-converged runs)",
        "sparse errors in most runs",
        "-",
    ),
    ("public reproduction, 6L/512d/8H, 10k steps x 16", "0 / 26,523", "5.99%", "1.57%"),
    ("paper: 1-layer LSTM, 128 hidden (R2)", "0", "0 (100 of 100 runs)", "0 (100 of 100 runs)"),
    ("paper: embedding dropout 0.5", "0", "about 100x fewer than the baseline", "-"),
    ("paper: attention sharpening", "0", "about 10x fewer, never 0", "-"),
    ("paper: mixture FFL(0.1, 0.9, 0.98) (R4)", "0", "best by far; 6 of 25 runs error-free", "-"),
]


OLD_MARK = "†"  # the interval of an older index entry: reads taken as independent


def _rate(count: int, rate: float, lo: float, hi: float) -> str:
    return f"< {hi:.1e}" if count == 0 else f"{rate:.1e} [{lo:.1e}, {hi:.1e}]"


def cell(r: dict) -> str:
    reads = (
        f"{r['errors']:,} / {r['reads']:,} ({_rate(r['errors'], r['error_rate'], r['ci_low'], r['ci_high'])})"
    )
    if "seq_ci_high" not in r:  # measured before the sequence-level figures existed
        return reads + OLD_MARK
    n = r.get("n_sequences", r.get("n_seqs"))
    seqs = _rate(r["seqs_with_error"], r["seqs_with_error"] / n, r["seq_ci_low"], r["seq_ci_high"])
    return f"{reads}; {r['seqs_with_error']:,} / {n:,} seqs ({seqs})"


def remeasure(entry: dict) -> dict:
    from ffinterp.checkpoints import load_checkpoint
    from ffinterp.evaluate import evaluate

    model = load_checkpoint(PREFIX + entry["name"]).model
    result = evaluate(model, seq_len=entry["seq_len"], device="cpu")
    return {s.name: {**s.to_dict(), "n_sequences": s.n_seqs} for s in result}


def table(models: list[dict]) -> list[str]:
    head = "| model | trained on | " + " | ".join(label for _, label in SETS) + " |"
    rule = "|---" * (2 + len(SETS)) + "|"
    rows = [
        f"| `{m['name']}` ({m['architecture']}, T={m['seq_len']}, {m['steps']} steps) | {trained_on(m)}"
        + "".join(f" | {cell(m['eval'][k])}" for k, _ in SETS)
        + " |"
        for m in models
    ]
    return [head, rule, *rows]


def ratio(base: dict, other: dict) -> str:
    """How many times fewer errors ``other`` makes than ``base`` on one set (a bound at 0)."""
    if base["errors"] == 0:
        return "not measurable (the baseline makes no error here)"
    if other["errors"] == 0:
        return f"at least {base['error_rate'] / other['ci_high']:.0f}x fewer (0 errors; 95% upper bound)"
    r = base["error_rate"] / other["error_rate"]
    return f"{r:.1f}x fewer" if r >= 1 else f"{1 / r:.1f}x more"


def seed_lines(entry: dict) -> list[str]:
    seeds = entry.get("seeds") or []
    if not seeds:
        return []
    out = [
        "",
        f"## Seed spread of `{entry['name']}`",
        "",
        "The paper stresses that error rates vary widely across seeds. The same command with",
        "each seed (the shipped one marked):",
        "",
        *([entry["seeds_note"], ""] if entry.get("seeds_note") else []),
        "| seed | " + " | ".join(label for _, label in SETS) + " |",
        "|---" * (1 + len(SETS)) + "|",
    ]
    for s in seeds:
        mark = " (shipped)" if s.get("shipped") else ""
        out.append(f"| {s['seed']}{mark} | " + " | ".join(cell(s["eval"][k]) for k, _ in SETS) + " |")
    return out


def search_lines(search: dict, names: list[str]) -> list[str]:
    """One line per model: the first verified glitch found by any strategy, or none."""
    out = []
    for name in names:
        rows = (search.get(name) or {}).get("rows")
        if not rows:
            out.append(f"`{name}`: not searched")
            continue
        hits = {k: r["first"] for k, r in rows.items() if r["first"] is not None}
        budget = max(r["scored"] for r in rows.values())
        if hits:
            k = min(hits, key=hits.get)
            total = count(sum(r["glitches"] for r in rows.values()), "verified glitch")
            out.append(
                f"`{name}`: broken; the first verified glitch came after {count(hits[k], 'sequence')} "
                f"(strategy {k}); {total} in all"
            )
        else:
            out.append(f"`{name}`: no verified glitch in {budget:,} sequences per strategy")
    return out


def findings(by: dict[str, dict], search: dict) -> list[str]:
    """One paragraph per finding, with the ratios measured on this zoo."""
    out = ["", "## Findings, beside the paper's", ""]
    base = by.get(BASELINE)
    if base is None:
        return out + [NO_BASELINE, "", *lstm_paragraph(by)]
    b = base["eval"]
    seeds = base.get("seeds") or []
    sparse_rates = [s["eval"]["sparse"]["error_rate"] for s in seeds]
    lo, hi = (min(sparse_rates), max(sparse_rates)) if sparse_rates else (0.0, 0.0)
    spread = (
        f" Across {len(seeds)} seeds (the seed table says how their training differs) the sparse "
        "error rate runs from "
        f"{lo:.1e} to {hi:.1e}" + (f", a {hi / lo:.0f}x spread" if lo > 0 else "") + " (the paper's R1 "
        "also stresses this variance)."
        if len(sparse_rates) > 1
        else ""
    )
    out.append(
        f"**R1: sparse errors.** `{BASELINE}` makes {b['in']['errors']} errors in "
        f"{b['in']['reads']:,} in-distribution reads, but {b['sparse']['errors']:,} in "
        f"{b['sparse']['reads']:,} sparse reads ({b['sparse']['error_rate']:.2%}) and "
        f"{b['dense']['errors']:,} in {b['dense']['reads']:,} dense reads ({b['dense']['error_rate']:.2%}). "
        f"The public 6L/512d reproduction reports 0 / 5.99% / 1.57%.{spread}"
        + (
            f" **Unlike the paper's baseline, ours is not error-free in distribution** "
            f"({b['in']['error_rate']:.1e} of in-distribution reads err): the 2-layer, d=128 model "
            "trained on this CPU has not converged at T=512, so its sparse errors sit on top of a "
            "small in-distribution error rather than appearing from zero. The sparse/in ratio is "
            f"{b['sparse']['error_rate'] / b['in']['error_rate']:.0f}x."
            if b["in"]["errors"]
            else ""
        )
    )
    out.append("")
    out.extend(lstm_paragraph(by))
    for name, what in MITIGATIONS.items():
        m = by.get(name)
        if m is None:
            continue
        e = m["eval"]
        out.append(
            f"**{what[0].upper() + what[1:]}** (`{name}`, {trained_on(m)}). Sparse: "
            f"{ratio(b['sparse'], e['sparse'])} than `{BASELINE}`; dense: {ratio(b['dense'], e['dense'])}; "
            f"in-distribution: {e['in']['errors']} errors. {PAPER_SAYS[name]}"
        )
        out.append("")
    mitigated = [n for n in MITIGATIONS if n in by]
    if mitigated:
        out.append(
            "**R7/R8: does the finder still break the mitigated models?** From "
            "`benchmarks/glitches.py` (docs/glitch_search.json):"
        )
        out.append("")
        out.extend(f"- {line}" for line in search_lines(search, [BASELINE, *mitigated, LSTM]))
        erring = [n for n in mitigated if by[n]["eval"]["in"]["errors"]]
        if erring:
            out += [
                "",
                "Here this says little: "
                + ", ".join(f"`{n}`" for n in erring)
                + " err in distribution, so even plain FFL(0.98) sampling finds a glitch within a few "
                "dozen sequences. The paper's R7/R8 (mitigated models with no error on the test sets "
                "still glitch) is shown at T=128 instead: `mitigated-128` makes 0 errors in 490,670 "
                "reads, and `evolve` still breaks it (README, Benchmarks).",
            ]
    return out


def lstm_paragraph(by: dict[str, dict]) -> list[str]:
    lstm = by.get(LSTM)
    if lstm is None:
        return []
    le = lstm["eval"]
    total = sum(le[k]["errors"] for k, _ in SETS)
    reads = sum(le[k]["reads"] for k, _ in SETS)
    verdict = (
        "as the paper's R2 predicts"
        if total == 0
        else "where the paper's R2 reports none: "
        + ", ".join(f"{le[k]['errors']} {k}" for k, _ in SETS)
        + f" (sparse {le['sparse']['error_rate']:.1e}, 95% interval [{le['sparse']['ci_low']:.1e}, "
        f"{le['sparse']['ci_high']:.1e}])"
    )
    return [
        f"**R2: the LSTM.** `{LSTM}` ({lstm['steps']} steps, batch {lstm['train_config']['batch_size']}, "
        f"lr {lstm['train_config']['lr']:g}) makes {total} errors in {reads:,} reads over the three sets, "
        f"{verdict}. This is one run, not the paper's 100, and it trained longer than the paper's 500 "
        "steps (see its commands in the index: 2,000 steps, then 4,000 more from those weights, which "
        "took it from 36 sparse errors in 567,373 reads to none); the recurrent model is orders of "
        "magnitude more reliable on sparse sequences than any transformer measured here.",
        "",
    ]


NO_BASELINE = """\
**The T=512 transformers are not shipped yet.** On this CPU no recipe tried so far reached the
paper's bar of zero in-distribution errors at T=512 (see issue 13's notes): the `micro` preset
(2L/64d) from scratch at batch 16, lr 1e-3, plateaued at about 20% read error on FFL(0.8) for
3,000 steps; `tiny`/`micro` at T=64 were still at 17-19% after 1,000 steps; the sinusoidal
`tiny` stayed at chance for 500 steps; and `glitchy-128` fine-tuned at T=512 (its 128 learned
position rows kept, 384 new ones learned) fell to about 1.2% in-distribution, 19% sparse and
25% dense error after 3,000 steps (two seeds, 128 sequences per set). The paper's baseline
reaches 0 with 6 layers, d_model 512 and 10,000 steps on a GPU."""


PAPER_SAYS = {
    "dropout-512": "The paper reports about two orders of magnitude fewer sparse errors at dropout 0.5; "
    "on this small model 0.5 broke the fine-tune (29% in-distribution error after 500 steps), so "
    "the shipped model uses 0.1, and it does not help here.",
    "sharpen-512": "The paper reports about one order of magnitude, and never zero errors.",
    "mixture-512": "The paper finds this remedy the best by a wide margin (6 of 25 runs error-free).",
}


CIRCUITS = Path(__file__).parents[1] / "docs" / "circuits.json"


def circuit_lines(circuits: dict, names: list[str]) -> list[str]:
    """Per model, from ``benchmarks/circuits.py``: the heads named by patching, where they look,
    the companions, and how the bit reaches the read head."""
    if not circuits:
        return []
    lines = [
        "",
        "## The read circuit of each model (patching, not attention)",
        "",
        "From `python benchmarks/circuits.py` (docs/circuits.json): each head's output at the read",
        "is patched from a clean run into one whose last write's bit is flipped; a head restoring",
        "at least half the logit difference is a read head. Where it looks is given by offset from",
        "the last write (`w`, its `bit`, `+2` the token after the bit, ...). Companions carry no",
        "bit but the read needs them (mean-ablating them at the read loses at least half the logit",
        "difference). The circuit lines come from path patching into the read head.",
        "",
        "| model | read heads (restored) | looks at | companions | w+bit attention of the head with most |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        c = circuits.get(name)
        if not c:
            continue
        eff = c["effect"]
        heads = ", ".join(f"{h} ({eff[int(h[1])][int(h[3])]:.2f})" for h in c["read_heads"])
        wm = c["write_mass"]
        top = max(((l, h) for l in range(len(wm)) for h in range(len(wm[0]))), key=lambda k: wm[k[0]][k[1]])
        decoy = f"L{top[0]}H{top[1]}: {wm[top[0]][top[1]]:.2f} on w+bit, restores {eff[top[0]][top[1]]:.2f}"
        comps = ", ".join(f"{h} on {o}" for h, o in c.get("companions", {}).items()) or "none"
        looks = ", ".join(f"{h} on {o}" for h, o in c["carrier"].items())
        lines.append(f"| `{name}` | {heads} | {looks} | {comps} | {decoy} |")
    for name in names:
        c = circuits.get(name)
        if c and c.get("circuit"):
            lines += ["", f"**`{name}`**", ""] + [f"- {x}" for x in c["circuit"]["summary"]]
    return lines


def render(models: list[dict], search: dict) -> str:
    by = {m["name"]: m for m in models}
    order = [BASELINE, *MITIGATIONS, LSTM]
    paper = sorted(
        (m for m in models if m["seq_len"] == 512),
        key=lambda m: order.index(m["name"]) if m["name"] in order else len(order),
    )
    small = [m for m in models if m["seq_len"] != 512]
    full = {k: spec.size for k, spec in STANDARD_SETS.items()}
    subset = [m["name"] for m in models if any(m["eval"][k]["n_sequences"] != full[k] for k, _ in SETS)]
    sizes = ", ".join(f"{k} {full[k]:,}" for k, _ in SETS)
    lines = [
        "# Results: the shipped zoo against the paper",
        "",
        "Generated by `python benchmarks/results_table.py` from `pretrained_index.json`, whose",
        "figures come from `ffinterp eval pretrained:NAME` on the three standard sets at their",
        f"default sizes ({sizes} sequences), each at the model's own length T.",
        *(
            [
                f"Exception, for CPU time: {', '.join(f'`{n}`' for n in subset)} were scored on the "
                "first sequences of each set only (the sequence counts are in the index; 1/10 of the "
                "sparse set); their error rates are far above what those sets can resolve.",
            ]
            if subset
            else []
        ),
        "Cells: errors / reads scored (per-read error rate [95% interval with the sequence as the",
        "unit, since errors cluster within sequences]); erring sequences / sequences (P(a sequence",
        "errs) [exact 95% Clopper-Pearson]). Zero errors give an upper bound.",
        *(
            [
                f"{OLD_MARK} measured before the sequence-level figures: the interval is the read-level "
                "Clopper-Pearson one, which treats reads as independent and so is too narrow."
            ]
            if any("seq_ci_high" not in m["eval"][k] for m in models for k, _ in SETS)
            else []
        ),
        "",
        "## The T=512 zoo (the paper's regime)",
        "",
        *table(paper),
        *seed_lines(by.get(BASELINE, {})),
        "",
        "## The paper's figures and a public reproduction (T=512)",
        "",
        "| source | " + " | ".join(label for _, label in SETS) + " |",
        "|---" * (1 + len(SETS)) + "|",
        *(f"| {' | '.join(row)} |" for row in REFERENCE),
        *findings(by, search),
        *circuit_lines(
            json.loads(CIRCUITS.read_text()) if CIRCUITS.exists() else {},
            [m["name"] for m in models if m["arch"] != "lstm"],
        ),
        "",
        "## Where this zoo differs from the paper",
        "",
        DIFFERENCES,
        "",
        "## The T=128 models (kept for fast tests)",
        "",
        *table(small),
        "",
        "At T=128 the sparse set's gaps are short: `glitchy-128` makes no sparse error at all,",
        "which is why the T=512 models above are the default everywhere.",
        "",
    ]
    return "\n".join(lines)


DIFFERENCES = """\
Everything here is trained by `ffinterp train` on this project's 2-core CPU, so the models are
far smaller than the paper's 6-layer, d_model 512 transformer (19M parameters, 10,000 steps at
batch 16 on a GPU), and each setting is one run where the paper trains 25 (100 for the LSTM).
`glitchy-512` starts from the T=128 model (`--init-from`, 128 learned position rows kept) and
trains 6,000 steps at T=512; it does not reach the paper's zero in-distribution errors (a run
continued from step 4,750 at learning rate 3e-4, batch 32 and no weight decay stood at 1.5e-3
in-distribution error, in a quick eval of 256 sequences, after 250 steps, and was stopped). The mitigated
models are fine-tunes of `glitchy-512` (500 steps; 1,000 for dropout), not runs from scratch,
so they inherit its in-distribution errors.
The test sets are the project's standard sets, larger than the paper's (16,000 / 160,000 /
4,000 sequences against 1,000 / 100,000 / 3,000), so a zero here is a tighter bound."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--reeval", action="store_true", help="Re-measure each model instead of reading the index."
    )
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--search", type=Path, default=SEARCH, help="glitches.py --json output")
    args = ap.parse_args()
    models = index()
    if args.reeval:
        for m in models:
            m["eval"] = remeasure(m)
    search = json.loads(args.search.read_text()) if args.search.exists() else {}
    text = render(models, search)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
