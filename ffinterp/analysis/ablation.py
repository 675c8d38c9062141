"""Ablations: knock out a head, an MLP or one attention edge and watch the read's score.

Patching asks what restores a corrupted answer; ablation asks what the clean answer needs.
Three kinds of replacement value, the usual ones in the literature:

* ``zero``: the activation becomes 0 (simple, but takes the model off its distribution);
* ``mean``: its mean over a reference set of sequences, position by position;
* ``resample``: its value on a reference sequence, averaged over ``n_resample`` draws.

An *edge* is one (read position <- key position) entry of one head's attention. Ablating
it changes only that head's output at the read, computed from the head's own pattern ``a``
and values ``v`` in the same run: ``zero`` removes the key's contribution ``a[p,k] v[k]``
(the row is not renormalised); ``renorm`` masks the key and recomputes the read's softmax
row from the head's q and k (the head attends as if the key were not there, exactly, even
when it is saturated); ``mean`` and ``resample`` keep the
attention weight but replace the value the key sends, ``v[k]``, by its reference mean or a
reference sequence's ``v[k]``. Every edge (key) is one copy in a batched pass.

Results are the raw metric of the read after ablation (``logit_diff``: correct bit minus
the other bit; ``margin``; ``prob``), with the unablated value as the no-effect ``null``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from ffinterp.analysis.hookcheck import HookCheck
from ffinterp.analysis.pairs import _as_seq, check_read, read_positions
from ffinterp.analysis.patching import _axis_labels, _heads_arg, auto_batch_size, device_of, hooked_of
from ffinterp.analysis.results import PatchResult, head_label, position_labels
from ffinterp.errors import DeadHookError, FFInterpError
from ffinterp.language import ONE, ZERO, last_write_pos, sample

MODES = ("zero", "mean", "resample")
EDGE_MODES = ("zero", "renorm", "mean", "resample")
ABLATION_METRICS = ("logit_diff", "margin", "prob")


def reference_set(seq_len: int, n: int = 64, p_i: float = 0.8, seed: int = 1234) -> Int[Tensor, "n seq"]:
    """A seeded FFL(p_i) batch to take means and resamples from."""
    return sample(n, seq_len, p_i, seed=seed)


class _Target:
    """One sequence, its scored read and the metric, cut at the read."""

    def __init__(self, model, seq, read: int | None, metric: str, routine: str) -> None:
        if metric not in ABLATION_METRICS:
            raise FFInterpError(f"unknown metric {metric!r} (known: {', '.join(ABLATION_METRICS)})")
        self.hk = hooked_of(model)
        self.seq = _as_seq(seq, "sequence: ")
        if self.seq.numel() > self.hk.cfg.n_ctx:
            raise FFInterpError(
                f"sequence of length {self.seq.numel()} exceeds the context {self.hk.cfg.n_ctx}"
            )
        rps = read_positions(self.seq)
        k = -1 if read is None else read
        check_read(k, rps)
        self.p = rps[k]
        self.write_pos = int(last_write_pos(self.seq[None])[0, self.p])
        self.bit = int(self.seq[self.write_pos + 1])
        self.metric = metric
        self.draws: list[int] | None = None  # reference rows used by resample ablation
        self.dev = device_of(self.hk)
        self.tokens = self.seq[None, : self.p + 1].to(self.dev)
        with torch.inference_mode():
            logits = self.hk(self.tokens)
        self.clean = float(self.score(logits)[0])
        self.check = HookCheck(self.hk, routine, self.tokens, base=logits)

    @property
    def t(self) -> int:
        return self.p + 1

    def score(self, logits: Tensor) -> Tensor:
        at = logits[:, self.p].float()
        if self.metric == "logit_diff":
            return at[:, self.bit] - at[:, ZERO + ONE - self.bit]
        if self.metric == "prob":
            return at.softmax(-1)[:, self.bit]
        others = at.clone()
        others[:, self.bit] = float("-inf")
        return at[:, self.bit] - others.amax(-1)

    def run(self, n: int, hooks: list, patched: dict[str, Tensor | None]) -> Tensor:
        """The metric of one checked pass of ``n`` copies (``patched``: see :meth:`HookCheck.run`)."""
        with torch.inference_mode():
            logits = self.check.run(self.tokens.repeat(n, 1), hooks, patched)
        return self.score(logits).float().cpu()

    def reference_cache(self, reference: Tensor | None, names: list[str]) -> dict[str, Tensor]:
        ref = reference if reference is not None else reference_set(self.seq.numel())
        ref = torch.as_tensor(ref)
        if ref.ndim != 2 or ref.shape[1] < self.t:
            raise FFInterpError(
                f"the reference set must be [n, seq] with seq >= {self.t}, got {tuple(ref.shape)}"
            )
        with torch.inference_mode():
            _, c = self.check.cache(ref[:, : self.t].to(self.dev), names)
        return c

    def result(self, values, axes, labels, title, mode, notes=()) -> PatchResult:
        return PatchResult(
            values=values,
            axes=axes,
            labels=labels,
            title=title,
            metric=self.metric,
            null=self.clean,
            baselines={f"unablated {self.metric}": self.clean},
            notes=tuple(notes),
            meta={"mode": mode, "read_pos": self.p, "write_pos": self.write_pos, "draws": self.draws},
        )


def _check_mode(mode: str, modes: Sequence[str]) -> None:
    if mode not in modes:
        raise FFInterpError(f"unknown ablation mode {mode!r} (known: {', '.join(modes)})")


def _draws(n_ref: int, n_resample: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_ref, generator=g)[: min(n_resample, n_ref)]


def _replacements(t: _Target, mode: str, names, reference, n_resample: int, seed: int):
    """Per hook name: the replacement ``[draw, ...]`` (zero and mean have one draw).

    ``n_resample`` reference rows are drawn without replacement with ``seed``.
    """
    if mode == "zero":
        return None, 1
    ref = t.reference_cache(reference, names)
    if mode == "mean":
        return {n: ref[n].mean(0, keepdim=True) for n in names}, 1
    idx = _draws(next(iter(ref.values())).shape[0], n_resample, seed)
    t.draws = idx.tolist()
    idx = idx.to(t.dev)
    return {n: ref[n][idx] for n in names}, len(idx)


def _unit_hook(rows: Tensor, units: Tensor, draw: Tensor, repl: Tensor | None, heads: bool) -> Callable:
    """Copy ``rows[i]`` gets unit ``units[i]`` (a head, or the whole MLP) replaced."""

    def hook(act: Tensor, hook=None) -> Tensor:
        act = act.clone()
        if heads:
            if repl is None:
                act[rows, :, units] = 0.0
            else:
                act[rows, :, units] = repl[draw, :, units]
        else:
            act[rows] = 0.0 if repl is None else repl[draw]
        return act

    return hook


def _sweep_units(t: _Target, units: list[tuple[int, int]], hook_fmt: str, mode: str, repl, n_draws, size):
    """Ablate each (layer, unit) in batched passes; returns the metric averaged over draws."""
    heads = "hook_z" in hook_fmt
    cells = torch.tensor([(i, d) for i in range(len(units)) for d in range(n_draws)], dtype=torch.long)
    u = torch.tensor(units, dtype=torch.long)
    out = torch.zeros(len(cells))
    for chunk in torch.arange(len(cells)).split(size):
        c = cells[chunk]
        rows = torch.arange(len(c), device=t.dev)
        lay, unit, draw = u[c[:, 0], 0].to(t.dev), u[c[:, 0], 1].to(t.dev), c[:, 1].to(t.dev)
        hooks, patched = [], {}
        for layer in lay.unique().tolist():
            sel = lay == layer
            name = hook_fmt.format(l=layer)
            r = None if repl is None else repl[name]
            hooks.append((name, _unit_hook(rows[sel], unit[sel], draw[sel], r, heads)))
            patched[name] = rows[sel]
        out[chunk] = t.run(len(c), hooks, patched)
    t.check.verify()
    return out.view(len(units), n_draws).mean(1)


def ablate_heads(
    model,
    seq: str | Int[Tensor, " seq"],
    *,
    read: int | None = None,
    mode: str = "zero",
    reference: Int[Tensor, "n seq"] | None = None,
    n_resample: int = 8,
    seed: int = 0,
    metric: str = "logit_diff",
    batch_size: int | None = None,
) -> PatchResult:
    """Ablate each head's output (``hook_z``, all positions): ``[layer, head]``."""
    _check_mode(mode, MODES)
    t = _Target(model, seq, read, metric, "ablate_heads")
    L, H = t.hk.cfg.n_layers, t.hk.cfg.n_heads
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(L)]
    repl, n = _replacements(t, mode, names, reference, n_resample, seed)
    size = batch_size or auto_batch_size(t.hk, t.t)
    units = [(layer, h) for layer in range(L) for h in range(H)]
    values = _sweep_units(t, units, "blocks.{l}.attn.hook_z", mode, repl, n, size).view(L, H)
    axes = ("layer", "head")
    return t.result(
        values, axes, _axis_labels(axes, L, H, t.seq), f"{mode} ablation of each head's output", mode
    )


def ablate_mlps(
    model,
    seq: str | Int[Tensor, " seq"],
    *,
    read: int | None = None,
    mode: str = "zero",
    reference: Int[Tensor, "n seq"] | None = None,
    n_resample: int = 8,
    seed: int = 0,
    metric: str = "logit_diff",
    batch_size: int | None = None,
) -> PatchResult:
    """Ablate each layer's MLP output (``hook_mlp_out``, all positions): ``[layer]``."""
    _check_mode(mode, MODES)
    t = _Target(model, seq, read, metric, "ablate_mlps")
    if getattr(t.hk.cfg, "attn_only", False):
        raise FFInterpError("this model is attention-only: it has no MLP to ablate")
    L = t.hk.cfg.n_layers
    names = [f"blocks.{layer}.hook_mlp_out" for layer in range(L)]
    repl, n = _replacements(t, mode, names, reference, n_resample, seed)
    size = batch_size or auto_batch_size(t.hk, t.t)
    values = _sweep_units(
        t, [(layer, 0) for layer in range(L)], "blocks.{l}.hook_mlp_out", mode, repl, n, size
    )
    return t.result(
        values, ("layer",), _axis_labels(("layer",), L, 0, t.seq), f"{mode} ablation of each MLP", mode
    )


def _edge_hooks(layer: int, head: int, p: int, rows, keys, draw, mode: str, v_repl, scale: float) -> list:
    """Hooks that capture the head's q, k, v and pattern, then rewrite its output at the read.

    ``renorm`` recomputes the read's attention row from q and k with the key masked, so it
    stays exact when the head is saturated (where 1 - a[p,k] underflows to 0).
    """
    seen: dict[str, Tensor] = {}

    def grab(key: str) -> Callable:
        def hook(act: Tensor, hook=None) -> Tensor:
            seen[key] = act
            return act

        return hook

    def rewrite(act: Tensor, hook=None) -> Tensor:
        for c in ("q", "k", "v", "pattern"):
            if c not in seen:  # raised inside the forward pass, before the run's own check
                raise DeadHookError(f"ablate_edges: hook {base}hook_{c} never fired before {base}hook_z")
        act = act.clone()
        v_all = seen["v"][rows, : p + 1, head]  # [n, key, d_head]
        n = len(rows)
        if mode == "renorm":
            q = seen["q"][rows, p, head]  # [n, d_head]
            k = seen["k"][rows, : p + 1, head]  # [n, key, d_head]
            scores = torch.einsum("nd,nkd->nk", q.float(), k.float()) / scale
            scores[torch.arange(n, device=scores.device), keys] = float("-inf")
            if p == 0:
                z = torch.zeros_like(act[rows, p, head])
            else:
                z = torch.einsum("nk,nkd->nd", scores.softmax(-1), v_all.float()).to(act.dtype)
        else:
            a = seen["pattern"][rows, head, p, keys]  # [n]
            v = seen["v"][rows, keys, head]  # [n, d_head]
            z = act[rows, p, head]
            if mode == "zero":
                z = z - a[:, None] * v
            else:
                z = z + a[:, None] * (v_repl[draw, keys, head] - v)
        act[rows, p, head] = z
        return act

    base = f"blocks.{layer}.attn."
    grabs = [(base + f"hook_{c}", grab(c)) for c in ("q", "k", "v", "pattern")]
    return grabs + [(base + "hook_z", rewrite)]


def ablate_edges(
    model,
    seq: str | Int[Tensor, " seq"],
    head: tuple[int, int] | str,
    *,
    read: int | None = None,
    keys: Sequence[int] | None = None,
    mode: str = "renorm",
    reference: Int[Tensor, "n seq"] | None = None,
    n_resample: int = 8,
    seed: int = 0,
    metric: str = "logit_diff",
    batch_size: int | None = None,
) -> PatchResult:
    """Ablate each attention edge read -> key of one head: ``[key]`` (keys up to the read)."""
    _check_mode(mode, EDGE_MODES)
    t = _Target(model, seq, read, metric, "ablate_edges")
    ((layer, h),) = _heads_arg([head], t.hk.cfg.n_layers, t.hk.cfg.n_heads, "head")
    key_list = list(range(t.t)) if keys is None else [int(k) for k in keys]
    bad = [k for k in key_list if not 0 <= k <= t.p]
    if bad:
        raise FFInterpError(f"key positions {bad[:4]} are not between 0 and the read at {t.p}")
    v_name = f"blocks.{layer}.attn.hook_v"
    v_repl, n = None, 1
    if mode in ("mean", "resample"):
        repl, n = _replacements(t, mode, [v_name], reference, n_resample, seed)
        v_repl = repl[v_name]
    size = batch_size or auto_batch_size(t.hk, t.t)
    cfg = t.hk.cfg
    scale = float(getattr(cfg, "attn_scale", None) or -1.0)
    if scale <= 0:  # the bridge keeps -1 as "default": GPT-2 divides by sqrt(d_head)
        scale = math.sqrt(cfg.d_head)
    cells = torch.tensor([(k, d) for k in key_list for d in range(n)], dtype=torch.long)
    out = torch.zeros(len(cells))
    for chunk in torch.arange(len(cells)).split(size):
        c = cells[chunk].to(t.dev)
        rows = torch.arange(len(c), device=t.dev)
        hooks = _edge_hooks(layer, h, t.p, rows, c[:, 0], c[:, 1], mode, v_repl, scale)
        out[chunk] = t.run(len(c), hooks, {f"blocks.{layer}.attn.hook_z": None})
    t.check.verify()
    values = out.view(len(key_list), n).mean(1)
    labels = position_labels(t.seq)
    return t.result(
        values,
        ("key",),
        (tuple(labels[k] for k in key_list),),
        f"{mode} ablation of {head_label(layer, h)}'s edges from the read at {t.p}",
        mode,
        notes=(f"last write at {t.write_pos} (its bit at {t.write_pos + 1})",),
    )


__all__ = [
    "ABLATION_METRICS",
    "EDGE_MODES",
    "MODES",
    "ablate_edges",
    "ablate_heads",
    "ablate_mlps",
    "reference_set",
]
