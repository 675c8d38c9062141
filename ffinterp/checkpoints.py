"""Checkpoints in nanoGPT's ``ckpt.pt`` layout, saved atomically and loaded safely.

Layout: ``model_args`` (nanoGPT's GPTConfig fields), ``model`` (state dict with nanoGPT's
names), ``iter_num``, ``config`` (the training config) and ``ffl``, ffinterp's metadata
(format version, vocabulary, full architecture, training distribution, regularizers and
eval results). A nanoGPT user's own ``ckpt.pt`` is the same layout without ``ffl``.

Loading never unpickles code: ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ffinterp.errors import FFInterpError
from ffinterp.language import VOCAB, VOCAB_SIZE
from ffinterp.models.gpt import GPT, NANOGPT_ARGS, GPTConfig
from ffinterp.models.lstm import LSTM, LSTMConfig

FORMAT_VERSION = 1
COMPILE_PREFIX = "_orig_mod."


class CheckpointError(FFInterpError):
    """A checkpoint that cannot be loaded; the message says what was expected."""


@dataclass
class Loaded:
    """A model rebuilt from a checkpoint, with everything the file said about it."""

    model: nn.Module
    arch: str  # "gpt" or "lstm"
    source: str  # "ffinterp", "nanogpt" or "hf"
    path: str
    meta: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict, repr=False)


def model_record(model: nn.Module) -> tuple[str, dict]:
    """(arch, full config dict) of a model, for the ``ffl`` entry."""
    if isinstance(model, GPT):
        return "gpt", model.cfg.to_dict()
    if isinstance(model, LSTM):
        return "lstm", model.cfg.to_dict()
    raise TypeError(f"cannot checkpoint a {type(model).__name__}")


def build_model(arch: str, config: dict) -> nn.Module:
    if arch == "gpt":
        return GPT(GPTConfig.from_dict(config))
    if arch == "lstm":
        return LSTM(LSTMConfig.from_dict(config))
    raise CheckpointError(f"unknown architecture {arch!r} (expected 'gpt' or 'lstm')")


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    iter_num: int = 0,
    config: dict | None = None,
    ffl: dict | None = None,
    extra: dict | None = None,
) -> None:
    """Write ``ckpt.pt`` atomically (temp file, fsync, rename): a crash leaves the old one."""
    arch, arch_config = model_record(model)
    state = {k.removeprefix(COMPILE_PREFIX): v for k, v in model.state_dict().items()}
    if arch == "gpt":
        model_args = model.cfg.model_args()
    else:
        model_args = {"vocab_size": VOCAB_SIZE, **arch_config}
    ckpt = {
        "model_args": model_args,
        "model": state,
        "iter_num": iter_num,
        "config": config or {},
        "ffl": {
            "format": FORMAT_VERSION,
            "vocab": list(VOCAB),
            "arch": arch,
            "arch_config": arch_config,
            "pos_embedding": arch_config.get("pos_embedding", "none"),
            **(ffl or {}),
        },
        **(extra or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_checkpoint_file(path: str | os.PathLike) -> dict:
    """``torch.load`` with ``weights_only=True``, turning every failure into one clear line."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused to load: the file holds Python objects other than tensors "
            f"and plain data ({first[:160]})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint (truncated or corrupt?): {msg[:160]}"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj


def strip_compile_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """Drop the ``_orig_mod.`` prefix that ``torch.compile`` leaves on nanoGPT state dicts."""
    return {k.removeprefix(COMPILE_PREFIX): v for k, v in state.items()}


def load_checkpoint(path: str | os.PathLike) -> Loaded:
    """Load an ffinterp or nanoGPT ``ckpt.pt`` into the fast model (eval mode, CPU)."""
    path = Path(path)
    ckpt = read_checkpoint_file(path)
    missing = [k for k in ("model_args", "model") if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path}: unknown layout: expected nanoGPT's keys 'model_args' and 'model', "
            f"missing {missing} (found {sorted(ckpt)[:8]})"
        )
    args, ffl = ckpt["model_args"], ckpt.get("ffl") or {}
    vocab = args.get("vocab_size")
    if vocab != VOCAB_SIZE:
        raise CheckpointError(
            f"{path}: vocab_size is {vocab}, expected {VOCAB_SIZE} (the flip-flop vocabulary w r i 0 1)"
        )
    if ffl and list(ffl.get("vocab", VOCAB)) != list(VOCAB):
        raise CheckpointError(f"{path}: vocabulary {ffl.get('vocab')} differs from {list(VOCAB)}")
    arch = ffl.get("arch", "gpt")
    if ffl:
        config = dict(ffl.get("arch_config", {}))
    else:
        unknown = [k for k in NANOGPT_ARGS if k not in args]
        if unknown:
            raise CheckpointError(f"{path}: model_args lacks {unknown} (nanoGPT layout expected)")
        config = {k: args[k] for k in NANOGPT_ARGS}
    model = build_model(arch, config)
    state = strip_compile_prefix(ckpt["model"])
    # nanoGPT registers no attention-mask buffer when flash attention is on, but older
    # versions saved one as "attn.bias"; it carries no weights.
    state = {k: v for k, v in state.items() if not k.endswith(".attn.bias") or k in model.state_dict()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = " ".join(lines[1:3])[:240]
        raise CheckpointError(f"{path}: weights do not fit the {arch} architecture: {detail}") from None
    model.eval()
    return Loaded(
        model=model, arch=arch, source="ffinterp" if ffl else "nanogpt", path=str(path), meta=ffl, raw=ckpt
    )
