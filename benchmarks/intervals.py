"""Read-level vs sequence-level intervals on a shipped model, over fresh samples.

A glitchy model's read errors cluster within sequences, so intervals that treat reads as
independent are too narrow: the samples' intervals should then often miss each other and
the pooled rate. This scores several fresh samples of one distribution (seeds apart from
the standard sets) and prints, per sample, the old read-level Clopper-Pearson interval and
the interval ``ffinterp eval`` now gives (:func:`ffinterp.intervals.read_rate_interval`),
then how many samples' intervals cover the pooled rate and how many pairs overlap.

    python benchmarks/intervals.py [CKPT] [--n 1000] [--samples 12] [--p-i 0.8] [--seq-len T]

Default: ``pretrained:glitchy-512`` on FFL(0.8), 12 samples of 1,000 x 512 (about two minutes
on one core of this project's CPU).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import numpy as np
import torch

from ffinterp.checkpoints import load_checkpoint
from ffinterp.evaluate import count_errors
from ffinterp.intervals import clopper_pearson, read_rate_interval
from ffinterp.language import sample

SEED0 = 7_000  # far from the standard sets' seeds (1,000,001 ...)


def per_sequence(model: torch.nn.Module, tokens: torch.Tensor, batch: int = 64) -> np.ndarray:
    """(reads, errors) of every sequence, shape (2, n), from the same counter eval uses."""
    return np.concatenate([np.stack(count_errors(model, b)) for b in tokens.split(batch)], axis=1)


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return max(a[0], b[0]) <= min(a[1], b[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", nargs="?", default="pretrained:glitchy-512")
    ap.add_argument("--n", type=int, default=1000, help="sequences per sample")
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--p-i", type=float, default=0.8)
    ap.add_argument("--seq-len", type=int, default=None, help="default: the model's block size")
    args = ap.parse_args()

    loaded = load_checkpoint(args.ckpt)
    model = loaded.model.eval()
    t = args.seq_len or model.cfg.block_size
    print(
        f"{args.ckpt} ({loaded.summary}); FFL({args.p_i}), {args.samples} samples of {args.n} x {t} "
        f"(seeds {SEED0}..{SEED0 + args.samples - 1}); torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} CPU cores"
    )
    print(
        f"{'seed':>5} {'errors / reads':>16} {'erring seqs':>12} {'most in one':>12}  "
        f"{'read-level CP (old)':<28}  {'sequence as unit (new)':<28}"
    )
    rows, start = [], time.perf_counter()
    for k in range(args.samples):
        seed = SEED0 + k
        counts = per_sequence(model, sample(args.n, t, args.p_i, seed=seed))
        reads, errors = counts
        e, r = int(errors.sum()), int(reads.sum())
        naive, cluster = clopper_pearson(e, r), read_rate_interval(reads, errors)
        rows.append((e, r, naive, cluster))
        print(
            f"{seed:>5} {f'{e} / {r:,}':>16} {int((errors > 0).sum()):>12} {int(errors.max()):>12}  "
            f"{f'{e / r:.2e} [{naive[0]:.2e}, {naive[1]:.2e}]':<28}  "
            f"{f'{e / r:.2e} [{cluster[0]:.2e}, {cluster[1]:.2e}]':<28}"
        )
    seconds = time.perf_counter() - start
    e_all, r_all = sum(x[0] for x in rows), sum(x[1] for x in rows)
    pooled = e_all / r_all
    rates = np.array([e / r for e, r, *_ in rows])
    binomial_var = np.mean([pooled * (1 - pooled) / r for _, r, *_ in rows])
    print(
        f"pooled: {e_all} / {r_all:,} = {pooled:.3e}; the samples' rates vary "
        f"{rates.var(ddof=1) / binomial_var:.1f}x as much as independent reads would allow"
    )
    pairs = list(itertools.combinations(range(len(rows)), 2))
    for label, j in (("read-level CP (old)", 2), ("sequence as unit (new)", 3)):
        cover = sum(iv[j][0] <= pooled <= iv[j][1] for iv in rows)
        overlap = sum(overlaps(rows[a][j], rows[b][j]) for a, b in pairs)
        width = np.mean([(iv[j][1] - iv[j][0]) / (iv[0] / iv[1]) for iv in rows if iv[0]])
        print(
            f"{label:<24} covers the pooled rate in {cover} of {len(rows)} samples; "
            f"{overlap} of {len(pairs)} pairs overlap; mean width {width:.2f} x the rate"
        )
    print(f"scored {args.samples * args.n:,} sequences in {seconds:.0f} s")


if __name__ == "__main__":
    main()
