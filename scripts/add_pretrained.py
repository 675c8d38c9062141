"""Add a trained run to the shipped zoo: weights only, measured error rates, sha256.

    python scripts/add_pretrained.py eval RUN_DIR [RUN_DIR ...]
    python scripts/add_pretrained.py add NAME RUN_DIR --description "..." [--command "..."]...
        [--seed-run OTHER_RUN_DIR]... [--init-from NAME]
    python scripts/add_pretrained.py reeval NAME [NAME ...] --work DIR

``eval`` scores a run's ``ckpt.pt`` with :func:`ffinterp.evaluate.evaluate` on the three
standard sets at their default sizes (at the run's own sequence length) and caches the figures
in ``RUN_DIR/eval.json``, keyed by the checkpoint's sha256: the slow part (20 min for a T=512
model on one core), run in the background while training goes on. ``add`` strips the
checkpoint of optimizer and RNG state, writes it to ffinterp/pretrained/, and records it in
the index with the cached (or freshly measured) figures. ``--seed-run`` records replicate runs
of the same recipe under ``seeds``, so the seed spread the paper stresses is in the index too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from ffinterp.checkpoints import load_checkpoint, read_checkpoint_file
from ffinterp.evaluate import evaluate
from ffinterp.pretrained import INDEX_PATH, ZOO_DIR, sha256_of

KEEP = ("model_args", "model", "iter_num", "config", "ffl")


def parse_n(text: str) -> dict[str, int] | None:
    """``"4000,20000,1000"``: the first sequences of the in, sparse and dense sets; "" = all."""
    if not text:
        return None
    counts = [int(x) for x in text.split(",")]
    if len(counts) != 3 or min(counts) < 1:
        raise SystemExit(f"--eval-n: give three positive counts (in,sparse,dense), got {text!r}")
    return dict(zip(("in", "sparse", "dense"), counts))


def run_eval(run_dir: Path, batch_size: int = 256, n: dict[str, int] | None = None) -> dict:
    """The run's standard-set figures, from ``eval.json`` when it matches the checkpoint
    (``n``: the first sequences of each set only, cached in ``eval-nIN-SPARSE-DENSE.json``)."""
    ckpt = run_dir / "ckpt.pt"
    digest = sha256_of(ckpt)
    tag = "" if n is None else "-n" + "-".join(str(n[k]) for k in ("in", "sparse", "dense"))
    cache = run_dir / f"eval{tag}.json"
    if cache.exists():
        cached = json.loads(cache.read_text())
        # figures cached before the intervals took the sequence as the unit are measured again
        fresh = all("seq_ci_high" in r for r in cached.get("eval", {}).values())
        if cached.get("ckpt_sha256") == digest and fresh:
            return cached
    raw = read_checkpoint_file(ckpt)
    seq_len = int(raw["config"]["seq_len"])
    t0 = time.perf_counter()
    result = evaluate(load_checkpoint(ckpt).model, n=n, seq_len=seq_len, batch_size=batch_size, device="cpu")
    print(f"{run_dir}:\n{result.table()}", file=sys.stderr)
    figures = {
        "ckpt_sha256": digest,
        "seed": int(raw["config"]["seed"]),
        "steps": int(raw["iter_num"]),
        "command": raw["ffl"]["train"].get("command", ""),
        "sequences_per_set": n or "full",  # the first n of each set, or the whole set
        "eval": {
            s.name: {
                "n_sequences": s.n_seqs,
                "seq_len": s.seq_len,
                "reads": s.reads,
                "errors": s.errors,
                "error_rate": s.error_rate,
                "ci_low": s.ci_low,  # per read, valid although errors cluster in sequences
                "ci_high": s.ci_high,
                "seqs_with_error": s.seqs_with_error,
                "seq_rate": s.seq_rate,
                "seq_ci_low": s.seq_ci_low,  # exact Clopper-Pearson for P(a sequence errs)
                "seq_ci_high": s.seq_ci_high,
                "max_seq_reads": s.max_seq_reads,
            }
            for s in result
        },
        "eval_seconds": round(time.perf_counter() - t0, 1),
    }
    tmp = cache.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(figures, indent=2) + "\n")
    os.replace(tmp, cache)
    return figures


def add(args: argparse.Namespace) -> None:
    raw = read_checkpoint_file(args.run_dir / "ckpt.pt")
    figures = run_eval(args.run_dir, args.batch_size, parse_n(args.eval_n))
    slim = {k: raw[k] for k in KEEP if k in raw}
    slim["ffl"] = {**slim["ffl"], "train": {k: v for k, v in slim["ffl"]["train"].items() if k != "history"}}
    dest = ZOO_DIR / f"{args.name}.pt"
    tmp = dest.with_suffix(".pt.tmp")
    torch.save(slim, tmp)
    os.replace(tmp, dest)

    loaded = load_checkpoint(dest)
    train = loaded.meta["train"]
    seq_len = int(raw["config"]["seq_len"])
    entry = {
        "name": args.name,
        "file": dest.name,
        "sha256": sha256_of(dest),
        "description": args.description,
        "architecture": _describe(loaded.arch, loaded.meta["arch_config"]),
        "arch": loaded.arch,
        "config": loaded.meta["arch_config"],
        "seq_len": seq_len,
        "distribution": train["distribution"],
        "regularizers": train["regularizers"],
        "steps": int(raw["iter_num"]),
        "wall_time_s": round(float(train["wall_time_s"]), 1),
        "train_config": raw["config"],
        "commands": args.command or [train["command"]],
        "eval_command": (
            f"ffinterp eval pretrained:{args.name} --seq-len {seq_len} --json"
            if not args.eval_n
            else f'python -c "from ffinterp.evaluate import evaluate; print(evaluate('
            f"'pretrained:{args.name}', n={parse_n(args.eval_n)}, seq_len={seq_len}).table())\""
        ),
        "eval": figures["eval"],
        "eval_seconds": figures["eval_seconds"],
    }
    if args.init_from:
        entry["init_from"] = args.init_from
    if args.seed_run:
        # Every replicate, the shipped run included, on the same sets (the first --seed-n
        # sequences of each, or all of them), so the spread compares like with like.
        n = parse_n(args.seed_n)
        shipped = run_eval(args.run_dir, args.batch_size, n)
        replicates = [shipped] + [run_eval(d, args.batch_size, n) for d in args.seed_run]
        entry["seeds"] = [
            {k: r.get(k, "full") for k in ("seed", "steps", "command", "sequences_per_set", "eval")}
            | {"shipped": r is shipped}
            for r in sorted(replicates, key=lambda r: r["seed"])
        ]
        if args.seed_note:
            entry["seeds_note"] = args.seed_note
    index = json.loads(INDEX_PATH.read_text())
    index["models"] = [m for m in index["models"] if m["name"] != args.name] + [entry]
    tmp = INDEX_PATH.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, INDEX_PATH)
    print(f"added {args.name}: {dest} ({dest.stat().st_size / 1e6:.1f} MB)")


def reeval(args: argparse.Namespace) -> None:
    """Score shipped models again on the full standard sets (the sequence-level figures came
    later than some entries) and replace their index figures; the weights stay as they are."""
    for name in args.names:
        index = json.loads(INDEX_PATH.read_text())
        entry = next((m for m in index["models"] if m["name"] == name), None)
        if entry is None:
            raise SystemExit(f"reeval: no shipped model named {name!r}")
        run_dir = args.work / name
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt = run_dir / "ckpt.pt"
        if not ckpt.exists():
            ckpt.symlink_to((ZOO_DIR / entry["file"]).resolve())
        figures = run_eval(run_dir, args.batch_size, None)
        index = json.loads(INDEX_PATH.read_text())  # re-read: another reeval may have written it
        for m in index["models"]:
            if m["name"] == name:
                m["eval"], m["eval_seconds"] = figures["eval"], figures["eval_seconds"]
                m["eval_command"] = f"ffinterp eval pretrained:{name} --seq-len {entry['seq_len']} --json"
        tmp = INDEX_PATH.with_suffix(f".json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp, INDEX_PATH)
        print(f"re-measured {name} on the full standard sets")


def _describe(arch: str, cfg: dict) -> str:
    if arch == "lstm":
        return f"LSTM, {cfg['n_layer']} layer, {cfg['hidden']} hidden"
    return (
        f"GPT, {cfg['n_layer']} layers, d_model {cfg['n_embd']}, {cfg['n_head']} heads, "
        f"{cfg['pos_embedding']} positions"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=256)
    sub = ap.add_subparsers(dest="what", required=True)
    ev = sub.add_parser("eval", help="Measure (and cache) runs' standard-set figures.")
    ev.add_argument("run_dirs", type=Path, nargs="+")
    ev.add_argument("--eval-n", default="", help="in,sparse,dense sequences ('': each set's full size).")
    ad = sub.add_parser("add", help="Ship a run in the zoo.")
    ad.add_argument("name")
    ad.add_argument("run_dir", type=Path)
    ad.add_argument("--eval-n", default="", help="in,sparse,dense sequences ('': each set's full size).")
    ad.add_argument("--description", required=True)
    ad.add_argument("--command", action="append", default=[], help="Training command(s), in order.")
    ad.add_argument(
        "--seed-run", type=Path, action="append", default=[], help="A replicate with another seed."
    )
    ad.add_argument("--init-from", default="", help="The zoo model this one was fine-tuned from.")
    ad.add_argument(
        "--seed-n", default="", help="in,sparse,dense sequences for the seed replicates ('': all)."
    )
    ad.add_argument(
        "--seed-note", default="", help="How the replicates differ from the shipped run, if at all."
    )
    re_ = sub.add_parser("reeval", help="Re-measure shipped models on the full sets; update the index.")
    re_.add_argument("names", nargs="+")
    re_.add_argument("--work", type=Path, required=True, help="Folder for the per-model eval caches.")
    args = ap.parse_args()
    if args.what == "reeval":
        reeval(args)
    elif args.what == "eval":
        for d in args.run_dirs:
            run_eval(d, args.batch_size, parse_n(args.eval_n))
    else:
        add(args)


if __name__ == "__main__":
    main()
