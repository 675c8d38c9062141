"""Standard data sets, dataset files and the CLI skeleton."""

from __future__ import annotations

import json
import os
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
    assert r.returncode == 0 and r.stdout == f"{out}: 4 valid sequences of length 20\n"
    one = tmp_path / "one.txt"
    one.write_text("w1i0r1\n")
    r = run_cli("validate", str(one))
    assert r.returncode == 0 and r.stdout == f"{one}: 1 valid sequence of length 6\n"


def test_count_agrees_in_number():
    from ffinterp.text import count, plural

    assert [count(n, "read") for n in (0, 1, 2, 2048)] == ["0 reads", "1 read", "2 reads", "2,048 reads"]
    assert count(1, "glitch") == "1 glitch" and count(3, "verified glitch") == "3 verified glitches"
    assert plural(2, "index", "indices") == "indices" and plural(1, "index", "indices") == "index"


def test_help_is_whole_sentences_and_usage_lines_spell_arguments_one_way():
    for columns in ("80", "220"):
        r = subprocess.run(
            [sys.executable, "-m", "ffinterp", "--help"], capture_output=True, text=True,
            env={**os.environ, "COLUMNS": columns},
        )  # fmt: skip
        listed = r.stdout.split("Commands:")[1].strip().splitlines()
        assert len(listed) == 10 and r.returncode == 0
        for line in listed:  # one line each, a whole summary: nothing cut off with "..."
            assert not line.rstrip().endswith("...") and line.rstrip()[-1] in ".)", line
    usage = {}
    for command in ("sample", "validate", "train", "eval", "attention", "patch", "find-glitches", "estimate"):
        r = run_cli(command, "--help")
        usage[command] = r.stdout.splitlines()[0]
    assert usage["eval"] == "Usage: ffinterp eval [OPTIONS] CKPT"
    assert usage["find-glitches"] == "Usage: ffinterp find-glitches [OPTIONS] [CKPT]"  # optional
    assert usage["validate"] == "Usage: ffinterp validate [OPTIONS] FILE"
    assert not any(c in "".join(usage.values()) for c in "{}"), usage


def test_find_glitches_help_names_its_default_model():
    from ffinterp.pretrained import DEFAULT_MODEL

    r = run_cli("find-glitches", "--help")
    assert f"(default: pretrained:{DEFAULT_MODEL})" in " ".join(r.stdout.split())
    assert "mitigated model" not in r.stdout


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
