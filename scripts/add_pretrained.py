"""Add a trained run to the shipped zoo: weights only, measured error rates, sha256.

    python scripts/add_pretrained.py NAME RUN_DIR --description "..." [--command "..."]...

The checkpoint is stripped of optimizer and RNG state, written to ffinterp/pretrained/,
evaluated with :func:`ffinterp.evaluate.evaluate` on the three standard sets at their
default sizes (at the model's own sequence length), and recorded in the index.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("name")
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--description", required=True)
    ap.add_argument("--command", action="append", default=[], help="Training command(s), in order.")
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()

    raw = read_checkpoint_file(args.run_dir / "ckpt.pt")
    slim = {k: raw[k] for k in KEEP if k in raw}
    slim["ffl"] = {**slim["ffl"], "train": {k: v for k, v in slim["ffl"]["train"].items() if k != "history"}}
    dest = ZOO_DIR / f"{args.name}.pt"
    tmp = dest.with_suffix(".pt.tmp")
    torch.save(slim, tmp)
    os.replace(tmp, dest)

    loaded = load_checkpoint(dest)
    train = loaded.meta["train"]
    seq_len = int(raw["config"]["seq_len"])
    t0 = time.perf_counter()
    result = evaluate(loaded.model, seq_len=seq_len, batch_size=args.batch_size, device="cpu")
    print(result.table(), file=sys.stderr)
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
        "eval_command": f"ffinterp eval pretrained:{args.name} --seq-len {seq_len} --json",
        "eval": {
            s.name: {
                "n_sequences": s.n_seqs,
                "seq_len": s.seq_len,
                "reads": s.reads,
                "errors": s.errors,
                "error_rate": s.error_rate,
                "ci_low": s.ci_low,
                "ci_high": s.ci_high,
            }
            for s in result
        },
        "eval_seconds": round(time.perf_counter() - t0, 1),
    }
    index = json.loads(INDEX_PATH.read_text())
    index["models"] = [m for m in index["models"] if m["name"] != args.name] + [entry]
    tmp = INDEX_PATH.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, INDEX_PATH)
    print(f"added {args.name}: {dest} ({dest.stat().st_size / 1e6:.1f} MB)")


def _describe(arch: str, cfg: dict) -> str:
    if arch == "lstm":
        return f"LSTM, {cfg['n_layer']} layer, {cfg['hidden']} hidden"
    return (
        f"GPT, {cfg['n_layer']} layers, d_model {cfg['n_embd']}, {cfg['n_head']} heads, "
        f"{cfg['pos_embedding']} positions"
    )


if __name__ == "__main__":
    main()
