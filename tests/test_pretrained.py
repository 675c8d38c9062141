"""The shipped zoo: index integrity, sha256 checks, and figures that reproduce."""

from __future__ import annotations

import json
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
#: First rows of each standard set re-scored per model: a subset of the indexed figures.
SUBSET = {"in": 200, "sparse": 1000, "dense": 40}


#: The paper's regime: every model at T=512.
PAPER_ZOO = {"glitchy-512", "dropout-512", "sharpen-512", "mixture-512", "lstm-512"}


def test_zoo_has_the_paper_zoo_and_the_fast_test_models():
    assert PAPER_ZOO | {"glitchy-128", "mitigated-128", "lstm-128"} <= set(NAMES)
    for name in PAPER_ZOO:
        assert pretrained.entry(name)["seq_len"] == 512, name
    assert pretrained.DEFAULT_MODEL in PAPER_ZOO - {"glitchy-512", "lstm-512"}  # a mitigated T=512 model


def test_the_baseline_records_its_seed_replicates():
    """The paper stresses seed spread: glitchy-512's entry holds >= 3 seeds of its recipe,
    each with its command and its figures on the same sets, one of them the shipped run."""
    seeds = pretrained.entry("glitchy-512")["seeds"]
    assert len({s["seed"] for s in seeds}) >= 3 and sum(s["shipped"] for s in seeds) == 1
    for s in seeds:
        assert s["command"].startswith("ffinterp train") and set(s["eval"]) == {"in", "sparse", "dense"}
    assert len({json.dumps(s["sequences_per_set"]) for s in seeds}) == 1


def test_the_mitigations_are_fine_tunes_of_the_baseline():
    for name in ("dropout-512", "sharpen-512", "mixture-512"):
        e = pretrained.entry(name)
        assert e.get("init_from") == "glitchy-512" and "--init-from" in e["commands"][-1], name


@pytest.mark.parametrize("name", NAMES)
def test_index_sha256_matches_the_file(name):
    e = pretrained.entry(name)
    assert pretrained.sha256_of(pretrained.ZOO_DIR / e["file"]) == e["sha256"]
    assert e["commands"] and all(c.startswith("ffinterp train") for c in e["commands"])
    assert set(e["eval"]) == {"in", "sparse", "dense"}


@pytest.mark.parametrize("name", NAMES)
def test_index_figures_reproduce_on_a_subset(name):
    """The first sequences of each set are a subset of the indexed ones: their error rate
    must agree with the index within 4 binomial standard deviations (plus one error of
    slack, for rates of 0)."""
    e = pretrained.entry(name)
    model = load_checkpoint(f"pretrained:{name}").model
    result = evaluate(model, n=SUBSET, seq_len=e["seq_len"], progress=False, device="cpu", batch_size=200)
    for s in result:
        p = e["eval"][s.name]["error_rate"]
        tolerance = 4 * math.sqrt(max(p * (1 - p), 1e-12) / s.reads) + 1 / s.reads
        assert abs(s.error_rate - p) <= tolerance, (s.name, s.errors, s.reads, p)


def test_the_t512_transformer_errs_on_a_fixed_sparse_sample():
    """R1 on one fixed sample: the first 500 sequences of the sparse set at T=512, where the
    same model errs on only 0.13% of in-distribution reads."""
    model = load_checkpoint("pretrained:glitchy-512").model
    result = evaluate(model, "sparse", n=500, progress=False, device="cpu", batch_size=250)["sparse"]
    assert result.errors > 0.01 * result.reads and result.reads > 1000


def test_the_t512_lstm_makes_no_error_on_a_fixed_sparse_sample():
    """R2 on one fixed sample: the first 2,000 sequences of the sparse set at T=512 (its
    36 errors in the full 160,000 fall elsewhere)."""
    model = load_checkpoint("pretrained:lstm-512").model
    result = evaluate(model, "sparse", n=2000, progress=False, device="cpu", batch_size=250)["sparse"]
    assert result.errors == 0 and result.reads > 4000


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


@pytest.mark.parametrize("columns", [80, 120, 250])
def test_cli_lists_the_zoo_within_the_terminal_width(columns):
    env = {**__import__("os").environ, "COLUMNS": str(columns)}
    r = subprocess.run(
        [sys.executable, "-m", "ffinterp", "pretrained", "list"], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(map(len, lines)) <= columns, (columns, max(map(len, lines)))
    starts = [line.split()[0] for line in lines if line and not line[0].isspace()]
    assert starts == ["name", *sorted(NAMES, key=lambda n: -pretrained.entry(n)["seq_len"])]
    if columns == 250:  # wide enough: one line per model
        assert len(lines) == 1 + len(NAMES)
        assert "fine-tuned from glitchy-512 on a mixture of FFL(0.1), FFL(0.9), FFL(0.98)" in r.stdout


def test_trained_on_names_the_model_a_fine_tune_started_from():
    said = {e["name"]: pretrained.trained_on(e) for e in MODELS}
    assert said["glitchy-128"] == "FFL(0.8)"
    assert said["lstm-512"] == "FFL(0.8) (continued from an earlier lstm-512)"  # trained longer
    assert said["sharpen-512"] == "fine-tuned from glitchy-512 on FFL(0.8), attention sharpening 0.01"
    assert said["dropout-512"] == "fine-tuned from glitchy-512 on FFL(0.8), embedding dropout 0.1"
    assert said["mitigated-128"].startswith("fine-tuned from glitchy-128 on a mixture of FFL(0.1)")
    # without the entry's own init_from: the checkpoint path, traced to the run that wrote it
    bare = {k: v for k, v in pretrained.entry("mixture-512").items() if k != "init_from"}
    assert pretrained.trained_on(bare).startswith("fine-tuned from glitchy-512 on a mixture")
    assert "FFL(0.8)" not in pretrained.trained_on(bare)
