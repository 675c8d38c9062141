"""Throughput of sharded scoring: sequences scored per second with 1 and 2 processes.

Runs the real command lines, so the figures include the sharding, the collectives and the
merge, but not the start-up (each command times its own scan):

- ``ffinterp eval CKPT --sets in`` (bulk scoring of a seeded stream; the counts are summed
  over ranks, and the script checks they equal the single process's);
- ``ffinterp find-glitches CKPT --strategy random`` (the search loop: score, verify, merge
  in rounds; rank 0 writes), from its ``summary.json``.

Rows: one process with torch's default threads, one process with one thread, and
``torchrun --nproc-per-node 2`` (torchrun gives each rank one thread) on the CPU; with CUDA,
one process on one GPU. On a shared machine wall time depends on the neighbours: compare
rows of one run, not runs.

    python benchmarks/scaling.py [CKPT] [--sequences 8192] [--seq-len 128] [--budget 4096]

Without CKPT it uses ``pretrained:mitigated-128`` (T=128), or, where that is not shipped, a
random ``tiny`` GPT (2 layers, d 128), whose search row then mostly measures the recording
of its many glitches.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = "pretrained:mitigated-128"


def ffinterp(args: list[str], procs: int, threads: int | None, device: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if procs == 1:
        cmd = [sys.executable, "-m", "ffinterp", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
        cmd += ["-m", "ffinterp", *args]
    r = subprocess.run([*cmd, "--device", device], capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return r


def eval_rate(
    ckpt: str, n: int, seq_len: int, procs: int, threads: int | None, device: str
) -> tuple[float, dict]:
    args = ["eval", ckpt, "--sets", "in", "--sequences", str(n), "--seq-len", str(seq_len), "--json"]
    r = ffinterp([*args, "--no-progress", "--batch-size", "256"], procs, threads, device)
    s = json.loads(r.stdout)["sets"]["in"]
    return s["n_seqs"] / s["seconds"], {k: s[k] for k in ("reads", "errors", "seqs_with_error")}


def search_rate(
    ckpt: str, budget: int, seq_len: int, procs: int, threads: int | None, device: str, out: Path
) -> tuple[float, int]:
    args = ["find-glitches", ckpt, "--strategy", "random", "--budget", str(budget), "--seq-len", str(seq_len)]
    args += ["--seed", "0", "--no-minimize", "--no-diagnose", "--quiet", "--max-glitches", "1000000"]
    ffinterp([*args, "--out", str(out)], procs, threads, device)
    summary = json.loads((out / "summary.json").read_text())
    return summary["scored"] / summary["wall_s"], summary["glitches"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", nargs="?", help="checkpoint (default: a random tiny GPT)")
    ap.add_argument("--sequences", type=int, default=8192, help="sequences of the eval scan")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--budget", type=int, default=4096, help="sequences of the random search")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ffinterp-scaling-"))
    ckpt = args.ckpt
    if ckpt is None:
        try:  # the shipped mitigated model: rare glitches, so the search row measures scoring
            from ffinterp.pretrained import resolve

            resolve(DEFAULT)
            ckpt = DEFAULT
        except Exception:  # noqa: BLE001 - not shipped in this checkout: a random model instead
            ckpt = None
    if ckpt is None:
        from ffinterp.checkpoints import save_checkpoint
        from ffinterp.models.gpt import GPT, preset

        torch.manual_seed(0)
        ckpt = str(tmp / "ckpt.pt")
        save_checkpoint(ckpt, GPT(preset("tiny", block_size=args.seq_len)))

    rows = [("cpu, 1 process", 1, None, "cpu"), ("cpu, 1 process, 1 thread", 1, 1, "cpu")]
    rows.append(("cpu, torchrun 2 processes (1 thread each)", 2, None, "cpu"))
    if torch.cuda.is_available():
        rows.append((f"cuda, 1 process ({torch.cuda.get_device_name(0)})", 1, None, "cuda"))
    print(f"model {ckpt}, T={args.seq_len}, {os.cpu_count()} CPU cores")
    print(f"{'':44s} {'eval seq/s':>12s} {'search seq/s':>13s}  glitches")
    counts = None
    for k, (label, procs, threads, device) in enumerate(rows):
        t0 = time.perf_counter()
        rate, c = eval_rate(ckpt, args.sequences, args.seq_len, procs, threads, device)
        if device == "cpu":
            if counts is not None and c != counts:
                raise SystemExit(f"eval counts differ between process counts: {counts} vs {c}")
            counts = c
        srate, found = search_rate(ckpt, args.budget, args.seq_len, procs, threads, device, tmp / f"g{k}")
        wall = time.perf_counter() - t0
        print(f"{label:44s} {rate:12,.0f} {srate:13,.0f}  {found:>8}   ({wall:.0f} s with start-up)")
    print(f"eval counts (identical for every CPU row): {counts}")


if __name__ == "__main__":
    main()
