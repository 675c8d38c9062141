"""Activation and path patching on flip-flop pairs, batched so a full sweep is a few passes.

Activation patching runs the model on the corrupted sequence and puts one activation back
from the clean run, then measures how far the scored read moves back towards the clean
answer (normalised: clean = 1, corrupted = 0). ``transformer_lens.patching`` runs one
forward pass per patch site; here every site of one kind shares a few large passes: the
corrupted sequence is stacked once per site in the batch dimension, and one hook per
layer patches copy ``i`` at site ``i``. Results equal TransformerLens's to float precision
(the tests check 1e-5).

Two exact shortcuts make large sweeps cheap without changing any number:

* the model is causal, so nothing after the scored read matters: sequences are cut at the
  read, and sites after it keep the corrupted value;
* a site whose clean and corrupted activations are identical (every position before the
  first differing token, for instance) cannot change the run, and a site on the last layer
  at a position other than the read cannot reach the read's logits (for ``attn_out``,
  ``mlp_out``, ``z``, ``q`` and the pattern row): those keep the corrupted value too.

Path patching (Wang et al. 2022, "Interpretability in the Wild", the IOI paper) isolates
the effect that flows from a sender head to chosen receivers. In the denoising direction
used here: (1) run the corrupted sequence with the sender's output (``hook_z``) set to its
clean value and every other head's output frozen to its corrupted value (MLPs recompute,
as in the paper, unless ``freeze_mlps``); record the receivers' queries, keys or values
there; (2) run the corrupted sequence again with only those receiver inputs replaced by the
recorded ones and measure. The receiver's q/k/v are therefore recomputed by the model
itself from the residual stream of the frozen run, which needs only ``hook_q/k/v`` (shared
by TransformerLens 3.x and 4.x) and no split ``hook_q_input``. With ``receivers="logits"``
step (1)'s logits are the answer (the sender's direct effect plus MLP paths). Senders are
batched like activation patching.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ffinterp.analysis.hookcheck import HookCheck
from ffinterp.analysis.pairs import Pair
from ffinterp.analysis.results import PatchResult, head_label, position_labels
from ffinterp.errors import FFInterpError
from ffinterp.scoring import rows_per_pass

METRICS = ("logit_diff", "prob", "ce")
DEFAULT_MEMORY_MB = 512.0
CPU_MEMORY_MB = 80.0

HOOKS = {
    "resid_pre": ("blocks.{l}.hook_resid_pre", "pos"),
    "attn_out": ("blocks.{l}.hook_attn_out", "pos"),
    "mlp_out": ("blocks.{l}.hook_mlp_out", "pos"),
    "z": ("blocks.{l}.attn.hook_z", "head"),
    "q": ("blocks.{l}.attn.hook_q", "head"),
    "k": ("blocks.{l}.attn.hook_k", "head"),
    "v": ("blocks.{l}.attn.hook_v", "head"),
    "pattern": ("blocks.{l}.attn.hook_pattern", "pattern"),
}
ALIASES = {"heads": "z", "head_out": "z", "resid": "resid_pre", "attn": "attn_out", "mlp": "mlp_out"}
# Kinds whose change at a position reaches other positions only through later layers.
_LOCAL = ("attn_out", "mlp_out", "z", "q", "pattern")


def kind_of(what: str) -> str:
    """Canonical activation kind (``heads`` -> ``z``, ``resid`` -> ``resid_pre`` ...)."""
    kind = ALIASES.get(what, what)
    if kind not in HOOKS:
        known = ", ".join([*HOOKS, *ALIASES])
        raise FFInterpError(f"unknown activation {what!r} to patch (known: {known})")
    return kind


# ---------------------------------------------------------------- models


def hooked_of(model):
    """The TransformerLens view of an :class:`~ffinterp.hooked.FFLModel` (or the model itself)."""
    hk = getattr(model, "hooked", model)
    if hk is None:
        raise FFInterpError(f"{getattr(model, 'name', 'model')}: an LSTM has no attention to patch")
    return hk


def device_of(hk) -> torch.device:
    return next(hk.parameters()).device


def _check_kind(hk, kind: str) -> None:
    if kind == "mlp_out" and getattr(hk.cfg, "attn_only", False):
        raise FFInterpError("this model is attention-only: it has no MLP to patch")


def auto_batch_size(hk, seq_len: int, memory_mb: float = DEFAULT_MEMORY_MB) -> int:
    """Copies per forward pass that keep one layer's activations within ``memory_mb``. On a
    CPU the budget is capped at ``CPU_MEMORY_MB``: rows that fit in cache run faster than big
    batches (tiny at T=512: 14 ms a site in batches of 4, 20 ms in batches of 27)."""
    if device_of(hk).type == "cpu":
        memory_mb = min(memory_mb, CPU_MEMORY_MB)
    return min(1024, rows_per_pass(hk, seq_len, memory_mb))


# ---------------------------------------------------------------- metric


@dataclass(frozen=True)
class Metric:
    """The score of the chosen read, normalised so the clean run is 1 and the corrupted 0.

    ``logit_diff`` is logit(clean answer) - logit(other bit); ``prob`` is p(clean answer);
    ``ce`` is the cross-entropy of the clean answer. ``clean`` and ``corrupted`` are the raw
    values on the two runs.
    """

    name: str
    read_pos: int
    correct: int
    other: int
    clean: float
    corrupted: float

    def raw(self, logits: Float[Tensor, "batch *seq vocab"]) -> Float[Tensor, " batch"]:
        """The unnormalised metric; ``logits`` is at the read or over the whole sequence."""
        at = logits[:, self.read_pos] if logits.ndim == 3 else logits
        at = at.float()
        if self.name == "logit_diff":
            return at[:, self.correct] - at[:, self.other]
        logp = at.log_softmax(-1)[:, self.correct]
        return logp.exp() if self.name == "prob" else -logp

    def __call__(self, logits: Float[Tensor, "batch *seq vocab"]) -> Float[Tensor, " batch"]:
        return (self.raw(logits) - self.corrupted) / (self.clean - self.corrupted)

    @property
    def baselines(self) -> dict[str, float]:
        return {f"clean {self.name}": self.clean, f"corrupted {self.name}": self.corrupted}


def patch_metric(model, pair: Pair, metric: str = "logit_diff") -> Metric:
    """Measure the pair's two runs and return the normalised metric for its read."""
    if metric not in METRICS:
        raise FFInterpError(f"unknown metric {metric!r} (known: {', '.join(METRICS)})")
    hk = hooked_of(model)
    _check_length(hk, pair)
    p = pair.read_pos
    tokens = pair.tokens()[:, : p + 1].to(device_of(hk))
    with torch.inference_mode():
        logits = hk(tokens)
    m = Metric(metric, p, pair.clean_bit, pair.other_bit, 0.0, 0.0)
    clean, corrupted = m.raw(logits).tolist()
    if not abs(clean - corrupted) > 1e-6:
        raise FFInterpError(
            f"the clean and corrupted runs give the same {metric} ({clean:.6g}) at the read at position "
            f"{p}: there is no effect to patch (pick another read or corruption)"
        )
    return Metric(metric, p, pair.clean_bit, pair.other_bit, clean, corrupted)


def _check_length(hk, pair: Pair) -> None:
    if pair.seq_len > hk.cfg.n_ctx:
        raise FFInterpError(f"sequence of length {pair.seq_len} exceeds the model's context {hk.cfg.n_ctx}")


# ---------------------------------------------------------------- shared run machinery


@dataclass
class _Setup:
    """The truncated pair on the model's device, its metric and cached activations."""

    hk: object
    pair: Pair
    metric: Metric
    tokens: Int[Tensor, "2 pos"]  # [clean, corrupted], cut at the read
    cache: dict[str, Tensor]
    check: HookCheck  # every hook fired, every patched hook reached the output
    n_layers: int
    n_heads: int

    @property
    def corrupted(self) -> Int[Tensor, "1 pos"]:
        return self.tokens[1:]

    @property
    def t(self) -> int:
        return self.tokens.shape[1]


def _setup(model, pair: Pair, metric: str | Metric, names: Sequence[str], routine: str) -> _Setup:
    hk = hooked_of(model)
    m = metric if isinstance(metric, Metric) else patch_metric(model, pair, metric)
    tokens = pair.tokens()[:, : m.read_pos + 1].to(device_of(hk))
    check = HookCheck(hk, routine, tokens[1:])
    cache: dict[str, Tensor] = {}
    if names:
        with torch.inference_mode():
            logits, cache = check.cache(tokens, names)
        check.base = logits[1:]
    return _Setup(hk, pair, m, tokens, cache, check, hk.cfg.n_layers, hk.cfg.n_heads)


def _chunks(idx: Tensor, size: int):
    return idx.split(size) if idx.numel() else ()


def _run(s: _Setup, tokens: Tensor, hooks: list, patched: dict[str, Tensor | None]) -> Tensor:
    """The normalised metric of one checked pass (``patched``: see :meth:`HookCheck.run`)."""
    with torch.inference_mode():
        logits = s.check.run(tokens, hooks, patched)
    return s.metric(logits[:, s.metric.read_pos]).float().cpu()


# ---------------------------------------------------------------- activation patching


def _sites(kind: str, by_pos: bool, n_layers: int, n_heads: int, seq: int):
    """Sites as rows (layer, pos, head) in result order (pos/head = -1: all / none) + axes."""
    layout = HOOKS[kind][1]
    L, H = range(n_layers), range(n_heads)
    if layout == "pos":
        axes = ("layer", "pos") if by_pos else ("layer",)
        rows = [(lay, p, -1) for lay in L for p in range(seq)] if by_pos else [(lay, -1, -1) for lay in L]
    elif layout == "head":
        axes = ("layer", "pos", "head") if by_pos else ("layer", "head")
        rows = (
            [(lay, p, h) for lay in L for p in range(seq) for h in H]
            if by_pos
            else [(lay, -1, h) for lay in L for h in H]
        )
    else:  # pattern: TransformerLens orders (layer, head, dest_pos)
        axes = ("layer", "head", "pos") if by_pos else ("layer", "head")
        rows = (
            [(lay, p, h) for lay in L for h in H for p in range(seq)]
            if by_pos
            else [(lay, -1, h) for lay in L for h in H]
        )
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 3), axes


def _differs(kind: str, clean: Tensor, corrupted: Tensor, sites: Tensor) -> Tensor:
    """True where a site's clean and corrupted activations differ (else patching is a no-op)."""
    layout = HOOKS[kind][1]
    d = (clean != corrupted).any(-1).cpu()  # pos: [pos]; head: [pos, head]; pattern: [head, dest]
    if layout == "pos":
        return torch.where(sites[:, 1] < 0, d.any(), d[sites[:, 1].clamp(min=0)])
    if layout == "head":
        return torch.where(sites[:, 1] < 0, d.any(0)[sites[:, 2]], d[sites[:, 1].clamp(min=0), sites[:, 2]])
    return torch.where(sites[:, 1] < 0, d.any(1)[sites[:, 2]], d[sites[:, 2], sites[:, 1].clamp(min=0)])


def _patch_hook(layout: str, rows: Tensor, pos: Tensor, head: Tensor, clean: Tensor) -> Callable:
    """One hook that patches copy ``rows[i]`` at (``pos[i]``, ``head[i]``) from ``clean``."""
    allp = pos < 0
    r1, p1, h1 = rows[~allp], pos[~allp], head[~allp]
    r2, h2 = rows[allp], head[allp]
    any1, any2 = bool(r1.numel()), bool(r2.numel())

    def hook(act: Tensor, hook=None) -> Tensor:
        act = act.clone()
        if layout == "pos":
            if any1:
                act[r1, p1] = clean[p1]
            if any2:
                act[r2] = clean
        elif layout == "head":
            if any1:
                act[r1, p1, h1] = clean[p1, h1]
            if any2:
                act[r2, :, h2] = clean[:, h2].transpose(0, 1)
        else:
            if any1:
                act[r1, h1, p1] = clean[h1, p1]
            if any2:
                act[r2, h2] = clean[h2]
        return act

    return hook


def _axis_labels(axes: Sequence[str], n_layers: int, n_heads: int, tokens: Tensor) -> tuple:
    out = []
    for ax in axes:
        if ax == "layer":
            out.append(tuple(f"L{k}" for k in range(n_layers)))
        elif ax == "head":
            out.append(tuple(f"H{k}" for k in range(n_heads)))
        else:
            out.append(position_labels(tokens))
    return tuple(out)


def activation_patch(
    model,
    pair: Pair,
    what: str = "z",
    *,
    by_pos: bool = True,
    metric: str | Metric = "logit_diff",
    batch_size: int | None = None,
    skip_exact: bool = True,
) -> PatchResult:
    """Patch every site of one activation kind from the clean run into the corrupted run.

    ``what``: ``resid_pre``, ``attn_out``, ``mlp_out``, ``z`` (a head's output; alias
    ``heads``), ``q``, ``k``, ``v`` or ``pattern``. With ``by_pos`` the axes match
    ``transformer_lens.patching``'s ``get_act_patch_*_by_pos`` (``[layer, pos]``,
    ``[layer, pos, head]``, patterns ``[layer, head, dest_pos]``); without it, each head (or
    layer) is patched at all positions at once. ``skip_exact=False`` runs every site
    even where the result is known exactly (for benchmarks of pure batching).
    """
    kind = kind_of(what)
    hk = hooked_of(model)
    _check_kind(hk, kind)
    name, layout = HOOKS[kind]
    names = [name.format(l=layer) for layer in range(hk.cfg.n_layers)]
    s = _setup(model, pair, metric, names, "activation_patch")
    seq = pair.seq_len
    sites, axes = _sites(kind, by_pos, s.n_layers, s.n_heads, seq)
    values = torch.zeros(len(sites))  # the corrupted run: 0 after normalisation
    live = sites[:, 1] < s.t  # sites after the read cannot change its logits
    n_after = int((~live).sum())
    n_same = n_unreached = 0
    if skip_exact:
        for layer in range(s.n_layers):
            at = live & (sites[:, 0] == layer)
            if not at.any():
                continue
            act = s.cache[names[layer]]
            same = ~_differs(kind, act[0], act[1], sites[at])
            n_same += int(same.sum())
            idx = at.nonzero().flatten()
            live[idx[same]] = False
        if by_pos and kind in _LOCAL:
            unreached = live & (sites[:, 0] == s.n_layers - 1) & (sites[:, 1] != s.metric.read_pos)
            n_unreached = int(unreached.sum())
            live &= ~unreached
    todo = live.nonzero().flatten()
    size = batch_size or auto_batch_size(hk, s.t)
    for chunk in _chunks(todo, size):
        cs = sites[chunk]
        rows = torch.arange(len(chunk), device=s.tokens.device)
        dev = cs.to(s.tokens.device)
        hooks, patched = [], {}
        for layer in cs[:, 0].unique().tolist():
            sel = (cs[:, 0] == layer).to(s.tokens.device)
            clean = s.cache[names[layer]][0]
            hooks.append((names[layer], _patch_hook(layout, rows[sel], dev[sel, 1], dev[sel, 2], clean)))
            patched[names[layer]] = rows[sel]
        values[chunk] = _run(s, s.corrupted.repeat(len(chunk), 1), hooks, patched)
    s.check.verify()
    shape = tuple(
        {"layer": s.n_layers, "head": s.n_heads, "pos": seq}[ax] for ax in axes
    )  # sites were enumerated in this order
    notes = [
        f"{len(todo)} of {len(sites)} sites run in {len(_chunks(todo, size))} batched passes",
        f"{n_after + n_same + n_unreached} sites exact without a run (after the read: {n_after}, "
        f"clean = corrupted: {n_same}, cannot reach the read: {n_unreached})",
    ]
    return PatchResult(
        values=values.view(shape),
        axes=axes,
        labels=_axis_labels(axes, s.n_layers, s.n_heads, pair.clean),
        title=f"activation patching of {kind}" + (" by position" if by_pos else ""),
        metric=f"normalised {s.metric.name}",
        null=0.0,
        baselines=s.metric.baselines,
        notes=tuple(notes),
        meta={"kind": kind, "pair": pair.describe(), "sites_run": len(todo)},
    )


def patch_all(
    model, pair: Pair, kinds: Sequence[str] = ("resid_pre", "attn_out", "mlp_out", "z"), **kwargs
) -> dict[str, PatchResult]:
    """Several kinds at once, sharing the metric's two runs."""
    m = patch_metric(model, pair, kwargs.pop("metric", "logit_diff"))
    return {k: activation_patch(model, pair, k, metric=m, **kwargs) for k in kinds}


# ---------------------------------------------------------------- path patching


def _heads_arg(heads, n_layers: int, n_heads: int, what: str) -> list[tuple[int, int]]:
    if isinstance(heads, tuple) and len(heads) == 2 and all(isinstance(x, int) for x in heads):
        heads = [heads]
    out = []
    for item in heads:
        if isinstance(item, str):
            try:
                layer, head = (int(x) for x in item.upper().lstrip("L").replace("H", ".").split("."))
            except ValueError:
                raise FFInterpError(f"{what}: {item!r} is not a head (write L1H0 or 1.0)") from None
        else:
            layer, head = (int(x) for x in item)
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise FFInterpError(f"{what}: head {head_label(layer, head)} does not exist")
        out.append((layer, head))
    return out


def _freeze_hook(rows: Tensor, heads: Tensor, cor: Tensor, clean: Tensor) -> Callable:
    """Every head's output set to the corrupted run's, except copy ``rows[i]``'s sender."""

    def hook(act: Tensor, hook=None) -> Tensor:
        act = cor.expand_as(act).clone()
        if rows.numel():
            act[rows, :, heads] = clean[:, heads].transpose(0, 1)
        return act

    return hook


def _record_hook(store: dict[str, Tensor], key: str) -> Callable:
    def hook(act: Tensor, hook=None) -> Tensor:
        store[key] = act.clone()
        return act

    return hook


def _put_heads_hook(recorded: Tensor, heads: Tensor) -> Callable:
    """Replace the given heads' q/k/v by the values recorded in the frozen run."""

    def hook(act: Tensor, hook=None) -> Tensor:
        act = act.clone()
        act[:, :, heads] = recorded[:, :, heads]
        return act

    return hook


def _path_chunk(s: _Setup, cs: Tensor, z_names, mlp_names, recv, via: str, to_logits: bool) -> Tensor:
    """Both steps of path patching for one batch of senders ``cs`` (rows of layer, head)."""
    dev = s.tokens.device
    rows = torch.arange(len(cs), device=dev)
    layer_of, head_of = cs[:, 0].to(dev), cs[:, 1].to(dev)
    tokens = s.corrupted.repeat(len(cs), 1)
    hooks, senders = [], {}
    for layer, name in enumerate(z_names):
        sel = layer_of == layer
        cor, clean = s.cache[name][1], s.cache[name][0]
        hooks.append((name, _freeze_hook(rows[sel], head_of[sel], cor, clean)))
        if bool(sel.any()):
            senders[name] = rows[sel]
    for name in mlp_names:
        cor = s.cache[name][1]
        hooks.append((name, lambda act, hook=None, c=cor: c.expand_as(act).clone()))
    if to_logits:
        return _run(s, tokens, hooks, senders)
    recv_layers = sorted({layer for layer, _ in recv})
    names = [f"blocks.{layer}.attn.hook_{c}" for layer in recv_layers for c in via]
    recorded: dict[str, Tensor] = {}
    with torch.inference_mode():
        s.check.run(tokens, hooks + [(n, _record_hook(recorded, n)) for n in names], senders)
    patches = []
    for layer in recv_layers:
        heads = torch.tensor([h for lay, h in recv if lay == layer], device=dev)
        for c in via:
            n = f"blocks.{layer}.attn.hook_{c}"
            patches.append((n, _put_heads_hook(recorded[n], heads)))
    return _run(s, tokens, patches, dict.fromkeys(names))


def path_patch(
    model,
    pair: Pair,
    receivers: str | Sequence = "logits",
    *,
    via: str = "k",
    senders: Sequence | None = None,
    metric: str | Metric = "logit_diff",
    freeze_mlps: bool = False,
    batch_size: int | None = None,
) -> PatchResult:
    """Path patching from each sender head to ``receivers`` (heads, through ``via``, or logits).

    ``receivers``: ``"logits"`` or heads as ``(layer, head)`` / ``"L1H0"``; ``via``: any of
    ``q``, ``k``, ``v`` (``"kv"`` patches both). Senders default to every head before the
    earliest receiver layer (every head for logits). Returns ``[layer, head]`` over all
    heads, NaN where a head is not a sender. See the module docstring for the method.
    """
    hk = hooked_of(model)
    L, H = hk.cfg.n_layers, hk.cfg.n_heads
    to_logits = isinstance(receivers, str) and receivers == "logits"
    recv = [] if to_logits else _heads_arg(receivers, L, H, "receivers")
    if not to_logits and not recv:
        raise FFInterpError("path patching needs at least one receiver head (or 'logits')")
    via = "".join(dict.fromkeys(via))
    if not to_logits and (not via or set(via) - set("qkv")):
        raise FFInterpError(f"via must be made of q, k and v, got {via!r}", flags={"via": "--via"})
    first = L if to_logits else min(layer for layer, _ in recv)
    if senders is None:
        send = [(layer, h) for layer in range(first) for h in range(H)]
    else:
        send = _heads_arg(senders, L, H, "senders")
        late = [head_label(*x) for x in send if x[0] >= first]
        if late:
            raise FFInterpError(f"senders {late} are not before the receivers' layer {first}: no path")
    if not send:
        raise FFInterpError("no sender heads before the receivers")
    z_names = [f"blocks.{layer}.attn.hook_z" for layer in range(L)]
    mlp_names = [f"blocks.{layer}.hook_mlp_out" for layer in range(L)] if freeze_mlps else []
    if freeze_mlps and getattr(hk.cfg, "attn_only", False):
        mlp_names = []
    s = _setup(model, pair, metric, z_names + mlp_names, "path_patch")
    size = batch_size or auto_batch_size(hk, s.t)
    send_t = torch.tensor(send, dtype=torch.long)
    values = torch.full((L, H), float("nan"))

    for chunk in torch.arange(len(send)).split(size):
        cs = send_t[chunk]
        values[cs[:, 0], cs[:, 1]] = _path_chunk(s, cs, z_names, mlp_names, recv, via, to_logits)
    # the freezing hooks must take effect too, where they can reach a receiver
    reach = L if to_logits else max(layer for layer, _ in recv)
    s.check.verify(also=z_names[:reach] + mlp_names[:reach])
    target = "logits" if to_logits else ", ".join(head_label(*x) for x in recv) + f" via {via}"
    return PatchResult(
        values=values,
        axes=("layer", "head"),
        labels=_axis_labels(("layer", "head"), L, H, pair.clean),
        title=f"path patching: sender -> {target}",
        metric=f"normalised {s.metric.name}",
        null=0.0,
        baselines=s.metric.baselines,
        notes=(
            "other heads frozen to the corrupted run; MLPs " + ("frozen" if freeze_mlps else "recomputed"),
            f"{len(send)} senders in {len(torch.arange(len(send)).split(size))} batched passes per step",
        ),
        meta={"kind": "path", "receivers": target, "pair": pair.describe()},
    )


def sweep_shape(kind: str, by_pos: bool, n_layers: int, n_heads: int, seq: int) -> tuple[int, ...]:
    """The result shape of :func:`activation_patch` (for callers that preallocate)."""
    _, axes = _sites(kind_of(kind), by_pos, n_layers, n_heads, 1)
    return tuple({"layer": n_layers, "head": n_heads, "pos": seq}[a] for a in axes)


__all__ = [
    "ALIASES",
    "HOOKS",
    "METRICS",
    "Metric",
    "activation_patch",
    "auto_batch_size",
    "kind_of",
    "patch_all",
    "patch_metric",
    "path_patch",
    "sweep_shape",
]
