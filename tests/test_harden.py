"""harden: find, fix, measure, on the hand-built circuit at T=32.

At sharpness 8 the circuit reads every in-distribution subset here without an error but
fails when earlier writes of the other bit crowd the last one (its closed form), so the
finder's random strategy finds glitches within 1,500 sequences and a 200-step fine-tune
removes them (the read head's recency slope grows).
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys

import pytest
import torch

import ffinterp.harden as harden_module
from ffinterp.checkpoints import load_checkpoint
from ffinterp.errors import FFInterpError
from ffinterp.harden import harden
from ffinterp.models.constructed import save_circuit

T = 32
SHARPNESS = 8.0
SETTINGS = dict(
    rounds=3,
    steps_per_round=200,
    budget=1500,
    seed=0,
    lr=3e-3,
    warmup=5,
    ckpt_every=20,
    eval_n=(200, 200, 100),
    estimate_budget=400,
    target_n=256,
    max_glitches=8,
    patterns=4,
    device="cpu",
)


@pytest.fixture(scope="module")
def circuit_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("circuit") / "circuit.pt"
    save_circuit(path, SHARPNESS, block_size=T)
    return path


@pytest.fixture(scope="module")
def reference(circuit_ckpt, tmp_path_factory):
    """One uninterrupted run, the baseline of the other tests."""
    return harden(circuit_ckpt, tmp_path_factory.mktemp("ref") / "run", **SETTINGS, progress=False, png=False)


def stable(records: list[dict]) -> list[dict]:
    """The records without their timings (all that may differ between equal runs)."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def weights(path) -> dict:
    return load_checkpoint(path).model.state_dict()


def same_weights(a, b) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_round_fixes_the_glitches_the_finder_found_and_the_next_finds_none(reference):
    base, first, second = reference.records  # round 0 is the starting model
    assert [r["round"] for r in reference] == [0, 1, 2]
    # a glitch model: no error on the in-distribution subset, yet the finder finds glitches
    assert base["measure"]["in"]["errors"] == 0 and base["measure"]["in"]["reads"] > 400
    found = first["find"]
    assert found["glitches"] == SETTINGS["max_glitches"] and found["first_at"] is not None
    assert (
        found["first_at"]
        == found["by_strategy"]["distribution"]["scored"]
        + (found["by_strategy"]["random"]["first_glitch_at"])
    )  # strategies run in turn: the distribution adversary first
    # the fine-tune removes the errors on the distributions the glitches came from
    before = sum(t["before"][0] for t in first["targets"])
    after = sum(t["after"][0] for t in first["targets"])
    assert before >= 100 and after <= before // 20, (before, after)
    assert any(t["distribution"].startswith("planted:") for t in first["targets"])
    # ... so the next search finds nothing within the same budget, and the loop stops there
    assert second["find"]["glitches"] == 0 and second["stopped"] and "fix" not in second
    assert reference.stopped.startswith("stopped at round 2")
    # the mixture: FFL(0.8) replay at its stated share, the rest shared by the three groups
    fix = first["fix"]
    assert fix["groups"] == pytest.approx(
        {"replay": 0.5, "adversary": 1 / 6, "planted": 1 / 6, "tails": 1 / 6}
    )
    assert sum(s["share"] for s in fix["sources"]) == pytest.approx(1.0)
    names = [s["source"] for s in fix["sources"]]
    assert names[0] == "FFL(0.8) (replay)" and sum("R4 tail" in n for n in names) == 3
    # the in-distribution subset stays clean, and the tail estimate is recorded either way
    assert first["measure"]["in"]["errors"] == 0
    assert "reliable" in first["measure"]["tail"] or "refused" in first["measure"]["tail"]


def test_outputs_history_weights_table_and_plot(reference):
    out = reference.out
    lines = (out / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == reference.records
    assert same_weights(out / "ckpt.pt", out / "round-001" / "train" / "ckpt.pt")
    assert not same_weights(out / "ckpt.pt", out / "start.pt")
    assert (out / "rounds.html").stat().st_size > 0 and (
        out / "round-001" / "find" / "glitches.jsonl"
    ).exists()
    text = repr(reference)
    assert "mixture shares" in text and "replay 0.50 adversary 0.17 planted 0.17 tails 0.17" in text
    assert "stopped: nothing found" in text
    assert "<table" in reference._repr_html_()
    fig = reference.plot()
    assert fig.layout.yaxis.type == "log"
    traces = {t.name: t for t in fig.data}
    assert {"in", "sparse", "dense", "glitch dists, before", "glitch dists, after"} <= traces.keys()
    assert (
        list(traces["in"].x) == [0, 1]
        and traces["glitch dists, after"].y[0] < traces["glitch dists, before"].y[0]
    )
    settings = json.loads((out / "settings.json").read_text())
    assert settings["seq_len"] == T and settings["replay"] == 0.5


def test_the_same_seed_gives_the_same_run(reference, circuit_ckpt, tmp_path):
    again = harden(circuit_ckpt, tmp_path / "run", **SETTINGS, progress=False, png=False)
    assert stable(again.records) == stable(reference.records)
    assert same_weights(again.out / "ckpt.pt", reference.out / "ckpt.pt")


CHILD = """
import json, os, signal, sys
import torch
torch.set_num_threads(int(sys.argv[3]))
import ffinterp.train as train
from ffinterp.harden import harden

real_loss = train.training_loss

def loss(model, tokens, cfg, step):  # SIGKILL in the middle of round 1's fine-tune (step 50)
    if step == 50:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_loss(model, tokens, cfg, step)

train.training_loss = loss
harden(sys.argv[1], sys.argv[2], progress=False, png=False, **json.loads(sys.argv[4]))
"""


class Stop(BaseException):
    """Stands for a kill inside this process (nothing after it runs, nothing is cleaned up)."""


def test_sigkill_mid_round_then_resume_ends_bit_identical(reference, circuit_ckpt, tmp_path, monkeypatch):
    import ffinterp.analysis.glitches as glitches

    out = tmp_path / "run"
    args = [str(circuit_ckpt), str(out), str(torch.get_num_threads()), json.dumps(SETTINGS)]
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    def rounds_done() -> list[int]:
        return [json.loads(line)["round"] for line in (out / "rounds.jsonl").read_text().splitlines()]

    assert rounds_done() == [0]  # killed inside round 1 ...
    assert load_checkpoint(out / "round-001" / "train" / "ckpt.pt").raw["iter_num"] == 40  # ... after step 40

    # Resume: round 1's fine-tune goes on from step 40; then stop round 2's search after a unit.
    real_save, saves = glitches.GlitchFinder._save_state, []

    def save(self):
        real_save(self)
        saves.append(1)
        if len(saves) == 2:
            raise Stop

    monkeypatch.setattr(glitches.GlitchFinder, "_save_state", save)
    with pytest.raises(Stop):
        harden(circuit_ckpt, out, **SETTINGS, resume=True, progress=False, png=False)
    assert rounds_done() == [0, 1]
    assert (out / "round-002" / "find" / "state.json").exists() and not (
        out / "round-002" / "plan.json"
    ).exists()

    monkeypatch.setattr(glitches.GlitchFinder, "_save_state", real_save)
    calls = {"train": 0}
    real_train = harden_module.train

    def counting(*args, **kwargs):
        calls["train"] += 1
        return real_train(*args, **kwargs)

    monkeypatch.setattr(harden_module, "train", counting)
    resumed = harden(circuit_ckpt, out, **SETTINGS, resume=True, progress=False, png=False)
    assert calls["train"] == 0  # round 1 was finished: not trained again
    assert stable(resumed.records) == stable(reference.records)
    assert same_weights(out / "ckpt.pt", reference.out / "ckpt.pt")
    again = harden(circuit_ckpt, out, **SETTINGS, resume=True, progress=False, png=False)
    assert stable(again.records) == stable(reference.records)  # a finished run resumes to itself


def test_library_refuses_bad_settings_and_foreign_folders(circuit_ckpt, tmp_path):
    with pytest.raises(FFInterpError, match="rounds must be an integer >= 1"):
        harden(circuit_ckpt, tmp_path / "a", **{**SETTINGS, "rounds": 0})
    with pytest.raises(FFInterpError, match="replay must lie in"):
        harden(circuit_ckpt, tmp_path / "a", **{**SETTINGS, "replay": 1.0})
    with pytest.raises(FFInterpError, match="strategies must include 'distribution'"):
        harden(circuit_ckpt, tmp_path / "a", **{**SETTINGS, "strategies": ("random",)})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(FFInterpError, match="folder is not empty; pass resume=True"):
        harden(circuit_ckpt, tmp_path / "full", **SETTINGS)
    with pytest.raises(FFInterpError, match="no harden run"):
        harden(circuit_ckpt, tmp_path / "full", **SETTINGS, resume=True)


# ---------------------------------------------------------------- the CLI


def cli(*args: str, capsys) -> tuple[int, str, str]:
    from ffinterp.cli import main

    with pytest.raises(SystemExit) as e:
        main(["harden", *args])
    got = capsys.readouterr()
    return int(e.value.code or 0), got.out, got.err


def test_cli_runs_prints_its_exact_settings_and_resumes_from_them(circuit_ckpt, tmp_path, capsys):
    out = tmp_path / "cli"
    flags = ["--rounds", "1", "--steps", "20", "--budget", "600", "--lr", "3e-3", "--eval-n", "50,50,20",
             "--estimate-budget", "0", "--max-glitches", "2", "--patterns", "1",
             "--device", "cpu"]  # fmt: skip
    code, stdout, err = cli(
        str(circuit_ckpt), "--out", str(out), *flags, "--quiet", "--no-png", capsys=capsys
    )
    assert code == 0, err
    settings = stdout.splitlines()[0]
    assert settings.startswith("settings: ffinterp harden ")
    for flag in ("--replay 0.5", "--strategies distribution,random,families", "--seq-len 32",
                 "--batch-size 16", "--seed 0", "--eval-n 50,50,20", "--target-n 256",
                 "--device cpu"):  # fmt: skip
        assert flag in settings, flag
    assert "round(s)" in stdout or "stopped at round 1" in stdout
    lines = (out / "rounds.jsonl").read_text()
    assert len(lines.splitlines()) == 2
    # the printed command, with --resume, is the same run: it finds it finished and adds nothing
    argv = shlex.split(settings.removeprefix("settings: "))[2:]
    code, _, err = cli(*argv, "--resume", "--quiet", "--no-png", capsys=capsys)
    assert code == 0, err
    assert (out / "rounds.jsonl").read_text() == lines


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--rounds", "0"], "--rounds must be at least 1, got 0"),
        (["--replay", "1"], "--replay must lie in [0, 1)"),
        (["--strategies", "random"], "--strategies must include distribution"),
        (["--eval-n", "10,20"], "--eval-n expects 3 comma-separated sizes"),
        (["--estimate-budget", "50"], "--estimate-budget must be 0 (skip) or at least 200"),
    ],
)
def test_cli_bad_flags_are_one_line(circuit_ckpt, tmp_path, capsys, args, needle):
    code, _, err = cli(str(circuit_ckpt), "--out", str(tmp_path / "x"), *args, capsys=capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()


def test_cli_bad_checkpoint_and_existing_folder_are_one_line(circuit_ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    code, _, err = cli(str(bad), "--out", str(tmp_path / "x"), capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(bad) in err and "Traceback" not in err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "rounds.jsonl").write_text("")
    code, _, err = cli(str(circuit_ckpt), "--out", str(tmp_path / "used"), capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "pass --resume" in err
    code, _, err = cli(str(tmp_path / "missing.pt"), "--out", str(tmp_path / "y"), capsys=capsys)
    assert code == 2 and "missing.pt" in err and len(err.strip().splitlines()) == 1
