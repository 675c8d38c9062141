"""Planted glitch patterns: an exact likelihood (against the sampler's own story, enumerated),
and tail estimates from a glitch search that cover the circuit's exact rate and give a
finite figure for a model with no errors on the sparse set."""

from __future__ import annotations

import itertools
import json
import math
import re

import pytest
import torch
from test_estimate import T, exact_error_prob, run_cli
from test_families import _all_sequences

from ffinterp.analysis.families import FFL, BitMarkov, Markov, Mixture, Piecewise, interpolate
from ffinterp.analysis.patterns import from_glitches, glitch_proposal, jittered, shrink
from ffinterp.analysis.planted import Planted
from ffinterp.analysis.tail import estimate, score_rows
from ffinterp.errors import FFInterpError
from ffinterp.evaluate import _as_model
from ffinterp.language import ONE, ZERO, I, R, W, to_text, validate_batch
from ffinterp.models.constructed import build_circuit, decoy_sequence, predicted_error, save_circuit
from ffinterp.pretrained import entry

TARGETS = {
    "ffl": FFL(0.2, 0.3, 0.5),
    "piecewise-ones": Piecewise(((0.5, 0.2, 0.3), (0.2, 0.3, 0.5)), ones=(0.8, 0.3)),
}
PATTERNS = {
    "write-flip-read": (((W, 1), (W, 0), (R, 0)), ((1, 1), (1, 2))),
    "spaced": (((W, 0), (R, 0)), ((2, 3),)),
    "read-first": (((R, 0), (W, 1)), ((1, 2),)),
    "one-write": (((W, 1),), ()),
    "ignore-run": (((W, 1), (I, 0), (I, 0), (R, 0)), ((1, 1), (1, 1), (1, 2))),
}


def _story_probs(planted: Planted, seq_len: int) -> dict[tuple, float]:
    """The sampler's story, enumerated: every target sequence, every start and gaps that
    fit, the pattern written in and the reads refilled; probabilities add up per result."""
    pairs = seq_len // 2
    target = planted.target
    rows = _all_sequences(seq_len)
    lp = target.log_prob(rows)
    rows, p_rows = rows[torch.isfinite(lp)].tolist(), lp[torch.isfinite(lp)].exp().tolist()
    places = []
    for start in range(pairs):
        for gaps in itertools.product(*(range(lo, hi + 1) for lo, hi in planted.gaps)):
            slots = [start + sum(gaps[:k]) for k in range(len(planted.pattern))]
            end = slots[-1]
            fits = end < pairs - 1 or (end == pairs - 1 and planted.pattern[-1][0] == R)
            fits &= start > 0 or planted.pattern[0][0] == W
            weight = 1 / pairs
            for lo, hi in planted.gaps:
                weight /= hi - lo + 1
            if fits:
                places.append((slots, weight))
    z = sum(w for _, w in places)
    out: dict[tuple, float] = {}
    for row, p in zip(rows, p_rows):
        for slots, w in places:
            x = list(row)
            for j, (a, b) in zip(slots, planted.pattern):
                x[2 * j] = a
                if a != R:
                    x[2 * j + 1] = ONE if b else ZERO
            last = None
            for j in range(pairs):
                if x[2 * j] == W:
                    last = x[2 * j + 1]
                elif x[2 * j] == R:
                    x[2 * j + 1] = last
            out[tuple(x)] = out.get(tuple(x), 0.0) + p * w / z
    return out


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_log_prob_is_the_samplers_story_enumerated(target, pattern):
    planted = Planted(TARGETS[target], *PATTERNS[pattern], 10)
    story = _story_probs(planted, 10)
    seqs = _all_sequences(10)
    lp = planted.log_prob(seqs)
    ref = torch.tensor([story.get(tuple(r), 0.0) for r in seqs.tolist()], dtype=torch.float64)
    assert torch.allclose(lp.exp(), ref, rtol=1e-9, atol=1e-15)
    assert float(lp.exp().sum()) == pytest.approx(1.0, abs=1e-12)
    # The sampler follows it: valid, seeded, and the expected number of reads agrees.
    x = planted.sample(4000, 10, seed=3)
    validate_batch(x)
    assert torch.equal(x, planted.sample(4000, 10, seed=3))
    assert bool(torch.isfinite(planted.log_prob(x)).all())
    reads = float((x[:, 0::2] == R).sum(1).double().mean())
    assert reads == pytest.approx(planted.expected_reads(10), abs=0.06)
    uniq, counts = x.unique(dim=0, return_counts=True)
    top = counts.argsort(descending=True)[:5]
    p = planted.log_prob(uniq[top]).exp()
    freq = counts[top].double() / len(x)
    assert torch.all((freq - p).abs() <= 4 * (p * (1 - p) / len(x)).sqrt() + 1e-3)


def test_from_glitch_keeps_the_active_slots_and_jitters_the_gaps():
    target = FFL.from_p_i(0.98)
    # The first write joins (next active one slot on); gaps of d become 1 .. 2d-1.
    near = Planted.from_glitch(target, "w0w1w1i0i0w0r0", 64)
    assert near.pattern == ((W, 0), (W, 1), (W, 1), (W, 0), (R, 0))
    assert near.gaps == ((1, 1), (1, 1), (1, 5), (1, 1))
    far = Planted.from_glitch(target, "w1i0i0i0w0w1r1", 64, jitter=False)
    assert far.pattern == ((W, 0), (W, 1), (R, 0)) and far.gaps == ((1, 1), (1, 1))
    assert jittered(far).gaps == ((1, 1), (1, 1))
    assert jittered(Planted(target, far.pattern, ((3, 3), (2, 2)), 64)).gaps == ((1, 5), (1, 3))
    # The whole window with its ignore bits, exactly spaced.
    window = Planted.from_glitch(target, "w1i1w1i0i0r1", 64, ignores=True)
    assert window.pattern == ((W, 1), (I, 1), (W, 1), (I, 0), (I, 0), (R, 0)) and window.gaps == ((1, 1),) * 5
    assert str(window).startswith("Planted([w1 i1 w1 i0 i0 r]")
    # Mirrors: every bit flipped, the duplicates dropped (here the window is the actives).
    found = from_glitches(target, ["w1i0i0i0w0w1r1", "w1i0i0i0w0w1r1", "w0i1i1i1w1w0r0"], 64)
    assert sorted(p.pattern for p in found) == [((W, 0), (W, 1), (R, 0)), ((W, 1), (W, 0), (R, 0))]
    spaced = from_glitches(target, ["w1i1w1i0i0r1"], 64)
    assert {p.pattern for p in spaced} == {
        ((W, 1), (W, 1), (R, 0)),
        ((W, 0), (W, 0), (R, 0)),
        ((W, 1), (I, 1), (W, 1), (I, 0), (I, 0), (R, 0)),
        ((W, 0), (I, 0), (W, 0), (I, 1), (I, 1), (R, 0)),
    }
    with pytest.raises(FFInterpError, match="no write or read"):
        Planted.from_glitch(target, "w1i0i0i0", 64)
    with pytest.raises(FFInterpError, match="does not fit"):
        Planted.from_glitch(target, "w0" + "w1" * 40 + "r1", 64)


def test_only_targets_with_independent_slots_and_structure_is_kept():
    pattern, gaps = PATTERNS["write-flip-read"]
    for bad in (BitMarkov(0.3, 0.3, 0.4, q=0.9), Markov.from_ffl(0.3, 0.3, 0.4)):
        with pytest.raises(FFInterpError, match="Planted"):
            Planted(bad, pattern, gaps, 32)
    assert Planted(BitMarkov(0.3, 0.3, 0.4, q=0.5), pattern, gaps, 32).seq_len == 32
    a = Planted(FFL(0.1, 0.1, 0.8), pattern, gaps, 32)
    b = Planted(FFL(0.3, 0.3, 0.4), pattern, gaps, 32)
    mid = interpolate(Mixture((a, a), (0.5, 0.5)), Mixture((b, a), (0.1, 0.9)), 0.5)
    assert mid.components[0].target.p_i == pytest.approx(0.6) and mid.components[0].gaps == gaps
    assert mid.weights == pytest.approx((0.3, 0.7))
    with pytest.raises(FFInterpError, match="structures"):
        interpolate(a, Planted(FFL(0.1, 0.1, 0.8), pattern, ((1, 1), (1, 3)), 32), 0.5)
    with pytest.raises(FFInterpError, match="built for T=32"):
        a.sample(3, 64, seed=0)


def _decoy_glitches(sharpness: float, count: int) -> list[str]:
    """The first erring probes of the circuit's closed form (what a glitch search returns)."""
    texts = [
        to_text(decoy_sequence(gap, n, T)[0])
        for gap in range(2, T - 2, 2)
        for n in range(10)
        if 2 * n + gap <= T - 2 and predicted_error(gap, n, sharpness)
    ]
    return texts[:count]


@pytest.mark.parametrize("p_i", [0.995, 0.998])
def test_planted_estimates_cover_the_circuits_exact_rate(p_i):
    """From 5 glitches, shrunk and jittered, 8,000 sequences: the estimate is within a
    factor 1.5 of the exact rate (5.8e-9, 3.7e-10) and its interval covers it. Measured over
    5 seeds at each of 0.98, 0.995, 0.998: 14 of 15 intervals covered (the miss at 3.7e-7),
    all flagged reliable, estimate / exact from 0.72 to 1.18."""
    sharpness = 8.0
    model = build_circuit(sharpness, block_size=T)
    exact = exact_error_prob(sharpness, T, p_i)
    target = FFL.from_p_i(p_i)
    built = glitch_proposal(model, target, _decoy_glitches(sharpness, 5), T)
    assert built.scored > 0 and max(built.contributions) > 0
    r = estimate(model, target, budget=8000, seed=1, proposal=built.family, progress=False)
    assert r.reliable, r.warning
    assert exact / 1.5 < r.estimate < 1.5 * exact, (exact, r)
    assert r.ci_low <= exact <= r.ci_high, (exact, r)
    assert "planted glitch pattern" in r.method


def test_shrink_finds_the_smaller_patterns_that_still_fail():
    model = build_circuit(8.0, block_size=T)
    target = FFL.from_p_i(0.995)
    found = from_glitches(target, _decoy_glitches(8.0, 2), T)
    start = min(found, key=lambda p: len(p.pattern))
    new, scored = shrink(model, [start], per_test=64)
    assert scored > 0 and new and not {p.key for p in new} & {start.key}
    smallest = min(new, key=lambda p: len(p.pattern))
    assert len(smallest.pattern) < min(len(p.pattern) for p in found)
    rows = smallest.sample(256, T, seed=0)
    assert bool(score_rows(model, rows).any_error.any())  # it still fails, in random context


def test_cli_plant_on_the_circuit_and_bad_glitch_files(tmp_path, capsys):
    ckpt = tmp_path / "circuit.pt"
    save_circuit(ckpt, 8.0, block_size=T)
    out_dir = tmp_path / "glitches"
    out_dir.mkdir()
    rows = [{"text": t, "minimized": {"text": t}} for t in _decoy_glitches(8.0, 5)]
    (out_dir / "glitches.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run_cli(
        capsys, "estimate", str(ckpt), "--p-i", "0.998", "--plant", str(out_dir), "--budget", "8000",
        "--seed", "2", "--json",
    )  # fmt: skip
    assert code == 0, err
    d = json.loads(out)
    exact = exact_error_prob(8.0, T, 0.998)
    assert d["reliable"] and d["ci_low"] <= exact <= d["ci_high"], (exact, d)
    # Two named budgets, each kept: --budget for the estimate (its progress bar ends at it),
    # --plant-budget (100,000) for shrinking and weighing the patterns, counted apart.
    bar = err.replace("\r", "\n").strip().splitlines()[-1]
    assert d["scored"] == 8000 and "8000/8000" in bar, err[-2000:]
    built = re.search(r"planted patterns \(([\d,]+) sequences scored\)", err)
    assert built and 8000 < d["proposal_scored"] == int(built.group(1).replace(",", "")) <= 100_000
    assert "planted glitch pattern" in d["method"]
    code, out, err = run_cli(
        capsys, "estimate", str(ckpt), "--p-i", "0.998", "--plant", str(out_dir), "--budget", "2000",
        "--plant-budget", "6000", "--seed", "2", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    scored = re.search(r"([\d,]+) sequences scored, .*; and ([\d,]+) before, to build the proposal", out)
    assert scored and scored.group(1) == "2,000" and int(scored.group(2).replace(",", "")) <= 6000, out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n')
    for args, words in (
        (["--plant", str(tmp_path / "none.jsonl")], "cannot read glitches"),
        (["--plant", str(bad)], "bad.jsonl:1"),
        (["--plant", str(out_dir), "--method", "mc"], "--method is"),
        (["--plant", str(out_dir), "--shrink", "-1"], "--shrink"),
        (
            ["--plant", str(out_dir), "--plant-budget", "4000"],
            "takes 5,120 sequences, more than --plant-budget 4,000",
        ),
    ):
        code, out, err = run_cli(capsys, "estimate", str(ckpt), "--no-progress", *args)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (args, err)


def test_plant_refuses_another_models_glitches_unless_forced(tmp_path, capsys):
    """A find-glitches folder records the model's digest and length: planting it into another
    model, or at another length, is refused in one line (the library names force=True, the
    CLI --force), and forced, it goes ahead with a warning."""
    from ffinterp.analysis.glitches import find_glitches
    from ffinterp.analysis.patterns import read_glitches

    found_on = build_circuit(2.0, block_size=T)
    g = tmp_path / "g"
    find_glitches(found_on, "random", 256, seq_len=T, out=g, max_glitches=3, diagnose=False, device="cpu")
    assert read_glitches(g, model=found_on) == read_glitches(g)  # its own model: no complaint
    other = build_circuit(8.0, block_size=T)
    with pytest.raises(FFInterpError, match=r"found on another model .*; pass force=True to plant them"):
        read_glitches(g, model=other)
    assert read_glitches(g / "glitches.jsonl", model=other, force=True) == read_glitches(g)
    with pytest.raises(FFInterpError, match=f"found at seq_len {T}, not {T // 2}; pass force=True"):
        read_glitches(g, model=found_on, seq_len=T // 2)
    ckpt = tmp_path / "other.pt"
    save_circuit(ckpt, 8.0, block_size=T)
    base = ["estimate", str(ckpt), "--p-i", "0.99", "--plant", str(g), "--budget", "8000", "--no-progress"]
    code, out, err = run_cli(capsys, *base)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "found on another model" in err and "pass --force to plant them anyway" in err
    code, out, err = run_cli(capsys, *base, "--force", "--shrink", "0")
    assert code == 0 and "warning: planting another model's patterns" in err, err
    assert "8,000 sequences scored" in out


# Minimal glitches of glitchy-128, found by
#   ffinterp find-glitches pretrained:glitchy-128 --budget 20000 --max-glitches 20 --no-diagnose
# (4 of the smallest: 8 and 9 active instructions); the inputs of the estimate, not its answer.
GLITCHY_128 = [
    "w1i0i0i0i0i0i0i0i0i0i0i0i0i0w1w1w1w1w1i0i0i0i0i0i0i0w0r0",
    "w0i0i0i0i0i0i0i0i0i0i0i0i0i0i0i0i0i0i0i0i0i0i0w1w0w0w1w1i0i0i0i0i0i0i0i0i0i0i0i0i0i0w0r0",
    "w1i0i0i0i0i0i0i0i0i0w1i0i0w0w1w0w0w1i0i0i0i0i0i0i1i1w1r1",
    "w0w1w1w1w1w1w1i0w0r0",
]


def test_a_model_with_no_sparse_errors_gets_a_finite_estimate_below_the_bound():
    """glitchy-128 makes 0 errors in 259,279 sparse reads (bound 1.4e-5 per read); planted
    patterns from its glitches give a finite estimate far below that. Measured by
    benchmarks/estimate.py (20 glitches, 30,000 sequences): 4.1e-13 [2.8e-13, 5.3e-13] per read."""
    bound = entry("glitchy-128")["eval"]["sparse"]["ci_high"]
    kw = dict(device="cpu")
    model, _ = _as_model("pretrained:glitchy-128")
    target = FFL.from_p_i(0.98)
    built = glitch_proposal(model, target, GLITCHY_128, 128, top=1, **kw)
    r = estimate(model, target, budget=6000, seed=0, proposal=built.family, progress=False, **kw)
    assert r.hits > 0 and math.isfinite(r.per_read)
    assert 0 < r.per_read < bound / 1000, (bound, r)
