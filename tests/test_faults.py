"""Faults during long runs: SIGKILL mid-run then --resume gives the uninterrupted result, a full
disk gives one line and no corrupt file, and two searches cannot write one --out at once."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ffinterp.analysis.glitches import find_glitches, read_jsonl
from ffinterp.checkpoints import CheckpointError, load_checkpoint, read_checkpoint_file, save_checkpoint
from ffinterp.models.gpt import GPT, GPTConfig

T = 32
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def tiny_gpt(seed: int = 0) -> GPT:
    """Untrained: it errs on many reads, so a search finds glitches in every batch."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=T)).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("fault-model") / "ckpt.pt"
    save_checkpoint(path, tiny_gpt())
    return str(path)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """``ffinterp ARGV`` in this process: (exit status, non-empty stderr lines)."""
    from ffinterp.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


GLITCH_OPTS = dict(strategy="random", budget=1024, seed=5, seq_len=T, batch_size=32, max_glitches=40)


def glitch_argv(ckpt: str, out: Path, minimize: bool = True, **over) -> list[str]:
    o = {**GLITCH_OPTS, **over}
    argv = ["find-glitches", ckpt, "--strategy", o["strategy"], "--budget", str(o["budget"])]
    argv += ["--seed", str(o["seed"]), "--seq-len", str(T), "--batch-size", str(o["batch_size"])]
    argv += ["--max-glitches", str(o["max_glitches"]), "--device", "cpu", "--out", str(out), "--quiet"]
    return argv + ["--no-diagnose"] + ([] if minimize else ["--no-minimize"])


def reference(ckpt: str, minimize: bool = True, **over) -> list[dict]:
    """The uninterrupted run's records, in order."""
    o = {**GLITCH_OPTS, **over}
    return list(find_glitches(ckpt, device="cpu", diagnose=False, minimize=minimize, **o).glitches)


def no_temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if ".tmp" in p.name]


# ---------------------------------------------------------------- SIGKILL, then --resume


@pytest.mark.parametrize("seed", [11, 12])
def test_find_glitches_killed_at_a_seeded_point_resumes_to_the_same_file(ckpt, tmp_path, capsys, seed):
    """Killed after a seeded number of lines (0: before the first), the resumed file holds
    exactly the uninterrupted run's records: none lost, none twice."""
    kill_after = random.Random(seed).randint(0, 12)
    out = tmp_path / "g"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ffinterp", *glitch_argv(ckpt, out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    jsonl = out / "glitches.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if jsonl.exists() and jsonl.read_bytes().count(b"\n") >= kill_after:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    killed = proc.returncode == -signal.SIGKILL
    code, err = cli([*glitch_argv(ckpt, out), "--resume"], capsys)
    assert code == 0, err
    want = reference(ckpt)
    assert read_jsonl(jsonl) == want and len(want) == GLITCH_OPTS["max_glitches"]
    assert killed, "the run finished before the kill: make it longer"


def test_train_killed_mid_run_leaves_a_valid_checkpoint_and_resumes_bit_exactly(tmp_path):
    args = ["train", "--preset", "micro", "--steps", "24", "--batch-size", "4", "--seq-len", str(T)]
    args += ["--eval-every", "0", "--eval-n", "1", "--ckpt-every", "1", "--device", "cpu", "--seed", "3"]
    args += ["--embd-dropout", "0.1"]  # dropout: the RNG state must survive the kill too

    def run(out: Path, *extra: str, wait: bool = True):
        cmd = [sys.executable, "-m", "ffinterp", *args, "--out", str(out), *extra]
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
        if wait:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err.decode()[-2000:]
        return p

    kill_at = random.Random(7).randint(3, 18)
    proc = run(tmp_path / "killed", wait=False)
    ckpt_path = tmp_path / "killed" / "ckpt.pt"
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        with contextlib.suppress(Exception):  # absent, or replaced while we read it
            if read_checkpoint_file(ckpt_path)["iter_num"] >= kill_at:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before the kill"
    interrupted = load_checkpoint(ckpt_path)  # valid: atomic rename, never half a file
    assert kill_at <= interrupted.raw["iter_num"] < 24
    run(tmp_path / "killed", "--resume")
    run(tmp_path / "straight")
    a = load_checkpoint(tmp_path / "straight" / "ckpt.pt")
    b = load_checkpoint(ckpt_path)
    assert a.raw["iter_num"] == b.raw["iter_num"] == 24
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of a few KiB (needs root); the test is skipped where it cannot be mounted."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?)")

    def resize(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)

    try:
        yield mnt, resize
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path, leave: int) -> None:
    """Take all but about ``leave`` bytes of the disk."""
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    with contextlib.suppress(OSError), open(mnt / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


@pytest.mark.parametrize("leave", [1500, 40_000])
def test_full_disk_during_find_glitches_is_one_line_and_resumable(ckpt, small_disk, capsys, leave):
    """The disk fills while glitch lines are appended (1.5 KB left) or at the report (40 KB):
    exit 2, one line naming the file, every file left whole; freed, --resume finishes the run."""
    mnt, resize = small_disk
    out = mnt / "g"
    fill(mnt, leave)
    code, err = cli(glitch_argv(ckpt, out, minimize=False), capsys)
    assert code == 2 and len(err) == 1, err
    assert "No space left on device" in err[0] and str(out) in err[0]
    assert no_temp_files(out) == []
    done = read_jsonl(out / "glitches.jsonl")  # whole lines only: no torn line to drop
    assert (out / "glitches.jsonl").read_bytes().endswith(b"\n") or not done
    if (out / "state.json").exists():
        json.loads((out / "state.json").read_text())
    (mnt / "filler").unlink()
    resize("32m")  # report.html embeds plotly: megabytes
    code, err = cli([*glitch_argv(ckpt, out, minimize=False), "--resume"], capsys)
    assert code == 0, err
    assert read_jsonl(out / "glitches.jsonl") == reference(ckpt, minimize=False)


def test_full_disk_while_saving_a_checkpoint_keeps_the_old_one(small_disk, tmp_path, capsys):
    mnt, _ = small_disk
    path = mnt / "ckpt.pt"
    save_checkpoint(path, tiny_gpt(0))
    fill(mnt, 1000)
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(path, tiny_gpt(1))
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg and str(path) in msg
    assert no_temp_files(mnt) == []
    with torch.no_grad():
        old = tiny_gpt(0)
        assert all(
            torch.equal(a, b) for a, b in zip(load_checkpoint(path).model.parameters(), old.parameters())
        )
    # the same through `ffinterp train`: exit 2, one line, no half checkpoint
    out = mnt / "run"
    code, err = cli(
        ["train", "--out", str(out), "--preset", "micro", "--steps", "2", "--batch-size", "2",
         "--seq-len", "8",
         "--eval-every", "0", "--eval-n", "1", "--ckpt-every", "1", "--device", "cpu"],
        capsys,
    )  # fmt: skip
    ours = [ln for ln in err if ln.startswith("ffinterp")]  # train's progress bar shares stderr
    assert code == 2 and len(ours) == 1 and "No space left on device" in ours[0], err
    assert not any("Traceback" in ln for ln in err)
    assert no_temp_files(mnt) == [] and not (out / "ckpt.pt").exists()


# ---------------------------------------------------------------- two writers, one --out


def test_a_second_search_on_the_same_out_is_refused(ckpt, tmp_path, capsys):
    out = tmp_path / "g"
    out.mkdir()
    with open(out / ".lock", "a") as held:  # another process's run, as flock sees it
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, err = cli(glitch_argv(ckpt, out, minimize=False), capsys)
        assert code == 2 and len(err) == 1 and "another find-glitches run" in err[0], err
        code, err = cli([*glitch_argv(ckpt, out, minimize=False), "--resume"], capsys)
        assert code == 2 and "another find-glitches run" in err[0], err
    assert not (out / "glitches.jsonl").exists()  # the refused runs touched nothing
    code, err = cli(glitch_argv(ckpt, out, minimize=False), capsys)  # released: runs, and lets go
    assert code == 0, err
    code, err = cli([*glitch_argv(ckpt, out, minimize=False), "--resume"], capsys)
    assert code == 0, err


def test_two_processes_on_one_out(ckpt, tmp_path, capsys):
    """A live search holds the lock; a second process is refused and the first is unharmed."""
    out = tmp_path / "g"
    argv = glitch_argv(ckpt, out, budget=4096, max_glitches=4000)
    first = subprocess.Popen(
        [sys.executable, "-m", "ffinterp", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV
    )
    deadline = time.time() + 60
    while time.time() < deadline and first.poll() is None:
        if (out / "glitches.jsonl").exists() and (out / "glitches.jsonl").stat().st_size > 0:
            break
        time.sleep(0.01)
    second = subprocess.run(
        [sys.executable, "-m", "ffinterp", *argv], capture_output=True, text=True, env=ENV
    )
    still_running = first.poll() is None
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert still_running, "the first run ended before the second started: make it longer"
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1 and "another find-glitches run" in lines[0], lines
    read_jsonl(out / "glitches.jsonl")  # whole lines, from one writer


def test_a_failed_json_or_report_write_leaves_no_temp_file(small_disk):
    """``write_json_atomic`` (summaries, reports) on a full disk: the error propagates, the old
    file is untouched, and no ``.tmp`` file is left behind."""
    from ffinterp.analysis.report import write_json_atomic

    mnt, _ = small_disk
    target = mnt / "summary.json"
    write_json_atomic(target, {"old": True})
    fill(mnt, 0)
    with pytest.raises(OSError):
        write_json_atomic(target, {"big": "x" * 200_000})
    assert json.loads(target.read_text()) == {"old": True}
    assert no_temp_files(mnt) == []
