"""Sharded eval and find-glitches under torchrun (2 gloo ranks on the CPU), at T=64.

The model is a hand-set 2-unit LSTM (:func:`drifting_lstm`): it solves flip-flop except
that its memory of a written 1 drifts down on every instruction, so reads of a 1 written
more than ~28 pairs earlier fail. Its glitches are rare and structured (so a search spans
many rounds before ``max_glitches``), it needs no training, and, having no attention, it is
verified by a float64 copy instead of TransformerLens, which keeps each rank's start-up short.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ffinterp import distributed
from ffinterp.analysis.glitches import GlitchFinder, find_glitches, read_jsonl
from ffinterp.checkpoints import save_checkpoint
from ffinterp.cli import main
from ffinterp.evaluate import evaluate
from ffinterp.language import from_text
from ffinterp.models.lstm import LSTM, LSTMConfig
from ffinterp.scoring import score_tokens

T = 64
ROOT = Path(__file__).resolve().parents[1]


def drifting_lstm(drift_pairs: float = 28.5) -> LSTM:
    """Unit 0 flags "the previous token was w"; unit 1 holds the last written bit as +-1,
    overwritten on the bit after a w and lowered by 1/drift_pairs on every instruction."""
    Z, G, M = 40.0, 20.0, 10.0
    eps = 1.0 / drift_pairs
    u = math.tanh(1.0) * Z + math.log(eps / (1 - eps))  # input gate of unit 1 = eps on instructions
    m = LSTM(LSTMConfig(hidden=2))
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        # embedding (is an instruction, b): b = 1 on w, 0 on r and i, -1 on '0', +1 on '1'
        m.embed.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]]))
        wih, whh, b = m.lstm.weight_ih_l0, m.lstm.weight_hh_l0, m.lstm.bias_ih_l0
        # gate rows (PyTorch order): i0 i1 f0 f1 g0 g1 o0 o1
        b[0] = G
        wih[1] = torch.tensor([u, 0.0])
        whh[1, 0] = Z
        b[2] = -G
        whh[3, 0] = -Z
        wih[4] = torch.tensor([2 * G, 2 * G])
        b[4] = -3 * G
        wih[5] = torch.tensor([-2 * G, G])
        b[6] = b[7] = G
        m.head.bias.fill_(-100.0)
        m.head.bias[3:] = 0.0
        m.head.weight[4, 1], m.head.weight[3, 1] = M, -M
    return m.eval()


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as torchrun gives each rank: a 2-unit LSTM is 64 tiny sequential
    steps, which thread hand-offs on a busy 2-core machine slow down tenfold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("dist-model") / "ckpt.pt"
    save_checkpoint(path, drifting_lstm())
    return str(path)


def torchrun(*args: str, wait: bool = True, **kw):
    """``torchrun --standalone --nproc-per-node 2 -m ffinterp ARGS`` (a free port each time)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "ffinterp", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FFINTERP_DIST_TIMEOUT": "60"}
    if not wait:
        return subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=240, **kw)


def glitch_args(ckpt: str, out: Path, strategy: str, budget: int, **opts: str) -> list[str]:
    args = ["find-glitches", ckpt, "--strategy", strategy, "--budget", str(budget), "--seq-len", str(T)]
    args += ["--device", "cpu", "--no-diagnose", "--quiet", "--out", str(out)]
    for k, v in opts.items():
        args += [f"--{k.replace('_', '-')}", v] if v != "" else [f"--{k.replace('_', '-')}"]
    return args


# ---------------------------------------------------------------- the seam, in one process


def test_shards_partition_the_stream_for_any_world_size():
    for world in (1, 2, 3, 8):
        for stream in (0, 1, 10, range(5, 1000, 64)):
            parts = [distributed.Dist(rank=r, world_size=world).shard(stream) for r in range(world)]
            items = range(stream) if isinstance(stream, int) else stream
            assert sorted(x for p in parts for x in p) == list(items)


def test_one_process_is_the_same_code_with_identity_collectives(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    d = distributed.current()
    assert (d.rank, d.world_size, d.active, d.is_main) == (0, 1, False, True)
    assert d.gather({"a": 1}) == [{"a": 1}] and d.all_gather(3) == [3] and d.broadcast("x") == "x"
    assert d.all_reduce_sum([2, 5]).tolist() == [2, 5] and d.all_reduce_sum([2, 5]).dtype == torch.int64
    d.barrier()
    d.agree(None)


def test_bad_torchrun_environment_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(distributed.DistributedError, match="RANK=3 is not in 0..WORLD_SIZE-1"):
        distributed.env_world()
    # argument errors: rank 0 says it once, the other ranks exit 2 silently
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e:
        main(["find-glitches", "x.pt", "--budget", "0"])
    assert e.value.code == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as e:
        main(["find-glitches", "x.pt", "--budget", "0"])
    assert e.value.code == 2 and capsys.readouterr().err.strip().count("\n") == 0


# A rank as torchrun leaves it (its SIGTERM handler installed), then a SIGTERM delivered from
# inside a weakref finalizer: the place a handler that raises breaks (the exception is printed
# as "Exception ignored in ..." with a traceback, and dropped).
SIGTERM_IN_A_FINALIZER = """
import os, signal, sys, weakref
from ffinterp import distributed

distributed._stop_cleanly_on_sigterm(distributed.Dist(rank=0, world_size=2))


class Held:
    pass


def finalizer():
    os.kill(os.getpid(), signal.SIGTERM)  # the handler runs at the next bytecode, in here
    sum(range(1000))
    print("finalizer done", flush=True)


held = Held()
weakref.finalize(held, finalizer)
if sys.argv[1] == "running":  # collected mid-run: the stop waits for the next safe point
    del held
    print("still running", flush=True)
    try:
        distributed.check_stop()
    except distributed.DistributedError as e:  # as ffinterp.cli.main prints it
        print(f"ffinterp: error: {e}", file=sys.stderr)
        sys.exit(2)
print("main done", flush=True)  # "exit": the finalizer runs at shutdown
sys.exit(2)
"""


@pytest.mark.parametrize("when", ["running", "exit"])
def test_sigterm_inside_a_finalizer_never_prints_a_traceback(when):
    r = subprocess.run(
        [sys.executable, "-c", SIGTERM_IN_A_FINALIZER, when], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120,
    )  # fmt: skip
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
    if when == "running":
        # the finalizer ran to its end, and the stop came at the check, as one line
        assert r.stdout.split() == ["finalizer", "done", "still", "running"], r.stdout
        assert r.stderr == (
            "ffinterp: error: rank 0 of 2: stopped by SIGTERM (torchrun sends it to every rank when one "
            f"fails; or the job was cancelled); {distributed.RESUME_HINT}\n"
        )
        assert r.returncode == 2
    else:
        # at shutdown the handler ends the process quietly: nothing printed after it
        assert r.stdout.split() == ["main", "done"] and r.stderr == ""
        assert r.returncode == 128 + signal.SIGTERM


def test_merge_folds_units_in_order_dedups_and_stops_at_max_glitches():
    finder = GlitchFinder(
        drifting_lstm(), strategy="random", budget=640, seq_len=T, batch_size=64, device="cpu"
    )
    finder.max_glitches = 3
    base = finder.state
    strategy = finder.strategies[0]

    def unit(k: int, texts: list[str], errors: int) -> dict:
        after = json.loads(json.dumps(base))
        after["strategies"]["random"]["errors"] += errors
        after["gap"]["reads"][0] += 10
        after["minimize_scored"] += 7 * len(texts)  # work done, duplicates included
        records = [{"id": 0, "text": t, "read_pos": 62, "unit": k, "minimized": {"scored": 7}} for t in texts]
        return {"unit": k, "scored": 64, "grad_evals": 0, "best_margin": -1.0 * k, "state": after,
                "records": records, "elites": []}  # fmt: skip

    # rank order (1, 0) on purpose: the merge goes by unit; "b" is found by both units
    merged = finder._merge_round(
        strategy, 640, base, 0, [unit(5, ["b", "c", "d"], 3), unit(4, ["a", "b"], 2)]
    )
    st = merged["state"]["strategies"]["random"]
    assert [(r["text"], r["unit"], r["id"]) for r in merged["records"]] == [
        ("a", 4, 0),
        ("b", 4, 1),
        ("c", 5, 2),
    ]
    assert (st["scored"], st["errors"], st["next_unit"], st["best_margin"], st["done"]) == (
        128,
        5,
        6,
        -5.0,
        True,
    )
    assert merged["state"]["gap"]["reads"][0] == 20
    assert merged["state"]["minimize_scored"] == 21  # the kept glitches' cost, as in one process
    # a unit after the one that reached max_glitches is not counted at all
    finder.max_glitches = 2
    merged = finder._merge_round(strategy, 640, base, 0, [unit(4, ["a", "b"], 2), unit(5, ["c"], 1)])
    st = merged["state"]["strategies"]["random"]
    assert [r["text"] for r in merged["records"]] == ["a", "b"]
    assert (st["scored"], st["errors"], st["next_unit"]) == (64, 2, 5)


# ---------------------------------------------------------------- two gloo ranks


def test_random_on_two_ranks_is_exactly_the_single_process_result(ckpt, tmp_path):
    # 1000 is not a multiple of the unit size, and max_glitches stops the search mid-round
    opts = dict(batch_size="64", seed="3", max_glitches="40", no_minimize="")
    r = torchrun(*glitch_args(ckpt, tmp_path / "two", "random", 1000, **opts))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("verified glitches") == 1  # rank 0 alone prints
    one = find_glitches(
        ckpt, "random", 1000, seed=3, seq_len=T, batch_size=64, device="cpu", minimize=False,
        diagnose=False, max_glitches=40, out=tmp_path / "one",
    )  # fmt: skip
    assert len(one) == 40
    assert read_jsonl(tmp_path / "two" / "glitches.jsonl") == read_jsonl(tmp_path / "one" / "glitches.jsonl")
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert {k: v for k, v in s1.items() if k != "wall_s"} == {k: v for k, v in s2.items() if k != "wall_s"}
    st1, st2 = (json.loads((tmp_path / d / "state.json").read_text()) for d in ("one", "two"))
    assert st1["strategies"] == st2["strategies"] and st2["shard"]["world_size"] == 2
    assert (tmp_path / "two" / "report.html").stat().st_size > 0


def test_eval_on_two_ranks_gives_the_single_process_counts(ckpt):
    r = torchrun("eval", ckpt, "--sequences", "2500", "--seq-len", str(T), "--json", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads(r.stdout)  # rank 0 alone prints: one JSON document
    one = evaluate(ckpt, n=2500, seq_len=T, device="cpu", progress=False).to_dict()
    keys = ("n_seqs", "reads", "errors", "seqs_with_error", "ci_low", "ci_high", "seq_ci_low", "seq_ci_high")
    for name in ("in", "sparse", "dense"):
        assert [two["sets"][name][k] for k in keys] == [one["sets"][name][k] for k in keys]
    assert one["sets"]["sparse"]["errors"] > 0 and two["device"] == "cpu x 2 ranks"


def test_estimate_on_two_ranks_is_the_single_process_estimate(ckpt):
    """Each rank scores half of every pilot round and of the final sample; the gathered
    scores make both ranks adapt the same proposal, so the result is one process's."""
    from ffinterp.analysis.families import FFL
    from ffinterp.analysis.tail import estimate

    args = ["--p-i", "0.98", "--seq-len", str(T), "--budget", "3000", "--seed", "2", "--device", "cpu"]
    r = torchrun("estimate", ckpt, *args, "--json", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads(r.stdout)  # rank 0 alone prints
    one = estimate(ckpt, FFL.from_p_i(0.98), budget=3000, seed=2, seq_len=T, device="cpu", progress=False)
    one = one.to_dict()
    assert one["hits"] > 0 and one["scored"] == two["scored"] == 3000
    for key in ("estimate", "per_read", "hits", "n", "ess", "proposal", "reliable"):
        assert (
            two[key] == pytest.approx(one[key], rel=1e-9)
            if isinstance(one[key], float)
            else two[key] == one[key]
        )


def test_evolve_on_two_ranks_merges_real_distinct_glitches(ckpt, tmp_path):
    out = tmp_path / "evo"
    r = torchrun(*glitch_args(ckpt, out, "evolve", 1500, batch_size="64", seed="1", no_minimize=""))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = read_jsonl(out / "glitches.jsonl")
    assert lines and [g["id"] for g in lines] == list(range(len(lines)))
    assert len({(g["text"], g["read_pos"]) for g in lines}) == len(lines)
    model = drifting_lstm()
    for g in lines:  # every line is a real error of the model
        s = score_tokens(model, from_text(g["text"])[None])
        k = int((s.reads.pos == g["read_pos"]).nonzero()[0])
        assert bool(s.error[k]) and abs(float(s.margin[k]) - g["margin"]) < 1e-4
    restarts = {g["origin"]["restart"] for g in lines}
    assert {u % 2 for u in restarts} == {0, 1}  # both ranks' populations contributed
    state = json.loads((out / "state.json").read_text())
    st = state["strategies"]["evolve"]
    summary = json.loads((out / "summary.json").read_text())
    assert st["done"] and st["scored"] == summary["scored"] == 1500
    assert state["shard"]["world_size"] == 2 and state["shard"]["migrants"]["evolve"]


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (from /proc)."""
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(child)
    return None


def _kill_at_unit(proc, out: Path, unit: int, ranks: tuple[int, ...], launcher: bool = False) -> bool:
    """SIGKILL the given ranks (and the launcher) once the search state passes ``unit``."""
    state = out / "state.json"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if state.exists():
            try:
                progress = json.loads(state.read_text())["strategies"]["random"]["next_unit"]
            except (ValueError, KeyError):
                progress = 0
            pids = [_rank_pid(proc.pid, r) for r in ranks]
            if progress >= unit and None not in pids:
                for pid in pids + ([proc.pid] if launcher else []):
                    os.kill(pid, signal.SIGKILL)
                return True
        time.sleep(0.01)
    return False


def test_a_killed_rank_stops_the_job_in_one_line_and_the_output_resumes(ckpt, tmp_path):
    out = tmp_path / "run"
    args = glitch_args(
        ckpt, out, "random", 2048, batch_size="16", seed="7", max_glitches="100000", no_minimize=""
    )
    proc = torchrun(*args, wait=False)
    killed = _kill_at_unit(proc, out, 4, ranks=(1,))
    _, err = proc.communicate(timeout=120)
    assert killed, "the job ended before rank 1 could be killed"
    assert proc.returncode != 0
    ours = [line for line in err.splitlines() if line.startswith("ffinterp: error: rank 0 of 2:")]
    assert len(ours) == 1 and "--resume" in ours[0], err[-3000:]
    assert "lost contact" in ours[0] or "SIGTERM" in ours[0]
    assert "[rank0]: Traceback" not in err
    assert not (out / "summary.json").exists()  # stopped before the end; the state is whole
    assert json.loads((out / "state.json").read_text())["strategies"]["random"]["done"] is False
    # resumed by one process (progress is counted in units, the same for any world size)
    resumed = find_glitches(
        ckpt, "random", 2048, seed=7, seq_len=T, batch_size=16, device="cpu", minimize=False,
        diagnose=False, max_glitches=100000, out=out, resume=True,
    )  # fmt: skip
    fresh = find_glitches(
        ckpt, "random", 2048, seed=7, seq_len=T, batch_size=16, device="cpu", minimize=False,
        diagnose=False, max_glitches=100000,
    )  # fmt: skip
    key = lambda gs: [(g["text"], g["read_pos"], g["margin"], g["id"]) for g in gs]  # noqa: E731
    assert key(read_jsonl(out / "glitches.jsonl")) == key(resumed) == key(fresh) and len(fresh) > 10
    assert resumed.summary["scored"] == fresh.summary["scored"] == 2048


@pytest.mark.parametrize("seed", [21, 22])
def test_the_whole_job_killed_then_resumed_under_torchrun_is_the_uninterrupted_run(ckpt, tmp_path, seed):
    """SIGKILL to both ranks and the launcher at a seeded point, then ``torchrun ... --resume``:
    the glitches are the uninterrupted run's, none lost and none twice."""
    out = tmp_path / "run"
    args = glitch_args(
        ckpt, out, "random", 2048, batch_size="16", seed=str(seed), max_glitches="100000", no_minimize=""
    )
    kill_at = random.Random(seed).randint(2, 10)
    proc = torchrun(*args, wait=False)
    killed = _kill_at_unit(proc, out, kill_at, ranks=(0, 1), launcher=True)
    proc.communicate(timeout=120)
    assert killed, "the job ended before it could be killed"
    assert not (out / "summary.json").exists()
    r = torchrun(*args, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    fresh = find_glitches(
        ckpt, "random", 2048, seed=seed, seq_len=T, batch_size=16, device="cpu", minimize=False,
        diagnose=False, max_glitches=100000,
    )  # fmt: skip
    key = lambda gs: [(g["text"], g["read_pos"], g["margin"], g["id"]) for g in gs]  # noqa: E731
    assert key(read_jsonl(out / "glitches.jsonl")) == key(fresh) and len(fresh) > 10
    assert json.loads((out / "summary.json").read_text())["scored"] == fresh.summary["scored"] == 2048
