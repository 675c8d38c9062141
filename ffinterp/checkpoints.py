"""Checkpoints in nanoGPT's ``ckpt.pt`` layout, saved atomically and loaded safely.

Layout: ``model_args`` (nanoGPT's GPTConfig fields), ``model`` (state dict with nanoGPT's
names), ``iter_num``, ``config`` (the training config) and ``ffl``, ffinterp's metadata
(format version, vocabulary, full architecture, training distribution, regularizers and
eval results). A nanoGPT user's own ``ckpt.pt`` is the same layout without ``ffl``.

:func:`load_checkpoint` reads four sources into the fast model, each with its own numerics:

- ffinterp's ``ckpt.pt`` (GPT or LSTM): the ``ffl`` entry holds the full architecture;
- a plain nanoGPT ``ckpt.pt``: exact GELU, LayerNorm eps 1e-5, ``_orig_mod.`` prefixes
  from ``torch.compile`` stripped, the old ``attn.bias`` mask buffer dropped;
- a Hugging Face ``GPT2LMHeadModel`` folder (``config.json`` plus ``model.safetensors`` or
  ``pytorch_model.bin``, sharded or not): tanh GELU (``gelu_new``), the config's
  ``layer_norm_epsilon``, Conv1D weights transposed to Linear, a tied ``lm_head``;
- ``pretrained:NAME`` from the shipped zoo (sha256-checked first).

Loading never unpickles code: ``torch.load(weights_only=True)`` or safetensors only. Every
failure is one :class:`CheckpointError` line saying what was expected.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ffinterp.errors import FFInterpError
from ffinterp.language import VOCAB, VOCAB_SIZE
from ffinterp.models.gpt import GPT, NANOGPT_ARGS, GPTConfig
from ffinterp.models.lstm import LSTM, LSTMConfig

FORMAT_VERSION = 1
COMPILE_PREFIX = "_orig_mod."
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# HF activation names -> the fast model's; gelu_pytorch_tanh is the same tanh formula.
HF_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu"}
# GPT-2 Conv1D modules store weight as [in, out]; Linear wants [out, in].
HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
VOCAB_HINT = (
    f"expected {VOCAB_SIZE} (the flip-flop vocabulary {' '.join(VOCAB)}, ids as in synthseq/flipflop)"
)


class CheckpointError(FFInterpError):
    """A checkpoint that cannot be loaded; the message says what was expected."""


@dataclass
class Loaded:
    """A model rebuilt from a checkpoint, with everything the file said about it.

    ``meta`` is the ``ffl`` entry (ffinterp) or ``{"hf_config": ...}`` (Hugging Face);
    ``raw`` the whole checkpoint dict (optimizer, rng...) for resuming training.
    """

    model: nn.Module
    arch: str  # "gpt" or "lstm"
    source: str  # "ffinterp", "nanogpt" or "hf"
    path: str
    meta: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def summary(self) -> str:
        """One line naming the model, for CLI output and reports."""
        c = self.model.cfg
        if self.arch == "lstm":
            shape = f"LSTM {c.n_layer}x{c.hidden}"
        else:
            shape = f"GPT {c.n_layer} layers, d {c.n_embd}, {c.n_head} heads, {c.pos_embedding} positions"
        return f"{shape} ({self.source})"


def model_digest(model: nn.Module) -> str:
    """sha256 of a model's weights (names and bytes): what resume fingerprints compare."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk shows up as either; the old file stays
        if (
            isinstance(e, RuntimeError)
            and not isinstance(e.__cause__ or e.__context__, OSError)
            and ("write" not in str(e).lower() and "file" not in str(e).lower())
        ):
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else _first_line(e)
        raise CheckpointError(f"{path}: cannot write the checkpoint ({reason})") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- safe reading


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:160]


def _why(e: BaseException) -> str:
    """A reader's complaint in words: the exception's type goes with a bare message (a
    ``KeyError`` of one number, say), and torch's advice after the first sentence goes."""
    text = _first_line(e).split(". This is ")[0]
    return text if any(c.isalpha() for c in text) else f"{type(e).__name__} {text}".strip()


def _unsafe_reason(e: BaseException) -> str:
    """What torch's weights-only unpickler refused, in a few words."""
    text = str(e)
    m = re.search(r"unsupported GLOBAL ([\w.]+)", text, re.IGNORECASE)
    if m:
        return f"it references {m.group(1)}"
    m = re.search(r"Unsupported operand (\d+)", text)
    if m:
        return f"pickle opcode {m.group(1)} outside the tensors-and-plain-data subset"
    return "it holds objects other than tensors and plain data"


def _not_torch(head: bytes) -> str | None:
    """What a file that starts with ``head`` looks like, when it is neither of the two forms
    ``torch.save`` writes (a zip archive, or a pickle for the legacy format); else None."""
    if head.startswith(b"PK") or head[:1] == b"\x80":  # zip, or pickle protocol 2+
        return None
    try:  # incremental: a character cut at the end of ``head`` is not an error
        text = codecs.getincrementaldecoder("utf-8")().decode(head)
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text.lstrip("\ufeff")):
        first = text.strip().splitlines()[0][:40] if text.strip() else ""
        kind = "JSON" if first[:1] in "{[" else "text"
        return f"it looks like {kind} ({first!r}), not a zip or pickle checkpoint"
    return f"it starts with bytes {head[:8].hex(' ')}, not a zip or pickle checkpoint"


def read_torch_file(path: str | os.PathLike, what: str = "torch checkpoint") -> Any:
    """``torch.load(weights_only=True)``, turning every failure into one clear line.

    A file whose unpickling would import or call anything (``os.system`` in a
    ``__reduce__``, a pickled class) is refused before any of it runs.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a {what} file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, expected a {what}")
    try:
        with open(path, "rb") as f:
            looks = _not_torch(f.read(256))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    if looks is not None:
        raise CheckpointError(f"{path}: not a {what}: {looks}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused: unpickling would run code ({_unsafe_reason(e)}); expected a {what} "
            "holding only tensors and plain data (torch.load weights_only=True)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable {what} (truncated or corrupt?): {_why(e)}") from None


def read_checkpoint_file(path: str | os.PathLike) -> dict:
    """A ``ckpt.pt`` as a dict, read safely (see :func:`read_torch_file`)."""
    obj = read_torch_file(path)
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: expected a dict checkpoint with 'model_args' and 'model', got {type(obj).__name__}"
        )
    return obj


def strip_compile_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """Drop the ``_orig_mod.`` prefix that ``torch.compile`` leaves on nanoGPT state dicts."""
    return {k.removeprefix(COMPILE_PREFIX): v for k, v in state.items()}


def _check_state(state: Any, where: str) -> dict[str, Tensor]:
    """A state dict must map names to finite tensors: anything else would fail deep inside
    torch, and NaN or inf weights would load "fine" and give meaningless glitches."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: 'model' must be a dict of tensors, got {type(state).__name__}")
    for name, value in state.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{where}: weight names must be strings, got {name!r}")
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{where}: weight {name} is a {type(value).__name__}, expected a tensor")
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(
                f"{where}: weight {name} holds {bad} NaN or inf value(s) (a diverged or corrupt checkpoint)"
            )
    return state


def _check_shapes(state: dict[str, Tensor], config: dict, where: str) -> None:
    """The GPT config must match the weights before the model is built: a lying ``n_embd`` or
    ``block_size`` of 10**9 would otherwise allocate gigabytes before load_state_dict objects."""

    def want(key: str, shape: tuple) -> None:
        t = state.get(key)
        if t is not None and tuple(t.shape) != shape:
            raise CheckpointError(
                f"{where}: weights do not fit the gpt architecture: {key} has shape {tuple(t.shape)}, "
                f"the config (n_layer {config.get('n_layer')}, n_embd {config.get('n_embd')}, "
                f"block_size {config.get('block_size')}) says {shape}"
            )

    n_embd, block = config.get("n_embd"), config.get("block_size")
    for k, v in (("n_embd", n_embd), ("block_size", block), ("n_layer", config.get("n_layer"))):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise CheckpointError(f"{where}: {k} must be a positive integer, got {v!r}")
    if "transformer.wte.weight" not in state:  # every GPT has one: without it nothing bounds n_embd
        raise CheckpointError(f"{where}: weights do not fit the gpt architecture: no transformer.wte.weight")
    want("transformer.wte.weight", (VOCAB_SIZE, n_embd))
    want("transformer.wpe.weight", (block, n_embd))  # fixed (sinusoidal) positions are stored there too
    layers = {int(m.group(1)) for k in state if (m := re.match(r"transformer\.h\.(\d+)\.", k))}
    if layers and layers != set(range(config["n_layer"])):
        raise CheckpointError(
            f"{where}: weights do not fit the gpt architecture: they hold {len(layers)} layers "
            f"(blocks {min(layers)}..{max(layers)}) but the config says n_layer {config['n_layer']}"
        )


def _load_weights(model: nn.Module, state: dict[str, Tensor], where: str, arch: str) -> None:
    """``load_state_dict(strict=True)`` with torch's multi-line complaint cut to one line."""
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = " ".join(lines[1:3])[:300]
        raise CheckpointError(f"{where}: weights do not fit the {arch} architecture: {detail}") from None
    model.eval()


# ---------------------------------------------------------------- entry point


def load_checkpoint(path: str | os.PathLike) -> Loaded:
    """Load any supported checkpoint into the fast model (eval mode, CPU).

    ``path`` is an ffinterp/nanoGPT ``ckpt.pt``, a training folder holding ``ckpt.pt``, a
    Hugging Face GPT-2 folder (or a weights file inside one), or ``pretrained:NAME``.
    """
    text = str(path)
    if text.startswith("pretrained:"):
        from ffinterp.pretrained import resolve

        path = resolve(text)
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").exists():
            return load_hf_folder(path)
        if (path / "ckpt.pt").exists():
            path = path / "ckpt.pt"
        else:
            raise CheckpointError(
                f"{path}: folder holds neither ckpt.pt nor a Hugging Face GPT-2 model "
                f"(config.json with {' or '.join(HF_WEIGHT_FILES)})"
            )
    elif path.suffix == ".safetensors" or (path.suffix == ".bin" and (path.parent / "config.json").exists()):
        return load_hf_folder(path.parent)  # a weights file of a save_pretrained folder
    return load_state(read_checkpoint_file(path), str(path))


def load_state(ckpt: dict, where: str = "checkpoint") -> Loaded:
    """Rebuild a model from an in-memory ffinterp or nanoGPT checkpoint dict."""
    missing = [k for k in ("model_args", "model") if k not in ckpt]
    if missing:
        found = ", ".join(map(str, sorted(ckpt, key=str)[:6])) or "nothing"
        hint = (
            " (a bare state dict? save it with ffinterp.checkpoints.save_checkpoint)"
            if any(isinstance(v, Tensor) for v in ckpt.values())
            else ""
        )
        raise CheckpointError(
            f"{where}: unknown layout: expected nanoGPT's keys 'model_args' and 'model', "
            f"missing {', '.join(missing)}; found {found}{hint}"
        )
    args, ffl, state = ckpt["model_args"], ckpt.get("ffl") or {}, ckpt["model"]
    if not isinstance(args, dict) or not isinstance(state, dict):
        raise CheckpointError(f"{where}: 'model_args' and 'model' must be dicts (nanoGPT layout)")
    if not isinstance(ffl, dict) or not isinstance(ffl.get("arch_config", {}), dict):
        raise CheckpointError(
            f"{where}: the 'ffl' entry and its 'arch_config' must be dicts (ffinterp layout)"
        )
    state = _check_state(state, where)
    if ffl:
        fmt = ffl.get("format", FORMAT_VERSION)
        if isinstance(fmt, int) and fmt > FORMAT_VERSION:
            raise CheckpointError(
                f"{where}: written by a newer ffinterp (format {fmt}; this version reads up to "
                f"{FORMAT_VERSION}): upgrade ffinterp"
            )
        vocab_list = ffl.get("vocab", VOCAB)
        if not isinstance(vocab_list, (list, tuple)) or list(vocab_list) != list(VOCAB):
            raise CheckpointError(f"{where}: vocabulary {ffl.get('vocab')} differs from {list(VOCAB)}")
    vocab = args.get("vocab_size")
    if vocab != VOCAB_SIZE:
        raise CheckpointError(f"{where}: vocab_size is {vocab}, {VOCAB_HINT}")
    state = strip_compile_prefix(state)
    arch = ffl.get("arch") or ("lstm" if any(k.startswith("lstm.") for k in state) else "gpt")
    if arch == "lstm":
        config = {**_lstm_shape(state), **args, **ffl.get("arch_config", {})}
    else:
        unknown = [k for k in NANOGPT_ARGS if k not in args and k not in ffl.get("arch_config", {})]
        if unknown:
            raise CheckpointError(
                f"{where}: model_args lacks {', '.join(unknown)} (nanoGPT layout expected: "
                f"{', '.join(NANOGPT_ARGS)})"
            )
        config = {**{k: args[k] for k in NANOGPT_ARGS if k in args}, **ffl.get("arch_config", {})}
        _check_shapes(state, config, where)
    try:
        model = build_model(arch, config)
    except (ValueError, TypeError, ZeroDivisionError, RuntimeError, OverflowError) as e:
        raise CheckpointError(f"{where}: bad architecture in checkpoint: {_first_line(e)}") from None
    if arch == "gpt":
        # Older nanoGPT (no flash attention) saved its causal mask as "attn.bias"; it
        # carries no weights, and our model has no such buffer.
        own = model.state_dict()
        state = {k: v for k, v in state.items() if not k.endswith(".attn.bias") or k in own}
    _load_weights(model, state, where, arch)
    return Loaded(
        model=model, arch=arch, source="ffinterp" if ffl else "nanogpt", path=where, meta=ffl, raw=ckpt
    )


def _lstm_shape(state: dict[str, Tensor]) -> dict:
    """LSTM config read off the weights (for an LSTM checkpoint without an ``ffl`` entry)."""
    layers = sum(1 for k in state if k.startswith("lstm.weight_ih_l"))
    emb = state.get("embed.weight")
    return {"n_layer": layers or 1, **({"hidden": int(emb.shape[1])} if emb is not None else {})}


# ---------------------------------------------------------------- Hugging Face GPT-2


def hf_gpt_config(hf: dict, where: str = "config.json") -> GPTConfig:
    """The fast model's config for a Hugging Face ``GPT2Config`` dict, or a clear refusal."""
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise CheckpointError(f"{where}: model_type is {model_type!r}, expected 'gpt2' (GPT2LMHeadModel)")
    if hf.get("vocab_size") != VOCAB_SIZE:
        raise CheckpointError(f"{where}: vocab_size is {hf.get('vocab_size')}, {VOCAB_HINT}")
    act = hf.get("activation_function", "gelu_new")
    if not isinstance(act, str) or act not in HF_ACTIVATIONS:
        raise CheckpointError(
            f"{where}: activation_function {act!r} is not supported "
            f"(expected one of {', '.join(HF_ACTIVATIONS)})"
        )
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
        if hf.get(key, want) != want:
            raise CheckpointError(f"{where}: {key}={hf[key]} is not supported (expected {want})")
    if hf.get("add_cross_attention"):
        raise CheckpointError(
            f"{where}: add_cross_attention is not supported (expected a decoder-only GPT-2)"
        )
    for key, default in (("n_layer", 12), ("n_head", 12), ("n_embd", 768), ("n_positions", 1024)):
        v = hf.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise CheckpointError(f"{where}: {key} must be a positive integer, got {v!r}")
    for key, default, lo, hi in (
        ("layer_norm_epsilon", 1e-5, 0.0, 1.0),
        ("embd_pdrop", 0.0, 0.0, 1.0),
        ("attn_pdrop", 0.0, 0.0, 1.0),
        ("resid_pdrop", 0.0, 0.0, 1.0),
    ):
        v = hf.get(key, default)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v < hi:
            raise CheckpointError(f"{where}: {key} must be a number in [{lo:g}, {hi:g}), got {v!r}")
    n_embd = hf.get("n_embd", 768)
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise CheckpointError(f"{where}: n_inner={hf['n_inner']} is not supported (expected 4 * n_embd)")
    try:
        return GPTConfig(
            n_layer=hf.get("n_layer", 12),
            n_head=hf.get("n_head", 12),
            n_embd=n_embd,
            block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
            vocab_size=VOCAB_SIZE,
            bias=True,
            dropout=0.0,
            embd_dropout=hf.get("embd_pdrop", 0.0),
            attn_dropout=hf.get("attn_pdrop", 0.0),
            resid_dropout=hf.get("resid_pdrop", 0.0),
            activation=HF_ACTIVATIONS[act],
            ln_eps=hf.get("layer_norm_epsilon", 1e-5),
        )
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise CheckpointError(f"{where}: bad GPT-2 config: {_first_line(e)}") from None


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {_first_line(e)}"
        ) from None


def _read_weight_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    obj = read_torch_file(path, what="PyTorch weights file")
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return obj


def read_hf_weights(folder: Path) -> dict[str, Tensor]:
    """All tensors of a ``save_pretrained`` folder: one file or shards, safetensors first."""
    for name in HF_WEIGHT_FILES:
        if (folder / name).exists():
            return _read_weight_file(folder / name)
        index = folder / f"{name}.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (
                json.JSONDecodeError,
                KeyError,
                TypeError,
                UnicodeDecodeError,
                RecursionError,
                OSError,
            ) as e:
                raise CheckpointError(
                    f"{index}: not a shard index with a 'weight_map' ({_first_line(e)})"
                ) from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
            if not weight_map:
                raise CheckpointError(f"{index}: 'weight_map' names no shards")
            state: dict[str, Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if Path(shard).name != shard:
                    raise CheckpointError(f"{index}: shard name {shard!r} must be a plain file name")
                state.update(_read_weight_file(folder / shard))
            return state
    raise CheckpointError(
        f"{folder}: no weights: expected {' or '.join(HF_WEIGHT_FILES)} next to config.json"
    )


def convert_hf_state(state: dict[str, Tensor], cfg: GPTConfig, tied: bool, where: str) -> dict[str, Tensor]:
    """HF GPT-2 names and Conv1D layout -> nanoGPT names and Linear layout (same numbers)."""
    if not any(k.startswith("transformer.") for k in state):  # saved from GPT2Model
        state = {(k if k.startswith("lm_head.") else f"transformer.{k}"): v for k, v in state.items()}
    out = {}
    for k, v in state.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):  # old causal-mask buffers
            continue
        if k.endswith(HF_CONV1D):
            if v.ndim != 2:
                raise CheckpointError(
                    f"{where}: {k} has shape {tuple(v.shape)}, expected a 2-D Conv1D weight"
                )
            v = v.t()
        out[k] = v.float().contiguous()
    if tied or "lm_head.weight" not in out:
        if "transformer.wte.weight" not in out:
            raise CheckpointError(f"{where}: no transformer.wte.weight: not GPT-2 weights")
        out["lm_head.weight"] = out["transformer.wte.weight"].clone()
    return out


def load_hf_folder(folder: str | os.PathLike) -> Loaded:
    """A Hugging Face ``GPT2LMHeadModel`` folder as the fast model, with HF's numerics."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{folder}: no config.json (expected a Hugging Face save_pretrained folder)")
    if cfg_path.is_dir():
        raise CheckpointError(f"{cfg_path}: is a folder, expected a JSON file")
    try:
        hf = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({_first_line(e)})") from None
    except OSError as e:
        raise CheckpointError(f"{cfg_path}: cannot read ({e.strerror or type(e).__name__})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object")
    cfg = hf_gpt_config(hf, str(cfg_path))
    weights = _check_state(read_hf_weights(folder), str(folder))
    state = convert_hf_state(weights, cfg, hf.get("tie_word_embeddings", True), str(folder))
    _check_shapes(state, cfg.to_dict(), str(folder))
    try:
        model = GPT(cfg)
    except (ValueError, TypeError, ZeroDivisionError, RuntimeError, OverflowError) as e:
        raise CheckpointError(f"{cfg_path}: bad GPT-2 config: {_first_line(e)}") from None
    _load_weights(model, state, str(folder), "gpt")
    return Loaded(model=model, arch="gpt", source="hf", path=str(folder), meta={"hf_config": hf}, raw={})
