"""The glitch finder on tiny models at T=64: real errors only, valid candidates, resume,
determinism, registry extension, the report and the CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch

from ffinterp.analysis import glitches as gl
from ffinterp.analysis.glitches import GlitchFinder, find_glitches, read_jsonl
from ffinterp.analysis.minimize import minimize
from ffinterp.analysis.search import (
    STRATEGIES,
    SearchContext,
    Strategy,
    assemble,
    get_strategy,
    register,
)
from ffinterp.checkpoints import save_checkpoint
from ffinterp.errors import FFInterpError
from ffinterp.hooked import FFLModel
from ffinterp.language import I, from_text, reads, validate
from ffinterp.models.gpt import GPT, GPTConfig
from ffinterp.scoring import score_tokens

T = 64


def tiny_gpt(seed: int = 0) -> GPT:
    """An untrained tiny GPT: it errs often, so every test finds glitches in a few batches."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=T)).eval()


@pytest.fixture(scope="module")
def ffl() -> FFLModel:
    return FFLModel.from_fast(tiny_gpt(), device="cpu")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("glitch-model") / "ckpt.pt"
    save_checkpoint(path, tiny_gpt())
    return str(path)


def keys(path) -> list[tuple[str, int]]:
    return [(g["text"], g["read_pos"]) for g in read_jsonl(path)]


FAST = dict(seq_len=T, batch_size=64, device="cpu", diagnose=False)


@pytest.mark.parametrize("name", ["random", "families", "evolve", "gradient"])
def test_strategies_emit_only_valid_sequences_of_the_models_length(name):
    seen = []
    ctx = SearchContext(
        tiny_gpt(1),
        T,
        seed=3,
        budget=200,
        batch_size=32,
        strategy=name,
        check=False,  # the test checks the grammar itself, not the context's guard
        on_scored=lambda sc, origins, record: seen.append(sc.tokens),
    )
    strategy = get_strategy(name)
    unit = 0
    while not ctx.done and unit < 50:
        try:
            strategy.run(ctx, unit)
        except gl.BudgetSpent:
            break
        unit += 1
    tokens = torch.cat(seen)
    assert ctx.scored >= len(tokens) > 0 and tokens.shape[1] == T
    for row in tokens:
        validate(row)


def test_families_cover_every_family_early():
    from ffinterp.analysis.search import FAMILIES, family_grid

    grid = family_grid(tuple(FAMILIES))
    assert {f for f, _ in grid[: len(FAMILIES)]} == set(FAMILIES)


def test_every_jsonl_line_is_a_real_error_on_both_views(ffl, tmp_path):
    report = find_glitches(
        ffl, "random", 256, seed=0, out=tmp_path, max_glitches=6, **{**FAST, "diagnose": True}
    )
    lines = read_jsonl(tmp_path / "glitches.jsonl")
    assert len(lines) == len(report) == 6
    for g in lines:
        tokens = from_text(g["text"])
        validate(tokens)
        for view in (ffl.predict_reads(tokens), score_tokens(ffl.fast, tokens)):
            k = int((view.reads.pos == g["read_pos"]).nonzero()[0])
            assert bool(view.error[k]), g
            assert abs(float(view.margin[k]) - g["margin"]) < 1e-3
        mini = g["minimized"]
        mt = from_text(mini["text"])
        validate(mt)
        s = ffl.predict_reads(mt)
        k = int((s.reads.pos == mini["read_pos"]).nonzero()[0])
        assert bool(s.error[k]) and mini["verified"]
        assert mini["length"] <= T and mini["active"] <= g["writes"] + 2
        d = g["diagnosis"]
        assert d["label"] in ("dilution", "wrong write", "start drift", "other")
        assert isinstance(d["causal"]["force_carrier"]["fixes_read"], bool) and d["read_heads"]
        clean_out = d["causal"]["clean_output"]
        if clean_out.get("applicable"):  # a counterpart the model gets wrong is never applicable
            assert clean_out["clean_margin"] > 0 and clean_out["clean_logit_diff"] > 0
        else:
            assert "top_sites" not in clean_out and "fixes_read" not in clean_out
    # the report object and its three forms
    assert "<table" in report._repr_html_()
    assert report.plot().data
    assert report.to_jsonl().count("\n") == len(report)
    html = (tmp_path / "report.html").read_text()
    assert not re.search(r"<script[^>]*\ssrc=", html)  # offline: plotly.js is inlined, not fetched
    assert "Plotly.newPlot" in html and len(html) > 1_000_000
    assert "How to read the table" in html and "forced fixes" in html  # the legend
    summary = json.loads((tmp_path / "summary.json").read_text())
    circuit = summary["read_heads"]["circuit"]  # the heads named once, by patching, with the circuit
    assert circuit["summary"] and "The read circuit (path patching)" in html
    assert all(line in html for line in circuit["summary"][:1])
    assert summary["glitches"] == 6 and summary["disagreements"] == 0


def test_minimize_keeps_the_glitch_and_shrinks_it():
    model = tiny_gpt()
    from ffinterp.language import sample

    tokens = sample(64, T, 0.5, seed=1)
    sc = score_tokens(model, tokens)
    k = int(sc.error.nonzero()[0])
    row, pos = int(sc.reads.batch[k]), int(sc.reads.pos[k])
    for shorten in (False, True):
        m = minimize(model, tokens[row], pos, shorten=shorten)
        mt = from_text(m.text)
        validate(mt)
        assert m.margin < 0 and m.active <= int((tokens[row, 0::2] != I).sum())
        assert (len(mt) == T) != shorten and m.read_pos <= pos
        rd = reads(mt[None])
        assert m.read_pos in rd.pos.tolist()


def test_same_seed_same_glitches_other_seed_other_glitches(ffl):
    a = find_glitches(ffl, "families", 192, seed=5, max_glitches=5, minimize=False, **FAST)
    b = find_glitches(ffl, "families", 192, seed=5, max_glitches=5, minimize=False, **FAST)
    c = find_glitches(ffl, "families", 192, seed=6, max_glitches=5, minimize=False, **FAST)
    key = lambda r: [(g["text"], g["read_pos"], g["margin"]) for g in r]  # noqa: E731
    assert key(a) == key(b) and len(a) == 5
    assert key(a) != key(c)


def test_registry_extension_is_a_small_frozen_record(ffl):
    @register
    @dataclass(frozen=True)
    class AllIgnores(Strategy):
        name: ClassVar[str] = "test-all-ignores"
        bit: int = 0

        def run(self, ctx: SearchContext, unit: int) -> None:
            rng = ctx.rng(unit)
            instr = np.full((ctx.batch_size, ctx.seq_len // 2), I)
            instr[:, rng.integers(1, ctx.seq_len // 2 - 1, ctx.batch_size)] = 1  # one read each
            ctx.score(assemble(instr, np.full(instr.shape, self.bit)), origin={"unit": unit})

    try:
        report = find_glitches(ffl, "test-all-ignores", 128, seed=0, max_glitches=3, minimize=False, **FAST)
        assert report.summary["strategies"]["test-all-ignores"]["params"] == {
            "name": "test-all-ignores",
            "bit": 0,
        }
        assert all(g["strategy"] == "test-all-ignores" for g in report)
        report2 = find_glitches(ffl, AllIgnores(bit=1), 64, max_glitches=1, minimize=False, **FAST)
        assert report2.summary["strategies"]["test-all-ignores"]["params"]["bit"] == 1
    finally:
        STRATEGIES.pop("test-all-ignores")
    with pytest.raises(FFInterpError, match="unknown strategy"):
        get_strategy("test-all-ignores")


def test_resume_after_a_crash_mid_unit_loses_and_duplicates_nothing(ffl, tmp_path, monkeypatch):
    opts = dict(strategy="random", budget=512, seed=2, max_glitches=12, minimize=False, **FAST)
    full = find_glitches(ffl, out=tmp_path / "full", **opts)
    assert len(full) == 12

    calls = {"n": 0}
    original = GlitchFinder._append

    def crash_after_five(self, record):
        if calls["n"] == 5:
            raise KeyboardInterrupt  # "killed" after five lines, mid-unit
        calls["n"] += 1
        original(self, record)

    monkeypatch.setattr(GlitchFinder, "_append", crash_after_five)
    with pytest.raises(KeyboardInterrupt):
        find_glitches(ffl, out=tmp_path / "run", **opts)
    monkeypatch.setattr(GlitchFinder, "_append", original)
    jsonl = tmp_path / "run" / "glitches.jsonl"
    assert len(read_jsonl(jsonl)) == 5
    with open(jsonl, "a") as f:  # a kill in the middle of a write leaves a torn line
        f.write('{"text": "w0i1')
    with pytest.raises(FFInterpError, match="pass resume=True to continue it"):
        find_glitches(ffl, out=tmp_path / "run", **opts)
    resumed = find_glitches(ffl, out=tmp_path / "run", resume=True, **opts)
    assert keys(jsonl) == keys(tmp_path / "full" / "glitches.jsonl")
    assert len(set(keys(jsonl))) == len(resumed) == 12
    with pytest.raises(FFInterpError, match="differs in seed"):
        find_glitches(ffl, out=tmp_path / "run", resume=True, **{**opts, "seed": 3})


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ffinterp", *args], capture_output=True, text=True, **kw)


def test_cli_sigkill_then_resume_writes_the_three_files(ckpt, tmp_path):
    out = tmp_path / "g"
    args = [
        "find-glitches",
        ckpt,
        "--strategy",
        "random",
        "--budget",
        "512",
        "--seed",
        "4",
        "--seq-len",
        "64",
    ]
    args += ["--max-glitches", "8", "--batch-size", "64", "--device", "cpu", "--out", str(out), "--quiet"]
    args += ["--no-diagnose"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ffinterp", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    jsonl = out / "glitches.jsonl"
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        if jsonl.exists() and jsonl.read_text().count("\n") >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    killed = proc.returncode == -signal.SIGKILL
    done = run_cli(*args, "--resume")
    assert done.returncode == 0, done.stderr
    assert "verified glitches" in done.stdout
    for name in ("glitches.jsonl", "summary.json", "report.html"):
        assert (out / name).stat().st_size > 0
    expected = find_glitches(
        ckpt, "random", 512, seed=4, seq_len=64, max_glitches=8, batch_size=64, device="cpu", diagnose=False
    )
    assert keys(jsonl) == [(g["text"], g["read_pos"]) for g in expected]
    assert killed or len(expected) == 8  # (a very fast machine may finish before the kill)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--strategy", "nope"], "--strategy"),
        (["--budget", "0"], "--budget"),
        (["--device", "tpu"], "--device"),
        (["--seq-len", "63"], "--seq-len"),
        (["--seq-len", "128"], "block size"),  # found only once the model is loaded
        (["--resume"], "cannot resume"),
    ],
)
def test_cli_bad_options_in_process(ckpt, tmp_path, capsys, args, needle):
    from ffinterp.cli import main

    out = tmp_path / "o"
    if "--resume" in args:  # a folder written by another search (another seed)
        find_glitches(ckpt, "random", 64, seed=9, out=out, max_glitches=1, minimize=False, **FAST)
    extra = args if "--seq-len" in args else [*args, "--seq-len", "64"]
    with pytest.raises(SystemExit) as e:
        main(["find-glitches", ckpt, "--out", str(out), "--quiet", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_errors_name_python_arguments_and_the_cli_says_the_flags(ckpt, tmp_path, capsys):
    """The library names what a caller passes (resume=True, out=, seq_len); the CLI, for the
    same mistake, names its flags."""
    from ffinterp.cli import main

    out = tmp_path / "g"
    find_glitches(ckpt, "random", 64, seed=9, out=out, max_glitches=1, minimize=False, **FAST)
    with pytest.raises(FFInterpError) as e:
        find_glitches(ckpt, "random", 64, seed=9, out=out, max_glitches=1, minimize=False, **FAST)
    said = str(e.value)
    assert (
        said == f"{out} already holds a glitch search; pass resume=True to continue it or choose another out="
    )
    with pytest.raises(FFInterpError, match=r"^seq_len 128 exceeds the model's block size 64$"):
        find_glitches(ckpt, "random", 64, **{**FAST, "seq_len": 128})
    for args, line in (
        ([], f"{out} already holds a glitch search; pass --resume to continue it or choose another --out"),
        (["--seq-len", "128"], "--seq-len 128 exceeds the model's block size 64"),
    ):
        with pytest.raises(SystemExit) as e:
            main(["find-glitches", ckpt, "--out", str(out), "--quiet", "--seq-len", "64", *args])
        assert e.value.code == 2
        assert capsys.readouterr().err == f"ffinterp: error: {line}\n"


def test_a_search_stopped_by_max_glitches_closes_its_bar_as_finished(ckpt, capsys):
    report = find_glitches(ckpt, "random", 20_000, max_glitches=2, minimize=False, progress=True, **FAST)
    assert len(report) == 2 and report.summary["scored"] < 20_000
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    done = report.summary["scored"]
    assert "100%" in last and f"{done}/{done}" in last and "stopped: found the 2 glitches asked for" in last
    assert "?" not in last.split("[")[-1].split(",")[0]  # no time left to count down


def test_the_report_shows_its_table_outside_jupyter(ffl):
    report = find_glitches(ffl, "random", 128, max_glitches=3, minimize=False, **FAST)
    shown = repr(report).splitlines()
    scored = report.summary["scored"]
    assert shown[0].startswith(f"GlitchReport({len(report)} glitches in {scored} sequences scored")
    assert shown[1].split()[:3] == ["#", "strategy", "read"] and len(shown) >= 2 + len(report)
    assert str(report) == repr(report)
    one = find_glitches(ffl, "random", 128, max_glitches=1, minimize=False, **FAST)
    assert repr(one).startswith("GlitchReport(1 glitch in 64 sequences scored")


def test_ground_truth_on_the_hand_built_circuit_at_low_sharpness():
    """Every glitch found lies in the closed-form region, every structured decoy case the
    closed form says fails is found, and the diagnosis names the dilution it is."""
    from ffinterp.analysis.search import Families, family_grid
    from ffinterp.models.constructed import circuit_model, closed_form_predictions, predicted_error

    rho = 8.0  # well below min_exact_sharpness(64) = 21.5: glitches exist
    circuit = circuit_model(rho, block_size=T)
    params = circuit.fast.circuit
    fam = Families(families=("decoys",))
    n_points = len(family_grid(fam.families))
    report = find_glitches(
        circuit,
        fam,
        16 * n_points,
        batch_size=16,
        max_glitches=10**6,
        minimize=False,
        **{k: v for k, v in FAST.items() if k != "batch_size"},
    )
    assert len(report) > 0
    for g in report:
        pred = closed_form_predictions(from_text(g["text"]), params)[0, g["read_pos"]]
        assert pred != "01".index(g["expected"]) + 3, g["text"]
    found = {tuple(sorted(g["origin"].items())) for g in report if g["origin"]["family"] == "decoys"}
    s = T // 2
    for _, p in family_grid(("decoys",)):
        gap = 2 * max(1, min(s - 3, round(p["gap_frac"] * (s - 1))))
        k = min(p["n_decoys"], s - 1 - gap // 2 - 1)
        if p["near"] and predicted_error(gap, k + 1, rho):  # the packed probe of this cell fails
            assert any(dict(f)["n_decoys"] == p["n_decoys"] and dict(f)["gap_frac"] == p["gap_frac"]
                       and dict(f)["near"] == 1 for f in found), p  # fmt: skip

    small = find_glitches(circuit, "evolve", 2000, seed=1, max_glitches=1, seq_len=T, device="cpu")
    assert len(small) == 1
    for g in small:
        mini = g["minimized"]
        pred = closed_form_predictions(from_text(mini["text"]), params)[0, mini["read_pos"]]
        assert pred != "01".index(g["expected"]) + 3
        assert g["diagnosis"]["read_heads"][0]["head"] == "L1H0"
        causal = g["diagnosis"]["causal"]
        assert g["diagnosis"]["carrier"] == "bit"  # the circuit's read head reads the bit itself
        assert g["diagnosis"]["label"] == "dilution" and causal["force_carrier"]["fixes_read"]
        assert causal["clean_output"]["fixes_read"]  # the clean run's read-head output fixes it too


def _head(name: str, label: str, mass: float, typical: float = 0.9) -> dict:
    return {
        "head": name,
        "mode": {"label": label},
        "last_write_mass": mass,
        "typical_last_write_mass": typical,
    }


def test_the_glitch_is_put_down_to_the_abnormal_read_head_that_fixes_it() -> None:
    from ffinterp.analysis.diagnose import blamed_head

    normal, diluted = _head("L1H2", "other", 0.99), _head("L0H1", "dilution", 0.25, typical=0.75)
    wrong = _head("L0H3", "wrong write", 0.4)
    # a normal-looking first head does not hide the diluted one
    assert blamed_head([normal, diluted], {})["head"] == "L0H1"
    # among abnormal heads, the one whose own fix restores the read wins over a larger drop
    fixes = {"L0H1": {"fixes_read": True}, "L0H3": {"fixes_read": False}}
    assert blamed_head([normal, wrong, diluted], fixes)["head"] == "L0H1"
    assert blamed_head([normal, wrong, diluted], {})["head"] == "L0H3"  # largest drop
    assert blamed_head([normal, _head("L1H0", "other", 0.5)], {})["head"] == "L1H2"  # all normal: first
    # forcing is the causal test: a normal-looking head whose forcing fixes the read beats an
    # abnormal one whose forcing does not
    assert blamed_head([diluted, normal], {"L1H2": {"fixes_read": True}})["head"] == "L1H2"


def test_failure_mode_judges_each_write_by_its_carrier() -> None:
    from ffinterp.analysis.diagnose import failure_mode

    tokens = from_text("w1i0w0i1w1i0i0r1")  # writes at 0, 4 (opposite bit) and 8; read at 14
    row = torch.zeros(16)
    row[[10, 6]] = torch.tensor([0.4, 0.6])  # carrier +2 of the last write, and of the decoy
    wrong = failure_mode(row, tokens, 14, typical=0.8, low=0.1, carrier=2)
    assert wrong["label"] == "wrong write" and wrong["write_pos"] == 4 and not wrong["same_bit"]
    row[[10, 6]] = torch.tensor([0.95, 0.05])
    assert failure_mode(row, tokens, 14, typical=0.8, low=0.1, carrier=2)["label"] == "other"
    assert failure_mode(row, tokens, 14, typical=0.99, low=0.97, carrier=2)["label"] == "dilution"
    row[[10, 6]] = torch.tensor([0.0, 0.0])
    row[8] = 1.0  # all on the last write's w token: for a carrier +2 head that is a miss
    assert failure_mode(row, tokens, 14, typical=0.8, low=0.1, carrier=2)["label"] == "dilution"
    assert failure_mode(row, tokens, 14, typical=0.8, low=0.1, carrier=0)["label"] == "other"


def patch_hook(clean_act, head):
    """Replace the activation with the clean one (one head's slice of ``hook_z``, or all)."""

    def put(act, hook):
        if head is None:
            return clean_act
        act[:, :, head] = clean_act[:, :, head]
        return act

    return put


def test_best_clean_patch_is_what_patching_that_component_alone_gives(ffl):
    """The diagnosis names the heads and MLPs whose clean-counterpart output best repairs the
    read; redo the top one by hand with a TransformerLens hook and get the same logit diff."""
    from ffinterp.analysis.diagnose import clean_counterpart

    report = find_glitches(ffl, "random", 256, seed=1, max_glitches=4, **{**FAST, "diagnose": True})
    checked = 0
    for g in report:
        clean_out = g["diagnosis"]["causal"]["clean_output"]
        if not clean_out.get("applicable"):
            continue
        top = clean_out["top_sites"]
        assert [s["logit_diff"] for s in top] == sorted((s["logit_diff"] for s in top), reverse=True)
        tokens = from_text(g["text"])
        clean = clean_counterpart(tokens, g["read_pos"])
        m = re.fullmatch(r"L(\d+)H(\d+)|MLP(\d+)", top[0]["site"])
        name = f"blocks.{m[1]}.attn.hook_z" if m[1] else f"blocks.{m[3]}.hook_mlp_out"
        _, cache = ffl.hooked.run_with_cache(clean[None], names_filter=[name])
        put = patch_hook(cache[name], int(m[2]) if m[1] else None)
        with torch.no_grad():
            logits = ffl.hooked.run_with_hooks(tokens[None], fwd_hooks=[(name, put)])[0, g["read_pos"]]
        bit = 3 + int(g["expected"])  # token id of the correct bit
        assert abs(float(logits[bit] - logits[7 - bit]) - top[0]["logit_diff"]) < 1e-3, (g["id"], top)
        checked += 1
        shown = f"{top[0]['site']} {top[0]['logit_diff']:+.2f}"  # as the table and report show it
        assert shown in report.table(len(report)) and shown in report._repr_html_()
    assert checked


def test_a_clean_counterpart_the_model_gets_wrong_is_not_applicable():
    """A model that answers every read with the wrong bit (the circuit with its unembedding
    negated) gets the clean counterpart wrong too: the clean patch is marked not applicable,
    says why, and never feeds the best clean patch."""
    from ffinterp.analysis.diagnose import Diagnoser
    from ffinterp.analysis.report import best_clean_patch
    from ffinterp.models.constructed import build_circuit, decoy_sequence

    gpt = build_circuit(1000.0, block_size=T)
    with torch.no_grad():
        gpt.lm_head.weight.neg_()
    wrong = FFLModel.from_fast(gpt, device="cpu", name="always-wrong")
    tokens, read_pos = decoy_sequence(gap=20, n_decoys=3, seq_len=T)
    assert float(wrong.predict_reads(tokens).margin[-1]) < 0
    clean = Diagnoser(wrong, seq_len=T, n_reference=4).patch_clean_output(tokens, read_pos)
    assert not clean["applicable"] and clean["clean_margin"] < 0 and "wrong too" in clean["why"]
    assert "top_sites" not in clean and "fixes_read" not in clean
    assert best_clean_patch({"causal": {"clean_output": clean}}).startswith("n/a")


def test_max_glitches_summary_says_what_it_kept_and_its_best_margin_is_the_tables(ffl, tmp_path):
    report = find_glitches(ffl, "random", 2048, seed=0, out=tmp_path, max_glitches=3, **FAST)
    assert len(report) == 3
    s = report.summary
    assert s["best_margin"] == min(g["margin"] for g in report)
    assert s["best_margin_scored"] <= s["best_margin"]
    assert "first 3 verified glitches" in s["kept"]
    assert f"{s['best_margin']:+.3f}" in report.table()
