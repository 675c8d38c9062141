"""The same seed on the same device gives the same files: ``glitches.jsonl`` byte for byte,
``summary.json`` equal, key order included, once its one timing (``wall_s``) is removed.

Full runs of the glitch finder (every strategy, minimisation and diagnosis on) into separate
folders: on the hand-built circuit at a low sharpness, where each of the four strategies
finds glitches of its own, and on a tiny untrained GPT (random weights from a seed).
"""

from __future__ import annotations

import json

import pytest
import torch

from ffinterp.analysis.glitches import find_glitches, read_jsonl
from ffinterp.hooked import FFLModel
from ffinterp.models.constructed import circuit_model
from ffinterp.models.gpt import GPT, GPTConfig

T = 32
#: The summary's only fields that measure time, not results.
TIMINGS = ("wall_s",)


def _circuit() -> FFLModel:
    return circuit_model(8.0, block_size=T)  # below min_exact_sharpness(32): rare glitches


def _tiny() -> FFLModel:
    torch.manual_seed(0)
    return FFLModel.from_fast(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=T)), device="cpu")


MODELS = {"circuit": (_circuit, 40), "tiny": (_tiny, 4)}  # builder, max_glitches


def _run(model: str, out, seed: int) -> tuple[bytes, str]:
    """One run into ``out`` on a freshly built model: the JSONL's bytes and the summary
    without timings, re-serialised in its own key order."""
    build, max_glitches = MODELS[model]
    find_glitches(
        build(),
        "all",
        1024,
        seed=seed,
        out=out,
        seq_len=T,
        batch_size=64,
        max_glitches=max_glitches,
        device="cpu",
    )
    summary = json.loads((out / "summary.json").read_text())
    for key in TIMINGS:
        assert key in summary, f"summary.json lacks the timing {key!r}: update TIMINGS"
        del summary[key]
    return (out / "glitches.jsonl").read_bytes(), json.dumps(summary)


@pytest.mark.parametrize("model", list(MODELS))
def test_same_seed_same_files(model: str, tmp_path) -> None:
    jsonl_a, summary_a = _run(model, tmp_path / "a", seed=7)
    jsonl_b, summary_b = _run(model, tmp_path / "b", seed=7)
    glitches = read_jsonl(tmp_path / "a" / "glitches.jsonl")
    # every stage wrote something, so the comparison covers it
    assert glitches and all(g.get("minimized") and g.get("diagnosis") for g in glitches)
    if model == "circuit":
        assert {g["strategy"] for g in glitches} == {"random", "families", "evolve", "gradient"}
    assert jsonl_a == jsonl_b
    assert summary_a == summary_b
    jsonl_c, _ = _run(model, tmp_path / "c", seed=8)
    assert jsonl_c != jsonl_a  # the seed matters
