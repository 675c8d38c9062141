"""Forward-pass speed of the fast model and the hooked model on the same weights.

Prints tokens/s for a batch of 64 x 512 on the ``tiny`` and ``small`` presets, on CPU and
(where present) CUDA, and the model FLOPs achieved as a fraction of an fp32 matmul peak
measured in the same run. Targets: fast >= 5x hooked; >= 40% of peak for ``small`` on CPU.

Rows: ``fast`` is the blocks' inference path (eval mode, no autograd, nothing watching the
model: what evaluation and the glitch search run); ``plain`` is the same model through its
ordinary block-by-block SDPA forward (the training path, without autograd; also what runs
while hooks or wrappers such as nnsight watch it); ``hooked`` is the TransformerLens view.

On a shared machine wall time depends on the neighbours, so every row also gives the
CPU-time figures (FLOPs per CPU-second of this process, peak measured the same way).

Model FLOPs count only the work a causal forward needs: 2 per multiply-add of every
Linear (lm_head included) plus, per layer, q.k and p.v over the T(T+1)/2 causal pairs.
Embedding lookups, LayerNorm, GELU and softmax count as zero.

    python benchmarks/forward.py [--presets tiny,small] [--devices cpu,cuda] [--no-hooked]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch

from ffinterp.language import sample
from ffinterp.models.gpt import GPT, preset


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """Median (wall seconds, CPU seconds per thread) of ``fn()`` after one warm-up call."""
    fn()
    sync(device)
    walls, cpus = [], []
    for _ in range(repeats):
        c0, t0 = cpu_seconds(), time.perf_counter()
        fn()
        sync(device)
        walls.append(time.perf_counter() - t0)
        cpus.append((cpu_seconds() - c0) / torch.get_num_threads())
    return statistics.median(walls), statistics.median(cpus)


def matmul_peak(device: torch.device, n: int, repeats: int) -> tuple[float, float]:
    """fp32 FLOP/s of a square ``n x n`` matmul (TF32 off), by wall and by CPU time."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    wall, cpu = timed(lambda: a @ b, device, repeats)
    return 2 * n**3 / wall, 2 * n**3 / cpu


def model_flops(model: GPT, batch: int, seq: int) -> float:
    """Causal forward FLOPs of one batch (see the module docstring)."""
    c = model.cfg
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = c.n_layer * 2 * c.n_embd * seq * (seq + 1)  # 2 * (2 * d * T(T+1)/2)
    return batch * (2 * linear * seq + attention)


def hooked_view(model: GPT, device: torch.device):
    try:
        from ffinterp.hooked import FFLModel
    except ImportError:
        return None
    return FFLModel.from_fast(model, device=device).hooked


def row(
    device: str,
    preset_name: str,
    ntok: int,
    flops: float,
    peak: float,
    peak_cpu: float,
    view: str,
    wall: float,
    cpu: float,
    fast_wall: float | None,
) -> None:
    ratio = f"{wall / fast_wall:15.1f}x" if fast_wall else ""
    print(
        f"{device:6} {preset_name:6} {view:6} {ntok / wall:12,.0f} {flops / wall / 1e9:9.1f} "
        f"{flops / wall / peak:7.1%} | {flops / cpu / 1e9:17.1f} {flops / cpu / peak_cpu:7.1%} |{ratio}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--devices", default="cpu,cuda", help="cuda is skipped when absent")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hooked-repeats", type=int, default=1)
    ap.add_argument("--no-hooked", action="store_true")
    ap.add_argument("--no-plain", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"batch {args.batch} x {args.seq_len}, load average {os.getloadavg()[0]:.1f}"
    )
    header = (
        "device preset view       tokens/s   GFLOP/s  % peak | CPU-time: GFLOP/s  % peak | slower than fast"
    )
    for name in args.devices.split(","):
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("\ncuda: not present, skipped")
            continue
        n = 8192 if device.type == "cuda" else 2048
        peak, peak_cpu = matmul_peak(device, n, repeats=5)
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(
            f"\n{name} ({label}): fp32 matmul peak {peak / 1e9:.1f} GFLOP/s wall, "
            f"{peak_cpu / 1e9:.1f} GFLOP/s per CPU-second x threads ({n}^3)"
        )
        print(header)
        for p in args.presets.split(","):
            torch.manual_seed(0)
            model = GPT(preset(p, block_size=args.seq_len)).to(device).eval().requires_grad_(False)
            tokens = sample(args.batch, args.seq_len, seed=0).to(device)
            flops = model_flops(model, args.batch, args.seq_len)

            ctx = (name, p, tokens.numel(), flops, peak, peak_cpu)
            with torch.inference_mode():
                fast = timed(lambda m=model, x=tokens: m(x), device, args.repeats)
            row(*ctx, "fast", *fast, None)
            if not args.no_plain:
                with torch.enable_grad():  # nothing requires grad: the block path, no graph
                    plain = timed(lambda m=model, x=tokens: m(x), device, args.repeats)
                row(*ctx, "plain", *plain, fast[0])
            hooked = None if args.no_hooked else hooked_view(model, device)
            if hooked is not None:
                with torch.inference_mode():
                    slow = timed(lambda h=hooked, x=tokens: h(x), device, args.hooked_repeats)
                row(*ctx, "hooked", *slow, fast[0])
                del hooked
            del model, tokens


if __name__ == "__main__":
    main()
