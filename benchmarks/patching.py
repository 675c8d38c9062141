"""Activation-patching sweep speed: heads x positions on one T=512 pair, ffinterp vs TransformerLens.

For the tiny and small presets, times the full ``z`` (head output) by-position sweep
(layer x position x head sites) three ways:

1. ffinterp's :func:`~ffinterp.analysis.patching.activation_patch` as shipped: batched
   passes plus the exact shortcuts (sites before the first differing token or after the
   read, and last-layer sites that cannot reach the read, keep the corrupted value);
2. the batching alone (``skip_exact=False``): every site is run, many per forward pass;
3. ``transformer_lens.patching.get_act_patch_attn_head_out_by_pos``: one forward pass per
   site.

(2) and (3) would take hours on a CPU at T=512, so by default they are timed on a subset
(whole batched passes for (2), ``--tl-sites`` sites through TransformerLens's own
``generic_activation_patch`` with an ``index_df`` for (3)) and extrapolated linearly to all
sites (each site costs one forward pass in TL, one batch row in (2)); the output says so.
``--full`` runs everything. The subset's values are checked against ffinterp's sweep.

    python benchmarks/patching.py [--presets tiny,small] [--tl-sites 24] [--full] [--ckpt PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import time

import pandas as pd
import torch
from transformer_lens import patching as tlp

from ffinterp.analysis.pairs import flip_last_write
from ffinterp.analysis.patching import (
    _patch_hook,
    _run,
    _setup,
    activation_patch,
    auto_batch_size,
    patch_metric,
)
from ffinterp.hooked import FFLModel, load_model
from ffinterp.language import sample
from ffinterp.models.gpt import GPT, preset

T = 512


def model_for(name: str, ckpt: str | None, device: str) -> FFLModel:
    if ckpt:
        return load_model(ckpt, device=device)
    torch.manual_seed(0)
    gpt = GPT(preset(name, block_size=T)).eval()
    with torch.no_grad():  # off init, so the pair has a clear logit difference
        for p in gpt.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return FFLModel.from_fast(gpt, device=device, name=f"{name} (random)")


def pick_pair(model: FFLModel, seed: int):
    for row in sample(64, T, 0.8, seed=seed):
        pair = flip_last_write(row)
        m = patch_metric(model, pair)
        if abs(m.clean - m.corrupted) > 1e-3:
            return pair, m
    raise SystemExit("no pair with a measurable logit difference")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_batching_only(model: FFLModel, pair, m, n_sites: int, passes: int) -> tuple[float, int, int]:
    """Seconds for ``passes`` batched passes of every-site patching, and rows per pass."""
    hk = model.hooked
    s = _setup(model, pair, m, ["blocks.0.attn.hook_z"])
    size = auto_batch_size(hk, s.t)
    rows = torch.arange(size, device=s.tokens.device)
    pos = torch.arange(size, device=s.tokens.device) % s.t
    head = torch.arange(size, device=s.tokens.device) % hk.cfg.n_heads
    clean = s.cache["blocks.0.attn.hook_z"][0]
    hook = _patch_hook("head", rows, pos, head, clean)
    _run(hk, s.corrupted.repeat(size, 1), [("blocks.0.attn.hook_z", hook)], m)  # warm-up
    sync(model.device)
    t0 = time.perf_counter()
    for _ in range(passes):
        _run(hk, s.corrupted.repeat(size, 1), [("blocks.0.attn.hook_z", hook)], m)
    sync(model.device)
    return time.perf_counter() - t0, size, passes


def time_tl(model: FFLModel, pair, m, n_sites: int | None) -> tuple[float, int, pd.DataFrame, torch.Tensor]:
    hk = model.hooked
    L, H = hk.cfg.n_layers, hk.cfg.n_heads
    clean = pair.clean[None].to(model.device)
    corrupted = pair.corrupted[None].to(model.device)
    with torch.no_grad():
        _, cache = hk.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_z"))

    def metric(logits):
        return m(logits).mean()

    if n_sites is None:
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
            vals = tlp.get_act_patch_attn_head_out_by_pos(hk, corrupted, cache, metric)
        sync(model.device)
        return time.perf_counter() - t0, L * T * H, None, vals
    # The sites nearest the read (where the effects are), spread over layers and heads.
    pos = [T - 1 - k for k in range(n_sites)]
    df = pd.DataFrame([(k % L, p, (k // L) % H) for k, p in enumerate(pos)], columns=["layer", "pos", "head"])
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
        vals = tlp.generic_activation_patch(
            hk,
            corrupted,
            cache,
            metric,
            patch_setter=tlp.layer_pos_head_vector_patch_setter,
            activation_name="z",
            index_df=df,
        )
    sync(model.device)
    return time.perf_counter() - t0, len(df), df, vals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--ckpt", default=None, help="benchmark this checkpoint instead of the presets")
    ap.add_argument("--tl-sites", type=int, default=24, help="sites timed through TransformerLens")
    ap.add_argument("--passes", type=int, default=2, help="batched passes timed for batching alone")
    ap.add_argument("--full", action="store_true", help="run every site in (2) and (3): hours on CPU")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    names = ["ckpt"] if args.ckpt else args.presets.split(",")
    print(
        f"heads x positions activation patching of one T={T} pair; device {args.device}, "
        f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}, load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    for name in names:
        model = model_for(name, args.ckpt, args.device)
        pair, m = pick_pair(model, args.seed)
        L, H = model.n_layers, model.n_heads
        n_sites = L * T * H
        print(f"\n== {model.name}: {L} layers x {T} positions x {H} heads = {n_sites} sites")
        print(f"   pair: {pair.describe()}")
        activation_patch(model, pair, "z", by_pos=True, metric=m)  # warm-up
        sync(args.device)
        t0 = time.perf_counter()
        ours = activation_patch(model, pair, "z", by_pos=True, metric=m)
        sync(args.device)
        t_ours = time.perf_counter() - t0
        run = ours.meta["sites_run"]
        print(
            f"   ffinterp (batched + exact shortcuts): {t_ours:8.2f} s   ({run} sites run, {ours.notes[0]})"
        )

        if args.full:
            t0 = time.perf_counter()
            activation_patch(model, pair, "z", by_pos=True, metric=m, skip_exact=False)
            t_batch, how = time.perf_counter() - t0, "measured"
        else:
            dt, size, passes = time_batching_only(model, pair, m, n_sites, args.passes)
            t_batch = dt / (passes * size) * n_sites
            how = f"extrapolated from {passes} passes of {size} rows"
        print(f"   ffinterp (batching alone, all sites): {t_batch:8.2f} s   ({how})")

        t_tl, k, df, vals = time_tl(model, pair, m, None if args.full else args.tl_sites)
        if df is None:
            err = float((vals.float().cpu() - ours.values).abs().max())
            full_tl, how = t_tl, "measured"
        else:
            idx = [torch.as_tensor(df[c].to_numpy(copy=True)) for c in ("layer", "pos", "head")]
            got = ours.values[idx[0], idx[1], idx[2]]
            err = float((vals.float().cpu() - got).abs().max())
            full_tl = t_tl / k * n_sites
            how = f"extrapolated from {k} sites, {t_tl / k * 1000:.0f} ms per site"
        print(f"   transformer_lens.patching:            {full_tl:8.2f} s   ({how})")
        print(f"   max |ffinterp - TL| on the sites TL ran: {err:.2e}")
        print(
            f"   speed-up: {full_tl / t_ours:.0f}x as shipped, {full_tl / t_batch:.1f}x from batching alone"
        )


if __name__ == "__main__":
    main()
