"""The distribution adversary on the hand-built circuit (T=32): it finds a piecewise FFL
distribution under which the circuit errs far more often than under any FFL(p_i) of a grid,
re-measures it on a fresh sample, is a pure function of its seed, and works as a
find-glitches strategy whose glitches are real."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from ffinterp.analysis.adversary import default_family, maximize
from ffinterp.analysis.families import FFL, Piecewise
from ffinterp.analysis.glitches import find_glitches
from ffinterp.analysis.tail import estimate
from ffinterp.language import from_text, validate
from ffinterp.models.constructed import build_circuit, circuit_model, closed_form_predictions, save_circuit

T = 32
SHARPNESS = 8.0


@pytest.fixture(scope="module")
def circuit():
    return build_circuit(SHARPNESS, block_size=T)


@pytest.fixture(scope="module")
def found(circuit):
    return maximize(
        circuit, seq_len=T, budget=6000, per_eval=32, confirm=2000, seed=0, device="cpu", progress=False
    )


def test_it_beats_every_ffl_of_a_grid_by_a_wide_margin(circuit, found):
    # The grid: plain sampling of FFL(p_i), 2,000 sequences each (P[error] peaks near p_i=0.3
    # at ~1e-2 by exact enumeration).
    grid = [
        estimate(circuit, FFL.from_p_i(p), budget=2000, seed=1, method="mc", device="cpu", progress=False)
        for p in (0.1, 0.3, 0.5, 0.8, 0.98)
    ]
    assert max(g.estimate for g in grid) < 0.03
    assert found.sequence_ci_low > 3 * max(g.ci_high for g in grid), (found, [g.estimate for g in grid])
    # the budget is the total: whole generations of the 4,000 left, then the 2,000 to confirm
    assert found.sequences == 2000 and 4000 - 12 * 32 < found.search_scored <= 4000
    assert found.scored == found.search_scored + 2000 <= found.budget == 6000
    assert found.search_scored == found.trace["scored"][-1]
    # The reported rate is the fresh sample's, with its exact interval.
    assert found.read_ci_low <= found.read_rate <= found.read_ci_high
    assert found.read_errors / found.reads == found.read_rate
    # The trace climbs: its best rate never falls and ends where it began or higher.
    rates = found.trace["best_objective"]
    assert all(b >= a for a, b in zip(rates, rates[1:])) and rates[-1] > rates[0]


def test_the_distribution_is_a_family_member_that_reproduces_its_rate(circuit, found):
    fam = default_family().from_vector(np.asarray(found.vector))
    assert isinstance(fam, Piecewise) and str(fam) == found.distribution
    # An independent sample from the reported distribution errs at a compatible rate.
    again = estimate(circuit, fam, budget=2000, seed=7, method="mc", device="cpu", progress=False)
    assert again.ci_low <= found.sequence_ci_high and found.sequence_ci_low <= again.ci_high
    for row in fam.sample(50, T, seed=3):
        validate(row)


def test_same_seed_same_result_and_numpy_state_untouched(circuit, found):
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    again = maximize(
        circuit, seq_len=T, budget=6000, per_eval=32, confirm=2000, seed=0, device="cpu", progress=False
    )
    assert (np.random.get_state()[1] == before).all()
    a, b = found.to_dict(), again.to_dict()
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    other = maximize(
        circuit, seq_len=T, budget=1000, per_eval=32, confirm=200, seed=1, device="cpu", progress=False
    )
    assert other.distribution != found.distribution


def test_find_glitches_strategy_reports_real_glitches_and_the_distribution(tmp_path):
    model = circuit_model(SHARPNESS, block_size=T)
    report = find_glitches(
        model, "distribution", 2000, seq_len=T, batch_size=64, device="cpu", out=tmp_path,
        max_glitches=20, minimize=False, diagnose=False, progress=False,
    )  # fmt: skip
    assert len(report) > 0
    params = model.fast.circuit
    for g in report:  # every glitch is an error of the circuit's closed form
        pred = closed_form_predictions(from_text(g["text"]), params)[0, g["read_pos"]]
        assert pred != "01".index(g["expected"]) + 3
        assert g["strategy"] == "distribution"
        assert "distribution" in g["origin"] or g["origin"].get("confirm")
    summary = json.loads((tmp_path / "summary.json").read_text())
    findings = summary["strategies"]["distribution"]["findings"]
    assert findings and findings[0]["distribution"].startswith("Piecewise(")
    rebuilt = Piecewise(**findings[0]["parameters"])  # the exact family, back from the JSON
    assert str(rebuilt) == findings[0]["distribution"] and rebuilt.ones is not None


def test_cli_maximize_json_and_bad_flags(tmp_path, capsys):
    from ffinterp.cli import main

    ckpt = tmp_path / "circuit.pt"
    save_circuit(ckpt, SHARPNESS, block_size=T)

    def run(*args):
        with pytest.raises(SystemExit) as e:
            main(["estimate", str(ckpt), *args, "--no-progress"])
        out = capsys.readouterr()
        return int(e.value.code or 0), out.out, out.err

    code, out, err = run("--maximize", "--budget", "600", "--per-eval", "20", "--confirm", "300", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["sequences"] == 300 and d["distribution"].startswith("Piecewise(") and d["seq_len"] == T
    assert d["read_ci_low"] <= d["read_rate"] <= d["read_ci_high"]
    assert d["scored"] == d["search_scored"] + 300 <= 600 and len(d["segments"]) == 4
    code, out, err = run("--maximize", "--budget", "100", "--per-eval", "500")
    assert code == 2 and "--per-eval" in err and "Traceback" not in err
    code, out, err = run("--maximize", "--budget", "100", "--per-eval", "30", "--confirm", "80")
    need = "--budget 100 must be >= --confirm + --per-eval (80 + 30): the search needs at least one"
    assert code == 2 and need in err, err


def test_cli_maximize_prints_a_labelled_distribution_and_the_count_its_bar_shows(tmp_path, capsys):
    """What --maximize prints: each segment's token range and p_w, p_r, p_i by name, and one
    count of sequences, the one its progress bar ends at, within --budget."""
    from ffinterp.cli import main

    ckpt = tmp_path / "circuit.pt"
    save_circuit(ckpt, SHARPNESS, block_size=T)
    with pytest.raises(SystemExit) as e:
        main(
            ["estimate", str(ckpt), "--maximize", "--budget", "1000", "--per-eval", "30", "--confirm", "300"]
        )
    out, err = capsys.readouterr()
    assert e.value.code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("most damaging distribution (piecewise FFL")
    assert lines[1].split() == ["segment", "positions", "p_w", "p_r", "p_i", "P(write", "1)"]
    assert [row.split()[:2] for row in lines[2:6]] == [
        ["0", "0-9"],
        ["1", "10-15"],
        ["2", "16-23"],
        ["3", "24-31"],
    ]
    for row in lines[2:6]:
        assert sum(float(x) for x in row.split()[2:5]) == pytest.approx(1, abs=2e-3)
    assert "Piecewise([" not in out
    scored = int(re.search(r"([\d,]+) sequences scored", out).group(1).replace(",", ""))
    assert 1000 - 12 * 30 < scored <= 1000  # whole generations (11 candidates) of 30-sequence samples
    assert (
        f"{scored:,} sequences scored of a budget of 1,000: {scored - 300:,} in the search, 300 to confirm"
        in out
    )
    bar = err.replace("\r", "\n").strip().splitlines()[-1]
    assert f"{scored}/{scored}" in bar, bar
