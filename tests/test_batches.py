"""Entry points handed a whole batch run it in passes of bounded size, with the same results.

``predict_reads`` on 3,000 x 512 sequences once ran them through the hooked model at once
and was killed for memory. Each test shrinks the memory budget so that a small batch needs
several passes, records the rows of every forward call, and compares with one big pass.
"""

from __future__ import annotations

import pytest
import torch

import ffinterp
from ffinterp import scoring
from ffinterp.analysis import attention
from ffinterp.analysis.minimize import margin_at
from ffinterp.analysis.tail import score_rows
from ffinterp.language import reads
from ffinterp.scoring import rows_per_pass, score_logits

T = 128
N = 20
BUDGET_MB = 8.0  # glitchy-128 at T=128: 3 rows a pass through hooks, 5 on the fast model


@pytest.fixture(scope="module")
def model() -> ffinterp.FFLModel:
    return ffinterp.load_model("pretrained:glitchy-128", device="cpu")


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return ffinterp.sample(N, T, p_i=0.5, seed=4)


@pytest.fixture
def small_budget(monkeypatch) -> None:
    monkeypatch.setattr(scoring, "PASS_MEMORY_MB", BUDGET_MB)


def spy_rows(module: torch.nn.Module) -> tuple[list[int], object]:
    """Rows of every forward call of ``module`` (a pre-hook), and the handle to remove it."""
    rows: list[int] = []
    handle = module.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    return rows, handle


def test_pass_size_bounds_the_activations(model: ffinterp.FFLModel) -> None:
    """At the default budget the sequences of the report (3,000 x 512 through hooks) take
    passes of a few rows, whose scores and patterns fit in PASS_MEMORY_MB."""
    glitchy512 = ffinterp.load_model("pretrained:glitchy-512", device="cpu")
    rows = rows_per_pass(glitchy512.hooked, 512)
    cfg = glitchy512.hooked.cfg
    scores = 3 * cfg.n_heads * 512 * 512 * 4  # bytes per row: scores, pattern and a copy
    assert 1 <= rows <= 64 and rows * scores <= scoring.PASS_MEMORY_MB * 2**20
    assert rows_per_pass(glitchy512.fast, 512) > rows  # SDPA keeps no T x T scores
    assert rows_per_pass(model.hooked, T, memory_mb=BUDGET_MB) == 3


@pytest.mark.tl3
def test_predict_reads_runs_in_passes_with_the_same_scores(
    model: ffinterp.FFLModel, tokens: torch.Tensor, small_budget
) -> None:
    rows, handle = spy_rows(model.hooked)
    try:
        got = model.predict_reads(tokens)
    finally:
        handle.remove()
    assert len(rows) == 7 and max(rows) == 3 and sum(rows) == N
    with torch.inference_mode():
        want = score_logits(model.hooked(tokens), reads(tokens))
    assert len(got) == len(want) > 0
    assert torch.equal(got.reads.batch, want.reads.batch) and torch.equal(got.reads.pos, want.reads.pos)
    assert torch.equal(got.pred, want.pred)
    assert torch.allclose(got.margin, want.margin, atol=1e-5, rtol=0)
    assert torch.allclose(got.p_correct, want.p_correct, atol=1e-6, rtol=0)


@pytest.mark.tl3
def test_logits_of_both_views_run_in_passes(
    model: ffinterp.FFLModel, tokens: torch.Tensor, small_budget
) -> None:
    for view, method in ((model.fast, model.fast_logits), (model.hooked, model.hooked_logits)):
        rows, handle = spy_rows(view)
        try:
            got = method(tokens)
        finally:
            handle.remove()
        assert max(rows) == rows_per_pass(view, T) < N and sum(rows) == N
        with torch.no_grad():
            want = view(tokens)
        assert got.shape == (N, T, 5)
        assert (got - want).abs().max() <= 1e-5


def test_fast_scoring_helpers_run_in_passes(
    model: ffinterp.FFLModel, tokens: torch.Tensor, small_budget
) -> None:
    """score_tokens (read_accuracy, diagnosis), the tail's score_rows and the minimiser's
    margin_at on the fast model."""
    fast = model.fast
    step = rows_per_pass(fast, T)
    with torch.inference_mode():
        full = fast(tokens)
    rd = reads(tokens)
    for run in (
        lambda: scoring.score_tokens(fast, tokens).margin,
        lambda: score_rows(fast, tokens).min_margin.float(),
        lambda: margin_at(fast, tokens, int(rd.pos[rd.batch == 0][0])),
    ):
        rows, handle = spy_rows(fast)
        try:
            got = run()
        finally:
            handle.remove()
        assert max(rows) == step < N and sum(rows) == N
        assert got.numel() > 0
    want = score_logits(full, rd)
    assert torch.allclose(scoring.score_tokens(fast, tokens).margin, want.margin, atol=1e-5, rtol=0)
    per_row = torch.full((N,), float("inf")).scatter_reduce(0, rd.batch, want.margin, "amin")
    assert torch.allclose(score_rows(fast, tokens).min_margin.float(), per_row, atol=1e-5, rtol=0)


@pytest.mark.tl3
def test_attention_rows_and_patterns_run_in_passes(
    model: ffinterp.FFLModel, tokens: torch.Tensor, monkeypatch
) -> None:
    """read_rows puts each read's rows where its (batch, pos) asks, in any order."""
    monkeypatch.setattr(attention, "auto_batch_size", lambda m, seq_len, memory_mb=0: 3)
    rd = reads(tokens)
    order = torch.randperm(len(rd), generator=torch.Generator().manual_seed(0))
    shuffled = type(rd)(rd.batch[order], rd.pos[order], rd.bit[order], rd.write_pos[order])
    rows: list[int] = []
    run_with_cache = model.hooked.run_with_cache

    def spy(x, **kwargs):
        rows.append(x.shape[0])
        return run_with_cache(x, **kwargs)

    monkeypatch.setattr(model.hooked, "run_with_cache", spy)
    got = attention.read_rows(model, tokens, shuffled)
    patterns = attention.full_patterns(model, tokens[:7])
    monkeypatch.undo()
    assert rows == [3] * 6 + [2] + [3, 3, 1]
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.n_layers)]
    with torch.inference_mode():
        _, cache = model.hooked.run_with_cache(tokens, names_filter=names)
    whole = torch.stack([cache[n] for n in names], 1)  # batch layer head query key
    want = whole[shuffled.batch, :, :, shuffled.pos, :]
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-6
    assert (patterns - whole[:7]).abs().max() <= 1e-6
