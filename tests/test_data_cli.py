"""Standard data sets, dataset files and the CLI skeleton."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ffinterp.data import STANDARD_SETS, eval_set, iter_eval_set, read_sequences, write_sequences
from ffinterp.language import FFLError, Mix, sample, to_text, validate


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ffinterp", *args], capture_output=True, text=True)


def test_standard_sets_have_the_papers_distributions():
    assert STANDARD_SETS["in"].mix == Mix.ffl(0.8)
    assert STANDARD_SETS["sparse"].mix == Mix.ffl(0.98)
    assert STANDARD_SETS["dense"].mix == Mix.ffl(0.1)
    assert [s.size for s in STANDARD_SETS.values()] == [16_000, 160_000, 4_000]


def test_eval_set_is_fixed_and_streams_identically():
    a = eval_set("sparse", 300, 64)
    assert torch.equal(a, eval_set("sparse", 300, 64))
    streamed = torch.cat([b for _, b in iter_eval_set("sparse", 300, 64, batch_size=128)])
    assert torch.equal(a, streamed)
    with pytest.raises(FFLError, match="unknown evaluation set"):
        eval_set("nope")


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet"])
def test_dataset_files_round_trip(tmp_path, suffix):
    tokens = sample(20, 32, 0.5, seed=2)
    path = tmp_path / f"data{suffix}"
    write_sequences(tokens, path)
    assert torch.equal(read_sequences(path), tokens)


def test_dataset_reader_names_file_line_and_position(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = to_text(sample(1, 16, seed=0)[0])
    path.write_text(json.dumps({"text": good}) + "\n" + json.dumps({"text": "w1i0r0"}) + "\n")
    with pytest.raises(FFLError, match=r"bad.jsonl:2: position 5: read bit"):
        read_sequences(path)


def test_cli_sample_prints_valid_sequences():
    r = run_cli("sample", "--n", "3", "--p-i", "0.98")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3
    for line in lines:
        assert len(line) == 512
        validate(line)


def test_cli_sample_jsonl_and_validate(tmp_path):
    out = tmp_path / "s.jsonl"
    assert (
        run_cli("sample", "--n", "4", "--seq-len", "20", "--format", "jsonl", "--out", str(out)).returncode
        == 0
    )
    r = run_cli("validate", str(out))
    assert r.returncode == 0 and "4 valid sequences of length 20" in r.stdout


@pytest.mark.parametrize(
    "args, expect",
    [
        (["sample", "--bogus"], "No such option"),
        (["sample", "--n", "x"], "--n"),
        (["sample", "--seq-len", "9"], "must be even"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(args, expect):
    r = run_cli(*args)
    assert r.returncode == 2
    assert expect in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_cli_validate_reports_first_bad_line(tmp_path):
    path = tmp_path / "seqs.txt"
    path.write_text("w1i0r1\nw1i0ir1r\n")
    r = run_cli("validate", str(path))
    assert r.returncode == 2
    assert r.stderr.strip() == f"ffinterp: error: {path}:2: position 5: missing bit after 'i' (got 'r')"


def test_cli_version():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("ffinterp ")
