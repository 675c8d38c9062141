"""Streaming ``last_write_mass`` extraction: peak RSS and sequences/s over 10,000 x 512.

The extractor runs ``run_with_cache`` (patterns only) on one chunk at a time and keeps
only reads x layers x heads floats, so peak memory is set by the chunk, not by the data
set. Target: peak RSS under 2 GB for the tiny preset. Usage::

    python benchmarks/attention.py [--n 10000] [--seq-len 512] [--preset tiny] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch

from ffinterp.analysis.attention import DEFAULT_MEMORY_MB, auto_batch_size, last_write_mass
from ffinterp.data import iter_batches
from ffinterp.hooked import FFLModel
from ffinterp.language import Mix
from ffinterp.models.gpt import GPT, preset


def rss_mb() -> float:
    """Current resident set size (Linux /proc), in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_s() -> float:
    """Process CPU time (user + system): a throughput that survives a shared, busy machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--p-i", type=float, default=0.8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=None, help="default: from --memory-mb")
    ap.add_argument("--memory-mb", type=float, default=DEFAULT_MEMORY_MB)
    args = ap.parse_args()

    torch.manual_seed(0)
    gpt = GPT(preset(args.preset, block_size=args.seq_len))
    model = FFLModel.from_fast(gpt, device=args.device, name=args.preset)
    bs = args.batch_size or auto_batch_size(model, args.seq_len, args.memory_mb)
    last_write_mass(model, iter_batches(bs, bs, args.seq_len, mix=Mix.ffl(args.p_i), seed=1))  # warm-up
    base = rss_mb()

    t0, c0 = time.perf_counter(), cpu_s()
    stream = iter_batches(args.n, bs, args.seq_len, mix=Mix.ffl(args.p_i), seed=0)
    mass = last_write_mass(model, stream, batch_size=bs)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    dt, cpu = time.perf_counter() - t0, cpu_s() - c0

    print(
        f"attention benchmark: last_write_mass of {args.n} x {args.seq_len} FFL({args.p_i}) sequences, "
        f"{args.preset} preset ({model.n_layers} layers x {model.n_heads} heads), {model.tl_line}"
    )
    print(
        f"  device {args.device}, chunk {bs} sequences, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"  reads: {len(mass)} ({len(mass) / dt:,.0f} reads/s); result {mass.numel() * 4 / 2**20:.1f} MiB")
    print(f"  throughput: {args.n / dt:,.1f} sequences/s ({dt:.1f} s wall)")
    print(f"  CPU time: {cpu:.1f} s = {args.n / cpu:,.1f} sequences per CPU-second (all threads)")
    print(f"  RSS after warm-up: {base:,.0f} MiB; peak RSS: {peak_rss_mb():,.0f} MiB (target < 2048 MiB)")
    if args.device.startswith("cuda"):
        print(f"  peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB")


if __name__ == "__main__":
    main()
