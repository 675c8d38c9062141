"""Glitch-finder efficiency per strategy and per shipped transformer, against the paper's
baseline (sampling FFL(0.98)), in one run.

For every transformer in ``ffinterp.pretrained.index()`` (or, if the zoo is empty, a tiny
model trained here, which the output says) and every strategy, one search of up to
``--budget`` sequences reports:

* sequences scored until the first verified glitch (and how many times fewer than the
  baseline needed; a ``>=`` bound when the baseline found none within its budget);
* distinct verified glitches per 10^5 sequences scored;
* the mean minimised length (tokens) and active instructions of up to ``--minimize``
  of its glitches.

The hand-built circuit (:mod:`ffinterp.models.constructed`) just below its exact sharpness
is added as a model whose glitches are known in closed form and rare under sampling.

Targets (issue 7): on the glitchy model the best strategy finds its first glitch with at
least 100x fewer sequences than the baseline; on the mitigated model (0 errors on the
standard sets) verified glitches appear within 10^5 sequences scored on CPU.

    python benchmarks/glitches.py [--budget 100000] [--models glitchy-128,mitigated-128]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from ffinterp.analysis.glitches import GlitchFinder
from ffinterp.analysis.minimize import minimize
from ffinterp.analysis.search import Evolve, Families, Gradient, Random
from ffinterp.language import from_text
from ffinterp.text import count

BASELINE = "random FFL(0.98)"


def strategies() -> dict[str, object]:
    return {
        BASELINE: Random(p_is=(0.98,)),
        "random (p_i sweep)": Random(),
        "families": Families(),
        "evolve": Evolve(),
        "gradient": Gradient(),
    }


def models(names: list[str] | None, fallback_steps: int, device: str) -> list[tuple[str, object, str]]:
    """(name, FFLModel, note) for each shipped transformer, or a model trained here."""
    from ffinterp.hooked import load_model
    from ffinterp.pretrained import index

    entries = [e for e in index() if e.get("architecture", e.get("arch", "gpt")) != "lstm"]
    entries = [e for e in entries if "lstm" not in e["name"]]
    if names:
        entries = [e for e in entries if e["name"] in names]
    if entries:
        out = []
        for e in entries:
            m = load_model(f"pretrained:{e['name']}", device=device)
            note = ", ".join(
                f"{k} {v.get('errors')}/{v.get('reads')}" for k, v in (e.get("eval") or {}).items()
            )
            out.append((e["name"], m, note or "shipped"))
        return out
    from ffinterp.hooked import FFLModel
    from ffinterp.train import TrainConfig, train

    print(f"NOTE: the pretrained zoo is empty: training a tiny model here ({fallback_steps} steps, T=64)")
    folder = tempfile.mkdtemp(prefix="ffinterp-bench-")
    cfg = TrainConfig(
        preset="tiny", seq_len=64, steps=fallback_steps, batch_size=32, lr=3e-3, warmup=20,
        eval_every=0, ckpt_every=0, device="cpu",
    )  # fmt: skip
    res = train(cfg, folder, progress=False)
    from ffinterp.checkpoints import load_checkpoint

    fast = load_checkpoint(res.path).model
    return [
        ("trained-here-T64", FFLModel.from_fast(fast, device=device, name="trained-here"), "trained here")
    ]


def circuit(sharpness: float, seq_len: int, device: str) -> tuple[str, object, str]:
    """The hand-built circuit just below the sharpness where it is exact: its only glitches
    are reads after several opposite-bit writes packed before the last write (closed form)."""
    from ffinterp.models.constructed import circuit_model, min_exact_sharpness

    m = circuit_model(sharpness, block_size=seq_len, device=device)
    note = f"hand-built circuit, sharpness {sharpness:g} (exact above {min_exact_sharpness(seq_len):.1f})"
    return (f"circuit-{sharpness:g}", m, note)


def run_one(model, strategy, budget: int, seed: int, max_glitches: int, n_min: int) -> dict:
    t0 = time.perf_counter()
    finder = GlitchFinder(
        model,
        strategy=strategy,
        budget=budget,
        seed=seed,
        minimize=False,
        diagnose=False,
        max_glitches=max_glitches,
    )
    report = finder.run()
    wall = time.perf_counter() - t0
    s = report.summary
    st = next(iter(s["strategies"].values()))
    lengths, active = [], []
    for g in report.glitches[:n_min]:
        m = minimize(model.fast, from_text(g["text"]), g["read_pos"], device=model.device)
        lengths.append(m.length)
        active.append(m.active)
    return {
        "scored": s["scored"],
        "first": st["first_glitch_at"],
        "glitches": len(report),
        "per_1e5": len(report) / max(s["scored"], 1) * 1e5,
        "disagreements": s["disagreements"],
        "mean_min_len": sum(lengths) / len(lengths) if lengths else None,
        "mean_min_active": sum(active) / len(active) if active else None,
        "seq_per_s": s["scored"] / wall,
        "wall_s": wall,
    }


def fmt(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=100_000, help="sequences per strategy and model")
    ap.add_argument("--models", default="", help="comma-separated pretrained names (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-glitches", type=int, default=1000, help="stop a search after this many")
    ap.add_argument("--minimize", type=int, default=10, help="glitches minimised per search")
    ap.add_argument("--fallback-steps", type=int, default=1500)
    ap.add_argument("--json", default="", help="also write all figures here")
    ap.add_argument(
        "--circuit-sharpness", type=float, default=40.0, help="also the hand-built circuit (0: skip)"
    )
    ap.add_argument("--circuit-seq-len", type=int, default=128)
    args = ap.parse_args()
    print(
        f"glitch finder benchmark: budget {args.budget} per search, seed {args.seed}, "
        f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    )
    results = {}
    todo = models([n for n in args.models.split(",") if n], args.fallback_steps, args.device)
    if args.circuit_sharpness > 0:
        todo.append(circuit(args.circuit_sharpness, args.circuit_seq_len, args.device))
    for name, model, note in todo:
        print(f"\n== {name} ({note}; T={model.cfg.block_size}, device {model.device})")
        rows = {}
        for label, strat in strategies().items():
            rows[label] = run_one(model, strat, args.budget, args.seed, args.max_glitches, args.minimize)
            r = rows[label]
            print(f"   {label:<20} done: {r['scored']} scored in {r['wall_s']:.0f} s", flush=True)
        base = rows[BASELINE]
        head = [
            "strategy",
            "first glitch at",
            "vs baseline",
            "glitches",
            "per 1e5",
            "min len",
            "active",
            "seq/s",
        ]
        table = [head]
        for label, r in rows.items():
            if r["first"] is None:
                ratio = "-"
            elif base["first"] is None:
                ratio = f">={base['scored'] / r['first']:.0f}x"
            else:
                ratio = f"{base['first'] / r['first']:.1f}x"
            first = str(r["first"]) if r["first"] is not None else f">{r['scored']}"
            per, ml = fmt(r["per_1e5"], ".0f"), fmt(r["mean_min_len"], ".1f")
            ma, sps = fmt(r["mean_min_active"], ".1f"), fmt(r["seq_per_s"], ".0f")
            table.append([label, first, ratio, str(r["glitches"]), per, ml, ma, sps])
        widths = [max(len(row[k]) for row in table) for k in range(len(head))]
        for row in table:
            print("   " + "  ".join(c.ljust(w) for c, w in zip(row, widths)))
        firsts = [r["first"] for k, r in rows.items() if k != BASELINE and r["first"] is not None]
        if firsts:
            best = min(firsts)
            bound = base["first"] if base["first"] is not None else base["scored"]
            rel = ">=" if base["first"] is None else ""
            print(
                f"   best strategy: first glitch after {count(best, 'sequence')}, "
                f"{rel}{bound / best:.0f}x fewer than the baseline"
            )
        else:
            print(f"   no strategy found a verified glitch within {args.budget} sequences")
        dis = sum(r["disagreements"] for r in rows.values())
        print(f"   fast/hooked disagreements (internal errors): {dis}")
        results[name] = {"note": note, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
