"""Training with the paper's recipe and its mitigations, resumable bit-exactly.

Batches come from the seeded FFL stream by offset (step * batch), so resuming needs only
the step, the weights, the optimizer and the dropout RNG: all saved in ``ckpt.pt``.

Beyond FFL(p) and mixtures of them, ``train(..., sources=[...])`` draws every batch from a
list of :class:`Source` (any seeded, offset-addressable sampler with a share: a family of
:mod:`ffinterp.analysis.families`, planted glitch patterns, :class:`FFLStream`). Which rows
of which source make up a step's batch is again a pure function of (seed, step), so resume
stays bit-exact.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from ffinterp.checkpoints import load_checkpoint, save_checkpoint
from ffinterp.data import STANDARD_SETS, eval_set
from ffinterp.device import resolve_device
from ffinterp.errors import FFInterpError
from ffinterp.language import BLOCK_ROWS, Mix, read_mask, reads, sample, validate_batch
from ffinterp.models.gpt import GPT, PRESETS, preset
from ffinterp.models.lstm import LSTM, LSTMConfig
from ffinterp.scoring import score_tokens


@dataclass
class TrainConfig:
    """Everything that defines a run; stored in the checkpoint's ``config``."""

    preset: str = "tiny"  # or "init": the architecture of init_from (fine-tuning any checkpoint)
    seq_len: int = 512
    block_size: int = 0  # positions the model holds (0: seq_len); larger for a short-first curriculum
    steps: int = 10_000
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    warmup: int = 50
    grad_clip: float = 1.0
    loss: str = "reads"  # or "all": full next-token loss
    p_i: float = 0.8
    mixture: list[float] = field(default_factory=list)  # e.g. [0.1, 0.9, 0.98]
    embd_dropout: float = 0.0
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    pos_embedding: str = "learned"
    sharpen: float = 0.0  # weight of the attention-entropy penalty
    sharpen_anneal: str = "none"  # "none" or "linear" (0 -> sharpen over the run)
    eval_every: int = 500
    eval_n: int = 128
    ckpt_every: int = 500
    seed: int = 0
    device: str = "auto"
    init_from: str = ""  # fine-tune: start from this checkpoint's weights (fresh optimizer)

    def __post_init__(self) -> None:
        if self.loss not in ("reads", "all"):
            raise ValueError(f"loss must be 'reads' or 'all', got {self.loss!r}")
        if self.preset not in (*PRESETS, "lstm", "init"):
            raise ValueError(f"unknown preset {self.preset!r} (known: {', '.join(PRESETS)}, lstm, init)")
        if self.preset == "init" and not self.init_from:
            raise ValueError("preset 'init' takes the architecture of init_from, which is not given")
        if self.sharpen_anneal not in ("none", "linear"):
            raise ValueError(f"sharpen_anneal must be 'none' or 'linear', got {self.sharpen_anneal!r}")
        if self.sharpen and self.preset == "lstm":
            raise ValueError("the attention-sharpening regularizer needs a transformer, not the LSTM")
        for p in self.mixture or [self.p_i]:
            Mix.ffl(p)
        if self.block_size and self.block_size < self.seq_len:
            raise ValueError(f"block_size {self.block_size} is shorter than seq_len {self.seq_len}")

    @property
    def distribution(self) -> str:
        if self.mixture:
            return "mixture of " + ", ".join(f"FFL({p})" for p in self.mixture)
        return f"FFL({self.p_i})"


def build(cfg: TrainConfig) -> nn.Module:
    """A fresh model of ``cfg``'s architecture (weights are set later for ``init_from``).

    Preset ``init`` copies the architecture of ``cfg.init_from`` (position embedding
    included), with ``cfg``'s dropout rates and at least ``cfg``'s positions: how a model of
    any shape is fine-tuned (``ffinterp harden``).
    """
    if cfg.preset == "init":
        from ffinterp.pretrained import resolve

        source = load_checkpoint(resolve(cfg.init_from)).model
        if isinstance(source, LSTM):
            return LSTM(source.cfg)
        c = source.cfg
        return GPT(
            replace(
                c,
                block_size=max(c.block_size, cfg.block_size or cfg.seq_len),
                embd_dropout=cfg.embd_dropout,
                attn_dropout=cfg.attn_dropout,
                resid_dropout=cfg.resid_dropout,
            )
        )
    if cfg.preset == "lstm":
        return LSTM(LSTMConfig())
    return GPT(
        preset(
            cfg.preset,
            block_size=cfg.block_size or cfg.seq_len,
            embd_dropout=cfg.embd_dropout,
            attn_dropout=cfg.attn_dropout,
            resid_dropout=cfg.resid_dropout,
            pos_embedding=cfg.pos_embedding,
        )
    )


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over ``warmup`` steps, then linear decay to 0 at ``steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr * max(0.0, (cfg.steps - step) / max(1, cfg.steps - cfg.warmup))


def sharpen_weight(cfg: TrainConfig, step: int) -> float:
    if cfg.sharpen_anneal == "linear":
        return cfg.sharpen * step / max(1, cfg.steps)
    return cfg.sharpen


class Sampler(Protocol):
    """A seeded, offset-addressable stream of sequences: rows ``offset .. offset+n`` of the
    stream named by ``seed`` are the same whoever asks and in whatever slices (the samplers of
    :mod:`ffinterp.language` and :mod:`ffinterp.analysis.families` all are)."""

    def sample(self, n: int, seq_len: int, *, seed: int, offset: int = 0) -> Int[Tensor, "n seq"]: ...


@dataclass(frozen=True)
class FFLStream:
    """FFL(p_i) as a :class:`Sampler`: the stream of :func:`ffinterp.language.sample`."""

    p_i: float

    def __post_init__(self) -> None:
        Mix.ffl(self.p_i)

    def sample(self, n: int, seq_len: int, *, seed: int, offset: int = 0) -> Int[Tensor, "n seq"]:
        return sample(n, seq_len, self.p_i, seed=seed, offset=offset)

    def __str__(self) -> str:
        return f"FFL({self.p_i})"


@dataclass(frozen=True)
class Source:
    """One stream of training sequences and its share of every batch (shares need not sum
    to 1; they are normalised). ``name`` (default: ``str(sampler)``) is what the checkpoint
    records and what a resume compares."""

    sampler: Sampler
    share: float
    name: str = ""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.share) and self.share > 0):
            raise FFInterpError(f"source {self.name or self.sampler}: share must be > 0, got {self.share}")
        if not callable(getattr(self.sampler, "sample", None)):
            raise FFInterpError(f"source {self.name or self.sampler}: the sampler has no sample method")
        if not self.name:
            object.__setattr__(self, "name", str(self.sampler))


def source_counts(shares: Sequence[float], batch_size: int, seed: int, step: int) -> list[int]:
    """Rows of each source in the batch of ``step``: ``floor`` or ``ceil`` of
    ``share * batch_size`` (systematic sampling, its offset seeded by (seed, step)), so every
    batch holds each share as nearly as it can and the long-run shares are exact."""
    u = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step, 7]))).random()
    edges = np.cumsum(np.asarray(shares, dtype=np.float64))
    edges /= edges[-1]
    which = np.searchsorted(edges, (u + np.arange(batch_size)) / batch_size, side="right")
    return np.bincount(which.clip(max=len(edges) - 1), minlength=len(edges)).tolist()


class Batches:
    """The training batch of every step, a pure function of (``cfg.seed``, step).

    Without ``sources``: rows of the seeded FFL stream(s) at offset step * batch (a mixture
    splits each batch evenly over its components, each with its own stream). With
    ``sources``: source ``k`` gives :func:`source_counts` rows from its own stream (seed
    ``cfg.seed * 1000 + k``) at offset step * batch; the rest of that slice is never used.
    Samplers generate whole blocks, so the last block of each source is kept.
    """

    def __init__(self, cfg: TrainConfig, sources: Sequence[Source] | None = None):
        self.cfg = cfg
        self.sources = list(sources or [])
        self._blocks: dict[int, tuple[int, Tensor]] = {}
        for k, src in enumerate(self.sources):  # a broken sampler fails here, not mid-run
            try:
                validate_batch(self._rows(k, 0, 2))
            except FFInterpError as e:
                raise FFInterpError(f"source {src.name}: {e}") from None

    def _seed(self, k: int) -> int:
        return self.cfg.seed * 1000 + k

    def _rows(self, k: int, offset: int, n: int) -> Tensor:
        parts, end = [], offset + n
        while offset < end:
            block = offset // BLOCK_ROWS
            cached = self._blocks.get(k)
            if cached is None or cached[0] != block:
                tokens = self.sources[k].sampler.sample(
                    BLOCK_ROWS, self.cfg.seq_len, seed=self._seed(k), offset=block * BLOCK_ROWS
                )
                if not isinstance(tokens, Tensor) or tuple(tokens.shape) != (BLOCK_ROWS, self.cfg.seq_len):
                    raise FFInterpError(
                        f"source {self.sources[k].name}: sample({BLOCK_ROWS}, {self.cfg.seq_len}) gave "
                        f"shape {tuple(getattr(tokens, 'shape', ()))}"
                    )
                cached = self._blocks[k] = (block, tokens.long())
            stop = min(end, (block + 1) * BLOCK_ROWS)
            parts.append(cached[1][offset - block * BLOCK_ROWS : stop - block * BLOCK_ROWS])
            offset = stop
        return torch.cat(parts)

    def __call__(self, step: int) -> Int[Tensor, "batch seq"]:
        cfg = self.cfg
        if not self.sources:
            return _ffl_batch(cfg, step)
        counts = source_counts([s.share for s in self.sources], cfg.batch_size, cfg.seed, step)
        return torch.cat([self._rows(k, step * cfg.batch_size, n) for k, n in enumerate(counts) if n])

    def describe(self) -> list[list]:
        """[name, normalised share] of every source (what the checkpoint records)."""
        total = sum(s.share for s in self.sources)
        return [[s.name, s.share / total] for s in self.sources]


def batch_at(
    cfg: TrainConfig, step: int, sources: Sequence[Source] | None = None
) -> Int[Tensor, "batch seq"]:
    """The training batch of a step (see :class:`Batches`)."""
    return Batches(cfg, sources)(step)


def _ffl_batch(cfg: TrainConfig, step: int) -> Int[Tensor, "batch seq"]:
    mixes = cfg.mixture or [cfg.p_i]
    per = [cfg.batch_size // len(mixes) + (k < cfg.batch_size % len(mixes)) for k in range(len(mixes))]
    parts = [
        sample(n, cfg.seq_len, p, seed=cfg.seed * 1000 + k, offset=step * n)
        for k, (p, n) in enumerate(zip(mixes, per))
        if n
    ]
    return torch.cat(parts)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (nanoGPT's grouping)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def attention_entropy(patterns: list[Float[Tensor, "batch head q k"]]) -> Tensor:
    """Mean entropy (nats) of every attention row: the sharpening regularizer's target."""
    ent = [-(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean() for p in patterns]
    return torch.stack(ent).mean()


def training_loss(
    model: nn.Module, tokens: Int[Tensor, "batch seq"], cfg: TrainConfig, step: int
) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy on read targets (or all next tokens), plus the sharpening penalty."""
    w = sharpen_weight(cfg, step) if isinstance(model, GPT) else 0.0
    if w > 0:
        logits, patterns = model(tokens, need_patterns=True)
    else:
        logits, patterns = model(tokens), None
    logits = logits.float()
    if cfg.loss == "all":
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    else:
        mask = read_mask(tokens)
        ce = F.cross_entropy(logits[mask], tokens[:, 1:][mask[:, :-1]])
    stats = {"ce": float(ce.detach())}
    loss = ce
    if patterns is not None:
        ent = attention_entropy(patterns)
        loss = ce + w * ent
        stats["attn_entropy"] = float(ent.detach())
    return loss, stats


def quick_eval(model: nn.Module, n: int, seq_len: int, device: torch.device) -> dict[str, float]:
    """Error rate on the first ``n`` sequences of each standard set (a training-time glance)."""
    was = model.training
    model.eval()
    out = {}
    for name in STANDARD_SETS:
        tokens = eval_set(name, n, seq_len)
        errs = total = 0
        for chunk in tokens.split(64):
            s = score_tokens(model, chunk, device)
            errs += int(s.error.sum())
            total += len(s)
        out[name] = errs / max(1, total)
    model.train(was)
    return out


@dataclass
class TrainResult:
    path: Path
    steps: int
    wall_time: float
    final_eval: dict[str, float]
    interrupted: bool = False


def init_weights(model: nn.Module, cfg: TrainConfig) -> None:
    """Copy ``cfg.init_from``'s weights into ``model``: fine-tuning a trained model with a
    mitigation (e.g. the rare-sequence mixture) instead of training it from scratch.

    A source with fewer positions (a model trained at T=128 fine-tuned at T=512) gives its
    learned rows of ``wpe``; the new positions keep their fresh initialisation and are
    learned in the fine-tune (a short-then-long curriculum).
    """
    from ffinterp.pretrained import resolve

    state = load_checkpoint(resolve(cfg.init_from)).model.state_dict()
    wpe = "transformer.wpe.weight"
    target = model.state_dict()
    if wpe in state and wpe in target and state[wpe].shape[0] < target[wpe].shape[0]:
        grown = target[wpe].clone()
        grown[: state[wpe].shape[0]] = state[wpe]
        state[wpe] = grown
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise FFInterpError(
            f"init_from={cfg.init_from}: its weights do not fit a {cfg.preset} model "
            f"with block_size {cfg.block_size or cfg.seq_len} ({first})",
            flags={"init_from=": "--init-from "},
        ) from None


def train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    command: str = "",
    sources: Sequence[Source] | None = None,
) -> TrainResult:
    """Train (or resume) a model; ``out/ckpt.pt`` is always a valid checkpoint.

    ``sources`` replaces ``cfg.p_i`` and ``cfg.mixture`` as the batch source (see
    :class:`Batches`); a resume must be given the same sources (names and shares).
    """
    out = Path(out)
    path = out / "ckpt.pt"
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build(cfg)
    opt = make_optimizer(model, cfg)
    start, wall_before, history = 0, 0.0, []
    batches = Batches(cfg, sources)
    described = batches.describe() if batches.sources else None
    if resume and path.exists():
        loaded = load_checkpoint(path)
        saved = TrainConfig(
            **{**asdict(cfg), **loaded.raw.get("config", {}), "steps": cfg.steps, "device": cfg.device}
        )
        had = loaded.meta.get("train", {}).get("sources")
        if had != described:
            raise FFInterpError(
                f"{path}: cannot resume: it was trained on other batch sources "
                f"({_sources_text(had)}), not on {_sources_text(described)}"
            )
        cfg = saved
        batches = Batches(cfg, sources)
        model = build(cfg)
        model.load_state_dict(loaded.model.state_dict())
        opt = make_optimizer(model, cfg)
        opt.load_state_dict(loaded.raw["optimizer"])
        torch.set_rng_state(loaded.raw["rng"])
        start = int(loaded.raw["iter_num"])
        wall_before = float(loaded.meta.get("train", {}).get("wall_time_s", 0.0))
        history = list(loaded.meta.get("train", {}).get("history", []))
    elif cfg.init_from:
        init_weights(model, cfg)
    model.to(device).train()
    for state in opt.state.values():
        for k, v in state.items():
            if isinstance(v, Tensor) and k != "step":
                state[k] = v.to(device)

    t0 = time.perf_counter()
    step = start

    def save(final_eval: dict | None = None) -> None:
        meta = {
            "train": {
                "distribution": _sources_text(described) if described else cfg.distribution,
                "sources": described,
                "regularizers": {
                    "embd_dropout": cfg.embd_dropout,
                    "attn_dropout": cfg.attn_dropout,
                    "resid_dropout": cfg.resid_dropout,
                    "sharpen": cfg.sharpen,
                    "sharpen_anneal": cfg.sharpen_anneal,
                    "pos_embedding": cfg.pos_embedding,
                },
                "steps": step,
                "wall_time_s": wall_before + time.perf_counter() - t0,
                "command": command,
                "history": history,
            },
        }
        if final_eval is not None:
            meta["quick_eval"] = final_eval
        model_cpu_rng = torch.get_rng_state()
        save_checkpoint(
            path,
            model,
            iter_num=step,
            config=asdict(cfg),
            ffl=meta,
            extra={"optimizer": opt.state_dict(), "rng": model_cpu_rng},
        )

    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    bar = _progress(total=cfg.steps, initial=start, enabled=progress)
    interrupted = False
    # SIGTERM (e.g. a scheduler's kill) saves like Ctrl-C, then ends the process.
    terminated = []

    def on_term(signum, frame):  # noqa: ARG001
        terminated.append(signum)
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    try:
        while step < cfg.steps:
            tokens = batches(step).to(device)
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step)
            with autocast:
                loss, stats = training_loss(model, tokens, cfg, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            bar.update(1)
            postfix = {"loss": f"{stats['ce']:.4f}"}
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                ev = quick_eval(model, cfg.eval_n, cfg.seq_len, device)
                history.append({"step": step, "loss": stats["ce"], **ev})
                postfix.update({f"err_{k}": f"{v:.2e}" for k, v in ev.items()})
            bar.set_postfix(postfix, refresh=False)
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
                save()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        bar.close()
    final = history[-1] if history and history[-1]["step"] == step else {}
    save(final_eval={k: final[k] for k in STANDARD_SETS if k in final} or None)
    if terminated:
        raise SystemExit(128 + signal.SIGTERM)
    return TrainResult(path, step, wall_before + time.perf_counter() - t0, final, interrupted)


def _sources_text(described: list[list] | None) -> str:
    if not described:
        return "FFL(p_i) or its mixture"
    return "mixture of " + ", ".join(f"{share:.3g} {name}" for name, share in described)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True
    )


def read_accuracy(model: nn.Module, tokens: Int[Tensor, "batch seq"]) -> float:
    """Fraction of reads answered correctly (a small helper for tests and notebooks)."""
    s = score_tokens(model, tokens)
    return 1.0 - float(s.error.float().mean()) if len(s) else math.nan


__all__ = [
    "Batches",
    "FFLStream",
    "Sampler",
    "Source",
    "TrainConfig",
    "TrainResult",
    "attention_entropy",
    "batch_at",
    "lr_at",
    "reads",
    "source_counts",
    "train",
    "training_loss",
]
