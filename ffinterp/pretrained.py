"""The shipped zoo: ``pretrained:NAME`` names a model in the index, verified by sha256.

The index lives in the package (``ffinterp/pretrained/index.json``, with the weights beside
it) so it is there after a plain ``pip install .``; the top-level ``pretrained_index.json``
of a checkout is a link to it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ffinterp.errors import FFInterpError

PREFIX = "pretrained:"
ZOO_DIR = Path(__file__).resolve().parent / "pretrained"
INDEX_PATH = ZOO_DIR / "index.json"
DEFAULT_MODEL = "mixture-512"  # what `ffinterp find-glitches` breaks when given no checkpoint


def index() -> list[dict]:
    """Every entry of the index (name, file, sha256, config, command, error rates...)."""
    with open(INDEX_PATH, encoding="utf-8") as f:
        return json.load(f)["models"]


def entry(name: str) -> dict:
    for e in index():
        if e["name"] == name:
            return e
    known = ", ".join(e["name"] for e in index()) or "none shipped yet"
    raise FFInterpError(f"unknown pretrained model {name!r} (known: {known})")


def trained_on(e: dict, entries: list[dict] | None = None) -> str:
    """What a model was trained on, in words, from its index entry: the distribution and any
    mitigation, and for a fine-tune the model it started from (the entry's ``init_from``, or
    its ``train_config.init_from`` named as the shipped model whose training wrote that
    checkpoint): "fine-tuned from glitchy-512 on FFL(0.8), attention sharpening 0.01"."""
    tc = e.get("train_config") or {}
    mixture = tc.get("mixture") or []
    if mixture:
        text = "a mixture of " + ", ".join(f"FFL({p:g})" for p in mixture)
    elif "p_i" in tc:
        text = f"FFL({tc['p_i']:g})"
    else:
        return str(e.get("distribution", "?"))
    extras = [f"{label} {tc[key]:g}" for key, label in MITIGATIONS if tc.get(key)]
    if tc.get("pos_embedding") == "sinusoidal":
        extras.append("fixed positions")
    text = ", ".join([text, *extras])
    parent = e.get("init_from") or (tc.get("init_from") and _shipped_name(str(tc["init_from"]), entries))
    if parent and parent == e.get("name"):  # a longer run of the same recipe, not a fine-tune
        return f"{text} (continued from an earlier {parent})"
    return f"fine-tuned from {parent} on {text}" if parent else text


MITIGATIONS = (("embd_dropout", "embedding dropout"), ("sharpen", "attention sharpening"))


def _shipped_name(spec: str, entries: list[dict] | None) -> str:
    """``pretrained:NAME`` as NAME; a path as the shipped model whose recorded training
    command wrote it (``--out FOLDER``); else the path."""
    if spec.startswith(PREFIX):
        return spec[len(PREFIX) :]
    path = Path(spec)
    folder = path.parent if path.name == "ckpt.pt" else path
    for e in index() if entries is None else entries:
        for command in e.get("commands") or []:
            words = command.split()
            outs = [words[k + 1] for k, w in enumerate(words[:-1]) if w == "--out"]
            if any(Path(o) == folder for o in outs):
                return e["name"]
    return spec


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve(spec: str | os.PathLike) -> Path:
    """A path for ``spec``: ``pretrained:NAME`` is looked up and its sha256 checked."""
    text = str(spec)
    if not text.startswith(PREFIX):
        return Path(spec)
    e = entry(text[len(PREFIX) :])
    path = ZOO_DIR / e["file"]
    if not path.exists():
        raise FFInterpError(f"{text}: weights file {path} is missing from the installation")
    digest = sha256_of(path)
    if digest != e["sha256"]:
        raise FFInterpError(
            f"{text}: sha256 mismatch for {path.name}: expected {e['sha256'][:16]}…, got {digest[:16]}… "
            "(the file was changed or corrupted)"
        )
    return path
