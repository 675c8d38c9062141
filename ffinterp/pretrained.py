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
