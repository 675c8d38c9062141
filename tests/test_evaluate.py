"""Evaluation: exact Clopper–Pearson intervals, streamed per-sequence counts, the eval CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from ffinterp.checkpoints import save_checkpoint
from ffinterp.cli import main as cli_main
from ffinterp.data import eval_set, write_sequences
from ffinterp.errors import FFInterpError
from ffinterp.evaluate import clopper_pearson, count_errors, evaluate
from ffinterp.language import last_write_pos, read_mask, sample
from ffinterp.models.gpt import GPT, GPTConfig
from ffinterp.models.lstm import LSTM, LSTMConfig
from ffinterp.scoring import score_tokens

T = 64


class Oracle(nn.Module):
    """Predicts the last write's bit everywhere (no parameters), or a fixed token."""

    def __init__(self, always: int | None = None):
        super().__init__()
        self.always = always

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.always is not None:
            target = torch.full_like(idx, self.always)
        else:
            target = idx.gather(1, (last_write_pos(idx) + 1).clamp(0, idx.shape[1] - 1))
        return nn.functional.one_hot(target, 5).float() * 10


@pytest.fixture(scope="module")
def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=T)).eval()


# ---------------------------------------------------------------- Clopper–Pearson


def test_clopper_pearson_known_values():
    lo, hi = clopper_pearson(0, 100)
    assert lo == 0 and hi == pytest.approx(0.0362, abs=5e-5)
    lo, hi = clopper_pearson(5, 100)
    assert lo == pytest.approx(0.0164, abs=5e-5) and hi == pytest.approx(0.1128, abs=5e-5)
    assert clopper_pearson(0, 0) == (0.0, 1.0)
    lo, hi = clopper_pearson(100, 100)
    assert hi == 1 and lo == pytest.approx(1 - 0.0362, abs=5e-5)
    with pytest.raises(FFInterpError, match="errors=3, n=2"):
        clopper_pearson(3, 2)


@pytest.mark.parametrize("n", [1, 7, 30])
def test_clopper_pearson_tails_are_exactly_alpha_over_two(n):
    """The defining property, checked with the binomial sum itself (no beta function)."""

    def cdf(k: int, p: float) -> float:
        return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k + 1))

    for k in range(n + 1):
        lo, hi = clopper_pearson(k, n)
        if k < n:
            assert cdf(k, hi) == pytest.approx(0.025, abs=1e-9)
        if k > 0:
            assert 1 - cdf(k - 1, lo) == pytest.approx(0.025, abs=1e-9)
        assert clopper_pearson(n - k, n) == pytest.approx((1 - hi, 1 - lo), abs=1e-12)


def test_clopper_pearson_at_eval_set_scale():
    """400k reads, as in a full set: still exact (checked by a log-space binomial sum)."""

    def cdf(k: int, n: int, p: float) -> float:
        lg = math.lgamma
        return math.fsum(
            math.exp(lg(n + 1) - lg(j + 1) - lg(n - j + 1) + j * math.log(p) + (n - j) * math.log1p(-p))
            for j in range(k + 1)
        )

    for k, n in [(3, 409_600), (1234, 409_600)]:
        lo, hi = clopper_pearson(k, n)
        assert cdf(k, n, hi) == pytest.approx(0.025, rel=1e-6)
        assert 1 - cdf(k - 1, n, lo) == pytest.approx(0.025, rel=1e-6)


# ---------------------------------------------------------------- counting


def test_count_errors_agrees_with_the_per_read_scorer(tiny):
    tokens = sample(40, T, 0.5, seed=5)
    s = score_tokens(tiny, tokens)
    reads, errors = count_errors(tiny, tokens)
    assert reads.shape == errors.shape == (40,) and not reads.is_floating_point()
    rows = s.reads.batch
    assert reads.tolist() == torch.bincount(rows, minlength=40).tolist()
    assert errors.tolist() == torch.bincount(rows[s.error], minlength=40).tolist()
    assert int(errors.sum()) > 0 and bool((errors < reads).any())  # errs at some reads, not all


def test_perfect_model_reports_upper_bounds_not_zero():
    r = evaluate(Oracle(), ["in", "dense"], n=150, seq_len=T, batch_size=32, progress=False)
    for s in r:
        assert s.errors == 0 and s.reads > 0 and s.seqs_with_error == 0
        # per read, the clustering-proof bound: CP_upper(0 of n sequences) * r_max / rbar
        seq_bound = 1 - 0.025 ** (1 / s.n_seqs)
        assert s.seq_ci_high == pytest.approx(seq_bound) and s.seq_ci_low == 0
        assert s.ci_high == pytest.approx(seq_bound * s.max_seq_reads / (s.reads / s.n_seqs))
        assert s.ci_high > 1 - 0.025 ** (1 / s.reads)  # wider than reads taken as independent
        assert s.line() == (
            f"reads 0 / {s.reads}  (< {s.ci_high:.1e}); "
            f"sequences 0 / {s.n_seqs}  (< {s.seq_ci_high:.1e})  (95% intervals)"
        )
    assert "< " in r.table() and "<table>" in r._repr_html_() and "per sequence" in r.table()
    json.dumps(r.to_dict())


def test_streamed_counts_equal_the_materialised_set():
    """Batches that do not divide n, per-set sizes and lengths; same as scoring it whole."""
    model = Oracle(always=4)  # always says "1": wrong exactly at reads of a 0
    n, seq_len = {"in": 70, "sparse": 45}, {"sparse": 32, "in": T}
    r = evaluate(model, "in,sparse", n=n, seq_len=seq_len, batch_size=16, progress=False)
    for s, (name, n, t) in zip(r, [("in", 70, T), ("sparse", 45, 32)]):
        tokens = eval_set(name, n, t)
        sc = score_tokens(model, tokens)
        assert (s.name, s.n_seqs, s.seq_len) == (name, n, t)
        assert (s.reads, s.errors) == (len(sc), int(sc.error.sum())) and s.errors > 0
        assert s.seqs_with_error == len(set(sc.reads.batch[sc.error].tolist()))
        assert s.max_seq_reads == int(torch.bincount(sc.reads.batch).max())
        assert s.ci_low < s.error_rate < s.ci_high
        assert (s.seq_ci_low, s.seq_ci_high) == pytest.approx(
            clopper_pearson(s.seqs_with_error, n), rel=1e-12
        )
        assert s.seq_ci_low <= s.seq_rate <= s.seq_ci_high
        d = s.to_dict()
        assert d["seq_rate"] == s.seqs_with_error / n and d["seq_ci_high"] == s.seq_ci_high


def test_own_sequences_are_scored_like_a_set(tiny):
    """``sequences=`` gives the counts and intervals the same tokens get as a standard set."""
    tokens = eval_set("sparse", 50, T)
    r = evaluate(tiny, "sparse", n=50, seq_len=T, sequences={"mine": tokens}, progress=False)
    a, b = r["sparse"].to_dict(), r["mine"].to_dict()
    assert b["distribution"] == "own sequences" and a["errors"] > 0
    keep = ("n_seqs", "seq_len", "reads", "errors", "seqs_with_error", "ci_low", "ci_high", "seq_ci_high")
    assert [a[k] for k in keep] == [b[k] for k in keep]
    assert [s.name for s in evaluate(tiny, (), sequences={"mine": tokens}, progress=False)] == ["mine"]
    long = sample(2, 2 * T, 0.8, seed=1)
    broken = tokens.clone()
    broken[3, 0] = 1  # starts with a read
    for kwargs, expected in [
        (dict(sequences={"mine": long}), r"sequences\['mine'\]: 128 tokens per sequence, more than"),
        (dict(sequences={"mine": broken}), r"sequences\['mine'\]: sequence 3: position 0"),
        (dict(sequences={"mine": tokens.float()}), "2-D integer batch"),
        (dict(sequences={"in": tokens}, sets="in"), "'in' is given twice"),
        (dict(sets=()), "no evaluation sets given"),
    ]:
        with pytest.raises(FFInterpError, match=expected):
            evaluate(tiny, **{"sets": (), "progress": False, **kwargs})


def test_gpt_and_lstm_are_evaluated_alike(tiny, tmp_path):
    lstm = LSTM(LSTMConfig(hidden=16)).train()
    r = evaluate(lstm, "dense", n=20, seq_len=T, progress=False)
    assert r["dense"].reads > 0 and lstm.training  # mode restored
    save_checkpoint(tmp_path / "ckpt.pt", tiny)
    r = evaluate(tmp_path / "ckpt.pt", "in", n=20, seq_len=T, progress=False)
    assert r["in"].reads > 0 and "GPT 1 layers" in r.model


def test_bad_arguments_are_one_line_errors(tiny):
    for kwargs, expected in [
        (dict(seq_len=128), "seq_len 128 exceeds the model's block_size 64"),
        (dict(seq_len=63), "seq_len must be an even number"),
        (dict(sets="in,nope"), "unknown evaluation set 'nope'"),
        (dict(n=0), "n must be >= 1"),
        (dict(device="cuda:7" if not torch.cuda.is_available() else "nope"), "device"),
    ]:
        with pytest.raises(FFInterpError, match=expected):
            evaluate(tiny, **{"sets": "in", "n": 4, "seq_len": T, "progress": False, **kwargs})


# ---------------------------------------------------------------- the fast inference path


@pytest.mark.parametrize(
    "cfg",
    [
        dict(),
        dict(bias=False),
        dict(attn_only=True),
        dict(layer_norm=False),
        dict(pos_embedding="sinusoidal", activation="gelu_new", ln_eps=1e-3),
    ],
)
def test_inference_path_gives_the_block_paths_logits(cfg):
    """Eval without autograd takes the blocks' inference path; it must match the training path's forward."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_embd=64, n_head=4, block_size=T, **cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    tokens = sample(6, T, 0.5, seed=2)
    with torch.enable_grad():
        ref = model(tokens).detach()
    with torch.inference_mode():
        fast = model(tokens)
        evens = model(tokens, positions=slice(0, None, 2))
    assert (fast - ref).abs().max() <= 1e-5
    assert (evens - ref[:, ::2]).abs().max() <= 1e-5
    # Logits at the reads alone (the last block queried there only), on sparse rows so that
    # the query-only path runs rather than its full-forward fallback.
    sparse = sample(6, T, 0.9, seed=3)
    mask = read_mask(sparse)
    assert 4 * int(mask.sum(1).max()) <= T
    with torch.enable_grad():
        ref_sparse = model(sparse).detach()
    with torch.inference_mode():
        at_reads = model.logits_at(sparse, mask)
    assert at_reads.shape == (int(mask.sum()), model.cfg.vocab_size)
    assert (at_reads - ref_sparse[mask]).abs().max() <= 1e-5
    seen = []
    handle = model.transformer.h[0].register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():  # a hooked block: the rest of the model keeps its inference path
        assert (model(tokens) - ref).abs().max() <= 1e-5
    handle.remove()
    assert seen


# ---------------------------------------------------------------- CLI


def test_eval_cli_end_to_end(tiny, tmp_path):
    save_checkpoint(tmp_path / "ckpt.pt", tiny)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ffinterp",
            "eval",
            str(tmp_path / "ckpt.pt"),
            "--n",
            "40",
            "--seq-len",
            str(T),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "(per read, 95% CI)" in lines[1] and "(per sequence, 95% CP)" in lines[1]
    for name in ("in", "sparse", "dense"):
        row = next(line for line in lines if line.startswith(name + " "))
        assert row.count(" / ") == 2  # errors / reads, erring sequences / sequences
    assert "take the sequence as the unit" in lines[-1]
    assert "%|" in r.stderr  # the progress bar


def test_eval_cli_json_and_errors(tiny, tmp_path, capsys):
    save_checkpoint(tmp_path / "ckpt.pt", tiny)
    args = ["eval", str(tmp_path / "ckpt.pt"), "--n", "8", "--seq-len", str(T), "--no-progress"]
    with pytest.raises(SystemExit) as e:
        cli_main([*args, "--sets", "dense", "--json"])
    assert e.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["sets"]) == ["dense"] and out["sets"]["dense"]["n_seqs"] == 8
    d = out["sets"]["dense"]
    assert d["seq_ci_low"] <= d["seq_rate"] <= d["seq_ci_high"] and d["seq_rate"] == d["seqs_with_error"] / 8
    for bad in (["--seq-len", "512"], ["--sets", "nope"], ["--n", "0"]):
        with pytest.raises(SystemExit) as e:
            cli_main([*args, *bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("ffinterp: error:") and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as e:
        cli_main(["eval", str(tmp_path / "missing.pt")])
    assert e.value.code == 2 and "no such checkpoint file" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["text", "jsonl", "parquet"])
def test_eval_cli_scores_a_seq_file(tiny, tmp_path, capsys, fmt):
    """``--seq-file`` reads what ``attention --seq-file`` reads and reports it as a set."""
    save_checkpoint(tmp_path / "ckpt.pt", tiny)
    tokens = sample(30, T, 0.9, seed=3)
    path = tmp_path / f"mine.{'txt' if fmt == 'text' else fmt}"
    write_sequences(tokens, path, fmt)
    with pytest.raises(SystemExit) as e:
        cli_main(["eval", str(tmp_path / "ckpt.pt"), "--seq-file", str(path), "--json", "--no-progress"])
    assert e.value.code == 0
    got = json.loads(capsys.readouterr().out)["sets"]
    assert list(got) == [path.name]
    want = evaluate(tiny, (), sequences={path.name: tokens}, progress=False)[path.name].to_dict()
    timing = ("seconds", "reads_per_s")
    assert {k: v for k, v in got[path.name].items() if k not in timing} == {
        k: v for k, v in want.items() if k not in timing
    }
    assert want["n_seqs"] == 30 and want["errors"] > 0


def test_eval_cli_refuses_bad_seq_files(tiny, tmp_path, capsys):
    save_checkpoint(tmp_path / "ckpt.pt", tiny)
    (tmp_path / "words.txt").write_text("w1r1\nhello\n")
    write_sequences(sample(3, 2 * T, 0.8, seed=0), tmp_path / "long.txt")
    write_sequences(sample(3, T, 0.8, seed=0), tmp_path / "ok.txt")
    for extra, expected in [
        (["--seq-file", str(tmp_path / "missing.txt")], "missing.txt: no such file"),
        (["--seq-file", str(tmp_path / "words.txt")], "words.txt:2: position 0: unknown character 'h'"),
        (["--seq-file", str(tmp_path / "long.txt")], "128 tokens per sequence, more than the model's block"),
        (["--seq-file", str(tmp_path / "ok.txt"), "--n", "5"], "--n and --seq-len size the standard sets"),
    ]:
        with pytest.raises(SystemExit) as e:
            cli_main(["eval", str(tmp_path / "ckpt.pt"), "--no-progress", *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and expected in err, err
