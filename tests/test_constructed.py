"""The hand-built flip-flop circuit: exact at high sharpness, glitches where the closed form says.

Tests marked ``tl3`` also run on TransformerLens 3.x (``HookedTransformer``).
"""

from __future__ import annotations

import math

import pytest
import torch

from ffinterp.analysis.attention import last_write_mass, read_attention
from ffinterp.analysis.readheads import detect_read_heads
from ffinterp.hooked import load_model
from ffinterp.language import read_mask, reads, sample
from ffinterp.models.constructed import (
    READ_HEAD,
    CircuitParams,
    build_circuit,
    circuit_model,
    closed_form_out,
    closed_form_pattern,
    closed_form_predictions,
    decoy_sequence,
    glitch_region,
    min_exact_sharpness,
    predicted_error,
    predicted_last_write_mass,
    save_circuit,
)
from ffinterp.scoring import score_tokens

T = 64
LOW = 12.0  # glitches on T=64: a handful of decoys at long gaps


@pytest.fixture(scope="module")
def low():
    return circuit_model(LOW, block_size=T)


@pytest.fixture(scope="module")
def high():
    return circuit_model(1000.0, block_size=T)


@pytest.mark.parametrize("p_i", [0.1, 0.8, 0.98])
def test_high_sharpness_solves_the_task_exactly(p_i):
    for seq_len, n in ((64, 256), (512, 24)):
        model = build_circuit(1000.0, block_size=seq_len)
        s = score_tokens(model, sample(n, seq_len, p_i, seed=11))
        assert len(s) > 0
        assert int(s.error.sum()) == 0, f"T={seq_len} FFL({p_i})"
        assert float(s.margin.min()) > 5.0


def test_min_exact_sharpness_is_the_boundary():
    rho = min_exact_sharpness(T)
    assert rho == pytest.approx((T - 2) * math.log(2) / 2)
    gaps, decoys = range(2, T, 2), range(0, T // 2)
    fits = [(g, n) for g in gaps for n in decoys if 2 * n + g <= T - 2]
    assert not any(predicted_error(g, n, rho * 1.01) for g, n in fits)
    assert any(predicted_error(g, n, rho * 0.9) for g, n in fits)


def test_glitch_region_is_monotone_and_nontrivial():
    region = glitch_region(LOW, range(2, 40, 2), range(0, 12))
    assert region.any() and not region.all()
    assert not region[:, :2].any()  # one decoy never outweighs the last write
    # More decoys or a longer gap never repairs a glitch.
    assert (region[:, 1:].int() >= region[:, :-1].int()).all()
    assert (region[1:].int() >= region[:-1].int()).all()


@pytest.mark.tl3
def test_predictions_match_the_closed_form_region_on_a_grid(low):
    fast = low.fast
    rows, expect, probes = [], [], []
    for gap in range(2, 50, 4):
        for n in range(0, 16):
            if 2 * n + gap > T - 2:
                continue
            for bit in (0, 1):
                tokens, t = decoy_sequence(gap, n, T, bit=bit)
                rows.append(tokens)
                probes.append(t)
                expect.append(predicted_error(gap, n, LOW))
    tokens = torch.stack(rows)
    s = score_tokens(fast, tokens)
    probe = torch.tensor(probes)
    at = s.reads.pos == probe[s.reads.batch]
    got = s.error[at]
    assert at.sum() == len(rows)
    assert got.tolist() == expect
    assert 10 < sum(expect) < len(expect) - 10  # the grid crosses the boundary
    # The hooked view agrees with the fast one on every probed read.
    h = low.predict_reads(tokens)
    assert torch.equal(h.pred, s.pred)


@pytest.mark.tl3
def test_exact_attention_mass_equals_the_closed_form(low, high):
    for model, atol in ((low, 1e-5), (high, 2e-3)):
        p = CircuitParams.from_meta(model.meta)
        tokens = sample(6, T, 0.5, seed=5)
        ra = read_attention(model, tokens)
        l, h = READ_HEAD
        cf = closed_form_pattern(tokens, p)
        rd = ra.reads
        want = cf[rd.batch, rd.pos].float()
        assert torch.allclose(ra.rows[:, l, h], want, atol=atol)
        lw = want[torch.arange(len(rd)), rd.write_pos] + want[torch.arange(len(rd)), rd.write_pos + 1]
        assert torch.allclose(ra.last_write_mass[:, l, h], lw, atol=atol)
    # On the decoy family the mass is 1 / sum_i q^i.
    for gap, n in ((4, 0), (10, 3), (30, 6), (40, 10)):
        tokens, t = decoy_sequence(gap, n, T)
        lw = last_write_mass(low, tokens[None])
        k = int((reads(tokens[None]).pos == t).nonzero()[0, 0])
        assert float(lw[k, READ_HEAD[0], READ_HEAD[1]]) == pytest.approx(
            predicted_last_write_mass(gap, n, LOW), abs=1e-5
        )


def test_closed_form_predicts_every_read(low):
    tokens = sample(64, T, 0.3, seed=2)
    p = CircuitParams.from_meta(low.meta)
    out = closed_form_out(tokens, p)
    mask = read_mask(tokens) & (out.abs() > 1e-4)  # leave exact ties to the float rounding
    pred = low.fast(tokens).argmax(-1)
    assert torch.equal(pred[mask], closed_form_predictions(tokens, p)[mask])
    assert int(mask.sum()) > 500


@pytest.mark.tl3
def test_read_head_detection_names_the_read_head(low, high):
    for model in (low, high):
        rh = detect_read_heads(model, "in", "sparse", n=32, seq_len=T)
        assert rh.heads == [READ_HEAD]
        assert rh.passed and rh.stable
    assert float(rh.score[READ_HEAD]) > 0.99


@pytest.mark.tl3
def test_checkpoint_carries_the_region(tmp_path):
    path = tmp_path / "circuit.pt"
    save_circuit(path, LOW, block_size=T)
    model = load_model(path, device="cpu")
    p = CircuitParams.from_meta(model.meta)
    assert p.sharpness == LOW and p.block_size == T
    assert model.meta["constructed"]["read_head"] == list(READ_HEAD)
    tokens, t = decoy_sequence(40, 8, T)
    s = model.predict_reads(tokens[None])
    k = int((s.reads.pos == t).nonzero()[0, 0])
    assert predicted_error(40, 8, p.sharpness)
    assert bool(s.error[k])
    assert model.fast.cfg.layer_norm is False and model.fast.cfg.attn_only is True
