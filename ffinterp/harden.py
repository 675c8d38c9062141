"""Counterexample-guided fine-tuning: find the glitches, train on them, measure, repeat.

A glitch is an error of a model that makes none in distribution. The public FFLM adversary
project closed most of that gap with a loop, and :func:`harden` is that loop on ffinterp's
parts. Each round, on the current weights:

1. **Find.** :func:`~ffinterp.analysis.glitches.find_glitches` with the distribution
   adversary (CMA-ES over piecewise FFL, :mod:`ffinterp.analysis.adversary`) among its
   strategies, within ``budget`` sequences; every glitch verified on the second
   implementation and minimised.
2. **Fix.** Fine-tune for ``steps_per_round`` steps on a mixture of sources
   (:class:`ffinterp.train.Source`): FFL(0.8) replay (share ``replay``), and, sharing the rest
   equally, the adversary's best distributions (a pool over the last rounds), the round's
   minimal glitches planted into FFL(0.8) (:mod:`ffinterp.analysis.planted`: exact spacing,
   jittered gaps, the whole window, mirror images), and the R4 tails FFL(0.1), FFL(0.9) and
   FFL(0.98).
3. **Measure.** Fixed subsets of the standard sets ``in``, ``sparse`` and ``dense``, the
   sparse tail by importance sampling (:func:`~ffinterp.analysis.tail.estimate`: its result,
   or its refusal), and the errors on fresh samples of the round's glitch distributions
   before and after the fine-tune.

It stops after ``rounds`` rounds or when the finder finds nothing within its budget.

Everything lives in ``out``: ``rounds.jsonl`` (one line per round, appended whole; round 0 is
the starting model), ``ckpt.pt`` (the current weights, replaced atomically), ``rounds.html``
(+ ``.png`` when kaleido can render), ``settings.json``, ``start.pt`` and one folder per round
(the finder's files, ``plan.json``: what the round trains on, and the fine-tune's resumable
``train/ckpt.pt``). Every seed is derived from ``seed`` and the round, batches are a pure
function of (seed, step), and the finder and the trainer both resume exactly, so a run killed
at any point and resumed (``resume=True``) ends with the same weights and the same
``rounds.jsonl`` (timings aside) as one that was never stopped.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ffinterp.analysis.adversary import Distribution, default_family
from ffinterp.analysis.families import FFL, Family, Mixture, Piecewise
from ffinterp.analysis.glitches import find_glitches, read_jsonl
from ffinterp.analysis.patterns import from_glitches, jittered
from ffinterp.analysis.report import write_json_atomic
from ffinterp.analysis.search import STRATEGIES, derive_seed
from ffinterp.analysis.tail import checked_model, estimate
from ffinterp.checkpoints import load_checkpoint, model_digest, save_checkpoint
from ffinterp.errors import FFInterpError
from ffinterp.evaluate import clopper_pearson, count_errors, evaluate
from ffinterp.train import FFLStream, Source, TrainConfig, train

SETS = ("in", "sparse", "dense")
BASE_P_I = 0.8  # the training distribution the replay share keeps
TAILS = (0.1, 0.9, 0.98)  # R4: the rare-sequence mixture that helped most in the paper
SPARSE_P_I = 0.98  # the tail estimated each round
DEFAULT_STRATEGIES = ("distribution", "random", "families")
VERSION = 1


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class HardenSettings:
    """Everything that defines a hardening run (``settings.json``); ``rounds`` may grow on a
    resume, the rest must stay."""

    rounds: int
    steps_per_round: int
    budget: int
    seed: int = 0
    replay: float = 0.5
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    max_glitches: int = 32
    patterns: int = 8  # minimal glitches planted per round
    pool: int = 8  # adversary distributions kept over the rounds
    batch_size: int = 16
    lr: float = 3e-4
    warmup: int = 20
    ckpt_every: int = 50
    eval_n: tuple[int, int, int] = (1000, 5000, 300)  # sequences of in, sparse, dense
    estimate_budget: int = 20_000  # sequences for the sparse-tail estimate (0: skip it)
    target_n: int = 256  # fresh sequences per glitch distribution, before and after the fix
    seq_len: int = 0  # 0: the model's block size

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategies", tuple(self.strategies))
        object.__setattr__(self, "eval_n", tuple(int(n) for n in self.eval_n))
        for name in ("rounds", "steps_per_round", "budget", "max_glitches", "batch_size", "target_n"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise FFInterpError(f"harden: {name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.pool, int) or self.pool < 1:
            raise FFInterpError(f"harden: pool must be an integer >= 1, got {self.pool!r}")
        for name in ("patterns", "warmup", "ckpt_every", "estimate_budget", "seed", "seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise FFInterpError(f"harden: {name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not (isinstance(self.replay, (int, float)) and 0 <= self.replay < 1):
            raise FFInterpError(f"harden: replay must lie in [0, 1), got {self.replay!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise FFInterpError(f"harden: lr must be a positive number, got {self.lr!r}")
        if len(self.eval_n) != 3 or min(self.eval_n) < 1:
            raise FFInterpError(f"harden: eval_n must be 3 sizes >= 1 (in, sparse, dense), got {self.eval_n}")
        if "distribution" not in self.strategies:
            raise FFInterpError(
                f"harden: strategies must include 'distribution', got {list(self.strategies)}"
            )
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or len(set(self.strategies)) != len(self.strategies):
            raise FFInterpError(
                f"harden: strategies must be distinct names of {', '.join(sorted(STRATEGIES))}, "
                f"got {list(self.strategies)}"
            )
        if 0 < self.estimate_budget < 200:
            raise FFInterpError(
                f"harden: estimate_budget must be 0 (skip) or >= 200, got {self.estimate_budget}"
            )
        if self.seq_len and (self.seq_len < 4 or self.seq_len % 2):
            raise FFInterpError(f"harden: seq_len must be an even number >= 4, got {self.seq_len}")

    def fixed(self) -> dict:
        """The settings a resume must match (all but ``rounds``)."""
        d = json.loads(json.dumps(asdict(self)))
        d.pop("rounds")
        return d

    def command(self, ckpt: str, out: str | os.PathLike, device: str) -> str:
        """The ``ffinterp harden`` command line that repeats this run exactly."""
        import shlex

        args = [
            "ffinterp", "harden", ckpt, "--out", str(out), "--rounds", self.rounds,
            "--steps", self.steps_per_round, "--budget", self.budget, "--seed", self.seed,
            "--replay", self.replay, "--strategies", ",".join(self.strategies),
            "--max-glitches", self.max_glitches, "--patterns", self.patterns, "--pool", self.pool,
            "--batch-size", self.batch_size, "--lr", self.lr, "--warmup", self.warmup,
            "--ckpt-every", self.ckpt_every, "--eval-n", ",".join(map(str, self.eval_n)),
            "--estimate-budget", self.estimate_budget, "--target-n", self.target_n,
            "--seq-len", self.seq_len, "--device", device,
        ]  # fmt: skip
        return shlex.join(str(a) for a in args)


# ---------------------------------------------------------------- the result


def _interval(d: dict) -> tuple[float | None, float | None]:
    """A set's interval, read by name: cluster-aware fields where ``evaluate`` gives them,
    else the plain ones (evaluate's fields are changing; nothing here depends on one name)."""
    for lo, hi in (("cluster_ci_low", "cluster_ci_high"), ("ci_low", "ci_high"), ("low", "high")):
        if d.get(lo) is not None and d.get(hi) is not None:
            return float(d[lo]), float(d[hi])
    return None, None


def _set_text(d: dict | None) -> str:
    if not d:
        return "-"
    errors, reads = d.get("errors"), d.get("reads")
    rate = d.get("rate_text")
    if rate is None:
        lo, hi = _interval(d)
        r = errors / reads if reads else math.nan
        rate = f"{r:.1e}" + (f" [{lo:.1e}, {hi:.1e}]" if lo is not None else "")
    return f"{errors}/{reads} ({rate})"


def _tail_text(t: dict | None) -> str:
    if not t:
        return "-"
    if t.get("skipped"):
        return "skipped"
    if "refused" in t:
        return "refused"
    if not t.get("reliable"):
        return "no error seen (no interval)" if not t.get("hits") else f"~{t['per_read']:.1e} (no interval)"
    return f"{t['per_read']:.1e} [{t['per_read_ci_low']:.1e}, {t['per_read_ci_high']:.1e}]"


def _shares_text(fix: dict | None) -> str:
    if not fix:
        return "-"
    return " ".join(f"{k} {v:.2f}" for k, v in fix["groups"].items())


HEADER = ("round", "glitches", "first at", "mixture shares", *SETS, "sparse tail (per read)")


def _row(rec: dict) -> list[str]:
    find, measure = rec.get("find") or {}, rec.get("measure") or {}
    first = find.get("first_at")
    return [
        str(rec["round"]),
        str(find["glitches"]) if find else "-",
        "-" if first is None else f"{first:,}",
        _shares_text(rec.get("fix")) if not rec.get("stopped") else "stopped: nothing found",
        *(_set_text(measure.get(s)) for s in SETS),
        _tail_text(measure.get("tail")),
    ]


WIDTHS = (5, 8, 9, 44, 30, 30, 30, 24)  # the rows printed as the rounds finish


def _line(cells: Sequence[str], widths: Sequence[int] = WIDTHS) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()


def _table(records: Sequence[dict]) -> str:
    rows = [list(HEADER), *map(_row, records)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    return "\n".join(_line(r, widths) for r in rows)


@dataclass
class HardenResult:
    """The round records of a hardening run (round 0: the starting model), a list in all
    but name; prints as a table, renders as HTML in Jupyter, ``plot()`` draws the error
    rates against the round."""

    records: list[dict]
    out: Path
    settings: HardenSettings
    stopped: str = ""
    command: str = ""
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, k: int) -> dict:
        return self.records[k]

    def __iter__(self) -> Iterator[dict]:
        return iter(self.records)

    def table(self) -> str:
        return _table(self.records)

    def __repr__(self) -> str:
        tail = f"\n{self.stopped}" if self.stopped else ""
        return f"harden -> {self.out}\n{self.table()}{tail}"

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADER)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _row(r)) + "</tr>" for r in self.records
        )
        note = f"<p>{html.escape(self.stopped)}</p>" if self.stopped else ""
        return (
            f"<div><b>harden</b> <small>{html.escape(str(self.out))}</small>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}</div>"
        )

    def plot(self):
        """Read-error rate against the round, log scale, with the intervals: the three sets,
        the sparse tail estimate, and the round's glitch distributions before and after its
        fine-tune. A rate of 0 is drawn at its interval's upper end (an open triangle)."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for label, points in _series(self.records):
            if not points:
                continue
            x, y, lo, hi, zero = zip(*points)
            fig.add_trace(
                go.Scatter(
                    x=x, y=y, name=label, mode="lines+markers",
                    line=dict(dash="dot") if label.startswith("glitch") else None,
                    error_y=dict(type="data", symmetric=False, array=[b - v for v, b in zip(y, hi)],
                                 arrayminus=[v - a for v, a in zip(y, lo)]),
                    marker=dict(symbol=["triangle-down-open" if z else "circle" for z in zero], size=9),
                )
            )  # fmt: skip
        fig.update_layout(
            title="Read-error rate by hardening round (open triangle: 0 errors, upper bound)",
            xaxis_title="round (0: the starting model)",
            yaxis_title="read-error rate",
            yaxis_type="log",
            width=800,
            height=480,
        )
        fig.update_xaxes(dtick=1)
        return fig


def _point(x: int, errors: int, reads: int, lo: float | None, hi: float | None) -> tuple | None:
    """(x, y, low, high, zero) of a rate; 0 errors sits at the interval's upper end."""
    if not reads:
        return None
    if lo is None or hi is None:
        lo, hi = clopper_pearson(errors, reads)
    if not errors:  # an upper bound: no bar down to 0 on a log axis
        return (x, hi, hi, hi, True) if hi > 0 else None
    y = errors / reads
    return x, y, min(lo, y), max(hi, y), False


def _series(records: Sequence[dict]) -> list[tuple[str, list[tuple]]]:
    out: dict[str, list] = {
        name: [] for name in (*SETS, "sparse tail (IS)", "glitch dists, before", "glitch dists, after")
    }
    for r in records:
        m, k = r.get("measure") or {}, r["round"]
        for name in SETS:
            d = m.get(name)
            if d:
                out[name].append(_point(k, int(d["errors"]), int(d["reads"]), *_interval(d)))
        t = m.get("tail") or {}
        if t.get("per_read") and t.get("reliable"):
            y = float(t["per_read"])
            out["sparse tail (IS)"].append((k, y, t["per_read_ci_low"], t["per_read_ci_high"], False))
        for when in ("before", "after"):
            pairs = [c[when] for c in r.get("targets") or []]
            if pairs:
                errors, reads = map(sum, zip(*pairs))
                out[f"glitch dists, {when}"].append(_point(k, errors, reads, None, None))
    return [(name, [p for p in points if p is not None]) for name, points in out.items()]


# ---------------------------------------------------------------- files


def _append_line(path: Path, record: dict) -> None:
    """Append one JSON line in one write, flushed and synced; a failed write is cut off
    again, so the file stays whole lines (a kill mid-write leaves a torn last line, which
    :func:`~ffinterp.analysis.glitches.read_jsonl` drops)."""
    line = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()
    try:
        with open(path, "ab") as f:
            size = f.tell()
            try:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            except OSError:
                with contextlib.suppress(OSError):
                    f.truncate(size)
                raise
    except OSError as e:
        raise FFInterpError(f"{path}: cannot write ({e.strerror or type(e).__name__})") from None


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Make ``out`` and hold ``out/.lock``: two runs writing one folder would interleave
    their rounds."""
    import fcntl

    if out.exists() and not out.is_dir():
        raise FFInterpError(f"out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "a")  # noqa: SIM115 - closed below, after the run
    except OSError as e:
        raise FFInterpError(f"out {out}: cannot write ({e.strerror or type(e).__name__})") from None
    with lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise FFInterpError(f"out {out}: another harden run is writing there") from None
        yield


def _check_out(out: Path, resume: bool, settings: HardenSettings, start_sha: str) -> None:
    """Refuse a folder that holds something else, or another run unless resuming it with the
    same settings; then record the settings."""
    want = {"version": VERSION, "start_sha256": start_sha, **settings.fixed()}
    path = out / "settings.json"
    if any(p.name != ".lock" for p in out.iterdir()):
        if not resume:
            raise FFInterpError(
                f"out {out}: folder is not empty; pass resume=True to continue or choose another"
            )
        if not path.exists():
            raise FFInterpError(
                f"out {out}: holds files but no harden run (no settings.json); choose another"
            )
        try:
            have = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            raise FFInterpError(f"{path}: unreadable settings (not JSON)") from None
        diff = sorted(k for k in want.keys() | have.keys() if k != "rounds" and have.get(k) != want.get(k))
        if diff:
            raise FFInterpError(
                f"out {out}: cannot resume: the saved run differs in {', '.join(diff)} "
                "(rerun with the same model and settings, or choose another folder)"
            )
    write_json_atomic(path, {**want, "rounds": settings.rounds})


# ---------------------------------------------------------------- find


def _distribution_strategy(share: int) -> Distribution:
    """The adversary sized to its share of the budget: one CMA-ES search that ends with a
    confirming sample (up to 512 sequences) instead of being cut off mid-search."""
    pop = 4 + int(3 * math.log(default_family().n_params))
    confirm = max(1, min(512, share // 4))
    per_eval = max(8, min(64, (share - confirm) // pop))
    generations = max(1, (share - confirm) // (pop * per_eval))
    return Distribution(per_eval=per_eval, generations=generations, confirm=confirm)


def _glitch_prefix(g: dict) -> str:
    """The minimal form of a glitch (or the glitch itself), cut after its failing read: the
    model is causal, so the prefix fails the same way."""
    m = g.get("minimized") or {}
    if m.get("text") and m.get("verified", True):
        return m["text"][: int(m["read_pos"]) + 2]
    return g["text"][: int(g["read_pos"]) + 2]


def _find(model: nn.Module, k: int, rdir: Path, s: HardenSettings, seq_len: int, device, pool: list) -> dict:
    """Run the finder on the current weights and write the round's plan (what it trains on)."""
    n = len(s.strategies)
    shares = [s.budget // n + (j < s.budget % n) for j in range(n)]
    strategies = [
        _distribution_strategy(share) if name == "distribution" else name
        for name, share in zip(s.strategies, shares)
    ]
    report = find_glitches(
        model, strategies, s.budget, seed=derive_seed(s.seed, "find", k) % 2**31, device=device,
        out=rdir / "find", minimize=True, diagnose=False, resume=True, seq_len=seq_len,
        max_glitches=s.max_glitches, progress=False,
    )  # fmt: skip
    summary = report.summary
    first, offset, by = None, 0, {}
    for name in s.strategies:  # strategies run in turn: a glitch's place in the whole search
        st = summary["strategies"][name]
        by[name] = {
            "glitches": st["glitches"],
            "first_glitch_at": st["first_glitch_at"],
            "scored": st["scored"],
        }
        if first is None and st["first_glitch_at"] is not None:
            first = offset + st["first_glitch_at"]
        offset += st["scored"]
    findings = summary["strategies"]["distribution"].get("findings") or []
    confirmed = [f for f in findings if "read_rate" in f] or findings
    new = [
        {
            "distribution": f["distribution"],
            "parameters": f["parameters"],
            "round": k,
            "read_rate": f.get("read_rate"),
        }
        for f in confirmed
    ]
    kept: dict[str, dict] = {}
    for d in [*pool, *new]:
        kept.pop(d["distribution"], None)
        kept[d["distribution"]] = d
    ranked = sorted(report.glitches, key=lambda g: (g["margin"], g["text"], g["read_pos"]))
    minimal: list[str] = []
    for g in ranked:
        text = _glitch_prefix(g)
        if text not in minimal and len(minimal) < s.patterns:
            minimal.append(text)
    plan = {
        "round": k,
        "model_sha256": model_digest(model),
        "glitches": len(report),
        "first_at": first,
        "scored": summary["scored"],
        "by_strategy": by,
        "best_margin": summary["best_margin"],
        "minimal": minimal,
        "new_distributions": [d["distribution"] for d in new],
        "distributions": list(kept.values())[-s.pool :],
    }
    write_json_atomic(rdir / "plan.json", plan)
    return plan


# ---------------------------------------------------------------- fix


def _planted(minimal: list[str], seq_len: int) -> tuple[Family | None, int]:
    """The round's minimal glitches planted into FFL(0.8): each at its own spacing and with
    jittered gaps, its writes and reads alone and its whole window, and their mirror images
    (:func:`~ffinterp.analysis.patterns.from_glitches`), as one equal-weight mixture."""
    target = FFL.from_p_i(BASE_P_I)
    comps: dict[tuple, Family] = {}
    for text in minimal:
        try:
            exact = from_glitches(target, [text], seq_len)
        except FFInterpError:  # a pattern that cannot be planted at this length
            continue
        for p in (*exact, *map(jittered, exact)):
            comps.setdefault(p.key, p)
    if not comps:
        return None, 0
    parts = tuple(comps.values())
    return (parts[0] if len(parts) == 1 else Mixture(parts, (1 / len(parts),) * len(parts))), len(parts)


def _sources(
    plan: dict, s: HardenSettings, seq_len: int
) -> tuple[list[Source], dict, list[tuple[str, Family]]]:
    """The fine-tune's sources and their shares, the share of each group, and the round's
    glitch distributions (what the before/after check samples)."""
    adversary = [
        (Piecewise(**d["parameters"]), f"adversary: {d['distribution']}") for d in plan["distributions"]
    ]
    planted, n_patterns = _planted(plan["minimal"], seq_len)
    groups: dict[str, list[tuple]] = {}
    if adversary:
        groups["adversary"] = adversary
    if planted is not None:
        groups["planted"] = [
            (planted, f"planted: {n_patterns} patterns of {len(plan['minimal'])} minimal glitches")
        ]
    groups["tails"] = [(FFLStream(p), f"FFL({p}) (R4 tail)") for p in TAILS]
    rest = (1 - s.replay) / len(groups)
    sources = [Source(FFLStream(BASE_P_I), s.replay, f"FFL({BASE_P_I}) (replay)")] if s.replay > 0 else []
    shares = {"replay": float(s.replay)} if s.replay > 0 else {}
    for name, members in groups.items():
        shares[name] = rest
        sources += [Source(sampler, rest / len(members), label) for sampler, label in members]
    new = set(plan["new_distributions"])
    checks = [(label, fam) for fam, label in adversary if str(fam) in new]
    if planted is not None:
        checks.append((groups["planted"][0][1], planted))
    return sources, shares, checks


@torch.inference_mode()
def _errors_on(
    model: nn.Module, checks: list[tuple[str, Family]], seq_len: int, n: int, seed: int, dev
) -> list:
    """[errors, reads] of ``model`` on ``n`` fresh sequences of each glitch distribution."""
    out = []
    model.to(dev).eval()
    for j, (_, fam) in enumerate(checks):
        tokens = fam.sample(n, seq_len, seed=derive_seed(seed, "check", j) % 2**31)
        reads = errors = 0
        for chunk in tokens.split(256):
            r, e = count_errors(model, chunk.to(dev))
            reads, errors = reads + int(r.sum()), errors + int(e.sum())
        out.append([errors, reads])
    model.cpu()
    return out


# ---------------------------------------------------------------- measure


def _measure(model: nn.Module, s: HardenSettings, seq_len: int, dev) -> dict:
    """Fixed subsets of the three standard sets, and the sparse tail by importance sampling."""
    ev = evaluate(model, SETS, n=dict(zip(SETS, s.eval_n)), seq_len=seq_len, device=dev, progress=False)
    out: dict = {}
    for r in ev:
        d = r.to_dict() if hasattr(r, "to_dict") else asdict(r)
        d = {k: v for k, v in d.items() if k not in ("seconds", "reads_per_s")}  # timings vary
        if hasattr(r, "rate_text"):
            d["rate_text"] = r.rate_text
        out[r.name] = d
    if not s.estimate_budget:
        out["tail"] = {"skipped": True}
        return out
    try:
        t = estimate(
            model, FFL.from_p_i(SPARSE_P_I), budget=s.estimate_budget,
            seed=derive_seed(s.seed, "tail") % 2**31, seq_len=seq_len, device=dev, progress=False,
        )  # fmt: skip
    except FFInterpError as e:
        out["tail"] = {"refused": str(e)}
    else:
        d = t.to_dict()
        d.pop("seconds", None)
        out["tail"] = d
    return out


# ---------------------------------------------------------------- the loop


def _write_plot(result: HardenResult, png: bool) -> None:
    from ffinterp.viz import ExportError, figures_html, save_figure, save_html

    fig = result.plot()
    table = f"<pre>{html.escape(result.table())}</pre>"
    save_html(figures_html([fig, table], title=f"harden: {result.out}"), result.out / "rounds.html")
    if png:
        try:
            save_figure(fig, result.out / "rounds.png")
        except (ExportError, ImportError, OSError) as e:  # no chromium: the HTML is enough
            result.extra["png"] = f"not written: {str(e).splitlines()[0][:200]}"


def harden(
    ckpt,
    out: str | os.PathLike,
    *,
    rounds: int,
    steps_per_round: int,
    budget: int,
    seed: int = 0,
    replay: float = 0.5,
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    max_glitches: int = 32,
    patterns: int = 8,
    pool: int = 8,
    batch_size: int = 16,
    lr: float = 3e-4,
    warmup: int = 20,
    ckpt_every: int = 50,
    eval_n: Sequence[int] = (1000, 5000, 300),
    estimate_budget: int = 20_000,
    target_n: int = 256,
    seq_len: int | None = None,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    png: bool = True,
    on_start: Callable[[str], None] | None = None,
) -> HardenResult:
    """Harden ``ckpt`` (a checkpoint path, ``pretrained:NAME`` or a fast model) by rounds of
    find, fix and measure (see the module docstring), writing everything to ``out``.

    ``budget`` sequences per find (shared by ``strategies``, which must include the
    distribution adversary; ``max_glitches`` stops it early), ``steps_per_round`` fine-tune
    steps at ``batch_size`` and ``lr`` (linear warmup over ``warmup`` steps, decay to 0; a
    checkpoint every ``ckpt_every``), ``replay`` the FFL(0.8) share, ``patterns`` minimal glitches
    planted per round, ``pool`` adversary distributions kept over rounds. ``eval_n`` sizes the
    in, sparse and dense subsets; ``estimate_budget`` the sparse-tail estimate (0: skip).
    ``resume`` continues a run in ``out`` (killed or finished; more ``rounds`` go on).
    ``progress`` shows a bar over the rounds and prints one row per round; ``png`` also
    renders ``rounds.png`` (skipped with a note in ``result.extra`` when kaleido cannot).
    ``on_start`` is called with the ``ffinterp harden`` command line that repeats the run,
    every setting spelled out, once the inputs are checked.
    """
    s = HardenSettings(
        rounds=rounds, steps_per_round=steps_per_round, budget=budget, seed=seed, replay=float(replay),
        strategies=tuple(strategies), max_glitches=max_glitches, patterns=patterns, pool=pool,
        batch_size=batch_size, lr=float(lr), warmup=warmup, ckpt_every=ckpt_every, eval_n=tuple(eval_n),
        estimate_budget=estimate_budget, target_n=target_n, seq_len=seq_len or 0,
    )  # fmt: skip
    start_model, t, dev = checked_model(ckpt, s.seq_len or None, device)
    name = str(ckpt) if isinstance(ckpt, (str, os.PathLike)) else type(start_model).__name__
    out = Path(out)
    s = replace(s, seq_len=t)  # resolved, so a resume that spells it out is the same run
    command = s.command(name, out, device)
    with _locked(out):
        _check_out(out, resume, s, model_digest(start_model))
        if on_start is not None:
            on_start(command)
        return _run(start_model, out, s, t, dev, command, progress, png)


def _run(start_model, out: Path, s: HardenSettings, t: int, dev, command: str, progress: bool, png: bool):
    from tqdm.auto import tqdm

    start = out / "start.pt"
    if not start.exists():
        save_checkpoint(start, start_model, ffl={"harden": {"start": True}})
    log = out / "rounds.jsonl"
    records = read_jsonl(log, repair=True) if log.exists() else []
    result = HardenResult(records, out, s, command=command)

    def emit(rec: dict) -> None:
        _append_line(log, rec)
        records.append(rec)
        if progress:
            bar.write(_line(_row(rec)))

    done = records[-1]["round"] if records else 0
    bar = tqdm(total=s.rounds, initial=min(done, s.rounds), desc="harden", unit="round", disable=not progress)
    if progress:
        for line in (_line(HEADER), *(_line(_row(r)) for r in records)):
            bar.write(line)
    try:
        if not records:
            measure, seconds = _timed(lambda: _measure(start_model, s, t, dev))
            save_checkpoint(out / "ckpt.pt", start_model, ffl={"harden": {"round": 0}})
            emit({"round": 0, "measure": measure, "seconds": {"measure": seconds}})
        for k in range(done + 1, s.rounds + 1):
            if records and records[-1].get("stopped"):
                break
            rec = _round(k, out, s, t, dev, bar)
            emit(rec)
            bar.update(1)
            _write_plot(result, png=False)
    finally:
        bar.close()
    if records and records[-1].get("stopped"):
        result.stopped = f"stopped at round {records[-1]['round']}: {records[-1]['stopped']}"
    else:
        result.stopped = f"finished {records[-1]['round']} round(s)"
    _write_plot(result, png=png)
    return result


def _timed(fn):
    import time

    t0 = time.perf_counter()
    value = fn()
    return value, round(time.perf_counter() - t0, 3)


def _weights(out: Path, k: int) -> Path:
    """The weights round ``k`` starts from."""
    return out / "start.pt" if k == 1 else out / f"round-{k - 1:03d}" / "train" / "ckpt.pt"


def _round(k: int, out: Path, s: HardenSettings, t: int, dev, bar) -> dict:
    rdir = out / f"round-{k:03d}"
    rdir.mkdir(exist_ok=True)
    current = _weights(out, k)
    model = load_checkpoint(current).model
    bar.set_postfix(round=k, phase="find", refresh=True)
    seconds: dict[str, float] = {}
    plan_path = rdir / "plan.json"
    if plan_path.exists():
        plan = json.loads(plan_path.read_text())
    else:
        prev = out / f"round-{k - 1:03d}" / "plan.json"
        pool = json.loads(prev.read_text())["distributions"] if k > 1 and prev.exists() else []
        plan, seconds["find"] = _timed(lambda: _find(model, k, rdir, s, t, dev, pool))
    find = {key: plan[key] for key in ("glitches", "first_at", "scored", "by_strategy", "best_margin")}
    find["new_distributions"] = plan["new_distributions"]
    if not plan["glitches"]:
        return {
            "round": k,
            "find": find,
            "stopped": f"no verified glitch in {s.budget} sequences",
            "seconds": seconds,
        }
    sources, groups, checks = _sources(plan, s, t)
    cfg = TrainConfig(
        preset="init", init_from=str(current), seq_len=t, steps=s.steps_per_round, batch_size=s.batch_size,
        lr=s.lr, warmup=min(s.warmup, s.steps_per_round), eval_every=0, ckpt_every=s.ckpt_every,
        seed=derive_seed(s.seed, "fix", k) % 2**31, device=str(dev),
    )  # fmt: skip
    bar.set_postfix(round=k, phase="fix", refresh=True)
    _, seconds["fix"] = _timed(
        lambda: train(cfg, rdir / "train", resume=True, progress=False, sources=sources)
    )
    new = load_checkpoint(rdir / "train" / "ckpt.pt").model
    bar.set_postfix(round=k, phase="measure", refresh=True)

    def measure():
        check_seed = derive_seed(s.seed, "targets", k)
        before = _errors_on(model, checks, t, s.target_n, check_seed, dev)
        after = _errors_on(new, checks, t, s.target_n, check_seed, dev)
        targets = [
            {"distribution": label, "before": b, "after": a}
            for (label, _), b, a in zip(checks, before, after)
        ]
        return targets, _measure(new, s, t, dev)

    (targets, measured), seconds["measure"] = _timed(measure)
    save_checkpoint(out / "ckpt.pt", new, ffl={"harden": {"round": k}})
    return {
        "round": k,
        "find": find,
        "fix": {
            "steps": s.steps_per_round,
            "groups": groups,
            "sources": [{"source": src.name, "share": src.share} for src in sources],
        },
        "targets": targets,
        "measure": measured,
        "seconds": seconds,
    }


__all__ = ["HardenResult", "HardenSettings", "harden"]
