"""The shipped zoo: index integrity, sha256 checks, and figures that reproduce."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from ffinterp import pretrained
from ffinterp.checkpoints import load_checkpoint
from ffinterp.errors import FFInterpError
from ffinterp.evaluate import evaluate

MODELS = pretrained.index()
NAMES = [m["name"] for m in MODELS]


def test_zoo_has_transformers_and_the_lstm():
    assert {"glitchy-128", "mitigated-128", "lstm-128"} <= set(NAMES)
    assert pretrained.DEFAULT_MODEL in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_index_sha256_matches_the_file(name):
    e = pretrained.entry(name)
    assert pretrained.sha256_of(pretrained.ZOO_DIR / e["file"]) == e["sha256"]
    assert e["commands"] and all(c.startswith("ffinterp train") for c in e["commands"])
    assert set(e["eval"]) == {"in", "sparse", "dense"}


@pytest.mark.parametrize("name", NAMES)
def test_in_distribution_error_matches_the_index(name):
    e = pretrained.entry(name)
    model = load_checkpoint(f"pretrained:{name}").model
    r = evaluate(model, "in", n=300, seq_len=e["seq_len"], progress=False, device="cpu")["in"]
    p = e["eval"]["in"]["error_rate"]
    # The first 300 sequences are a subset of the indexed 16,000: their rate must agree
    # within 4 binomial standard deviations (plus one error of slack for p = 0).
    tolerance = 4 * math.sqrt(max(p * (1 - p), 1e-12) / r.reads) + 1 / r.reads
    assert abs(r.error_rate - p) <= tolerance, (r.error_rate, p)


def test_tampered_weights_are_refused(tmp_path, monkeypatch):
    e = pretrained.entry("lstm-128")
    fake = tmp_path / e["file"]
    fake.write_bytes((pretrained.ZOO_DIR / e["file"]).read_bytes() + b"x")
    monkeypatch.setattr(pretrained, "ZOO_DIR", tmp_path)
    with pytest.raises(FFInterpError, match="sha256 mismatch"):
        pretrained.resolve("pretrained:lstm-128")


def test_unknown_name_lists_the_zoo():
    with pytest.raises(FFInterpError, match="known: .*glitchy-128"):
        pretrained.resolve("pretrained:nope")


def test_cli_lists_the_zoo():
    r = subprocess.run(
        [sys.executable, "-m", "ffinterp", "pretrained", "list"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    for name in NAMES:
        assert name in r.stdout
