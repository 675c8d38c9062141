"""Property-based fuzzing of every command and file reader: a bad input, whatever it is, gets
exit status 2 and one line naming what and where, never a traceback, and leaves nothing
half-written. The generators live in ``tests/fuzzing.py``; ``benchmarks/fuzz.py`` runs them
with many more examples and prints the counts."""

from __future__ import annotations

import subprocess
import sys

import fuzzing
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

# Few derandomized examples per suite: the whole file stays well under 90 s on one thread.
EXAMPLES = {
    "sequence-file": 40,
    "ckpt.pt": 50,
    "hf-folder": 40,
    "sample": 15,
    "validate": 4,
    "eval": 15,
    "attention": 12,
    "patch": 12,
    "find-glitches": 15,
    "estimate": 10,
    "train": 10,
    "pretrained list": 5,
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield fuzzing.build_artifacts(tmp_path_factory.mktemp("fuzz-base"))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("suite", list(EXAMPLES))
def test_bad_input_is_refused_in_one_line(suite, base, tmp):
    assert set(EXAMPLES) == set(fuzzing.SUITES)

    @fuzzing.fuzz_settings(EXAMPLES[suite])
    @given(data=st.data())
    def fuzz(data):
        case = data.draw(fuzzing.cases(suite, base, tmp / suite.replace(" ", "_")))
        outcome, problem = fuzzing.check(case)
        assert problem is None, f"{case.kind}: {case.argv}: {problem}"

    fuzz()


def test_the_base_artifacts_load(base):
    """The mutations start from valid inputs, so a refusal is the mutation's doing."""
    for name in ("ffinterp", "nanogpt", "lstm", "hf-safetensors", "hf-bin"):
        outcome = fuzzing.run_cli(fuzzing.eval_argv(str(base[name])))
        assert outcome.code == 0 and outcome.crash is None, (name, outcome.err)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["validate", "{tmp}/nope.txt"], "no such file"),
        (["validate", "{tmp}"], "is a folder"),
        (["eval", "{tmp}/bad.pt", "--n", "1"], "truncated or corrupt"),
        (["sample", "--n", "2", "--seq-len", "8", "--out", "{tmp}/bad.pt/x.txt"], "is a file"),
        (["sample", "--n", "99999999999999999999999"], "out of range"),
    ],
)
def test_no_traceback_at_the_process_level(tmp_path, args, needle):
    """The in-process check above is what a real process prints: confirm it on a few."""
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 torn")
    argv = [a.format(tmp=tmp_path) for a in args]
    r = subprocess.run([sys.executable, "-m", "ffinterp", *argv], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
