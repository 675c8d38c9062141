"""Sampler throughput: tokens per second for 10^6 sequences of 512 tokens (in chunks)."""

from __future__ import annotations

import os
import time

import torch

from ffinterp.language import sample


def main(n: int = 1_000_000, seq_len: int = 512, chunk: int = 100_000) -> None:
    sample(1000, seq_len)  # warm-up
    t0 = time.perf_counter()
    for offset in range(0, n, chunk):
        tokens = sample(min(chunk, n - offset), seq_len, 0.8, seed=0, offset=offset)
    dt = time.perf_counter() - t0
    assert tokens.dtype == torch.long
    print(
        f"sampler: {n} x {seq_len} tokens in {dt:.2f} s = {n * seq_len / dt:.3g} tokens/s "
        f"({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
    )


if __name__ == "__main__":
    main()
