"""The glitch finder: search, verify, minimise, diagnose and record attention glitches.

A glitch is a valid flip-flop sequence and a read in it where the model's argmax is not the
last written bit. :func:`find_glitches` runs the search strategies of
:mod:`ffinterp.analysis.search` on the fast model, re-scores every failing read on the
hooked model (the second implementation) and reports only those both agree on, shrinks
each with :mod:`~ffinterp.analysis.minimize`, explains it with
:mod:`~ffinterp.analysis.diagnose`, and appends it to ``glitches.jsonl`` as it is found.

Resuming: work comes in deterministic units (see :mod:`~ffinterp.analysis.search`).
``state.json`` (written atomically after each unit) says which unit comes next; the unit
running at a kill is redone, and glitches it had already written are skipped by their key
(text, read position). A torn last line of the JSONL is dropped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ffinterp.analysis.report import GlitchReport, write_json_atomic
from ffinterp.analysis.search import (
    BudgetSpent,
    Scored,
    SearchContext,
    Strategy,
    read_features,
    resolve_strategies,
)
from ffinterp.errors import FFInterpError
from ffinterp.language import VOCAB, reads, to_text
from ffinterp.scoring import score_tokens

log = logging.getLogger("ffinterp.glitches")

STATE_VERSION = 1
GAP_EDGES = [2**k for k in range(1, 17)]  # gap bins [2,4), [4,8), ... in tokens
DECOY_EDGES = [0, 1, 2, 3, 5, 9, 17, 33, 65, 129]  # decoy bins [0,1), [1,2), [2,3), [3,5) ...


def _bins(values: torch.Tensor, edges: list[int]) -> torch.Tensor:
    return (torch.bucketize(values, torch.tensor(edges), right=True) - 1).clamp(min=0)


def _model_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def as_ffl_model(model, device: str | torch.device = "auto"):
    """An :class:`~ffinterp.hooked.FFLModel` from a path, ``pretrained:NAME``, a fast model or
    an FFLModel."""
    from ffinterp.hooked import FFLModel, load_model

    if isinstance(model, FFLModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_model(model, device=str(device))
    if isinstance(model, nn.Module):
        return FFLModel.from_fast(model, device=device)
    raise FFInterpError(f"find_glitches: expected a checkpoint path or a model, got {type(model).__name__}")


class _Verifier:
    """The second implementation: the hooked model, or a float64 copy of an LSTM."""

    def __init__(self, ffl):
        self.ffl = ffl
        if ffl.hooked is not None:
            self.name = "hooked"
            self.forward = None
        else:
            self.name = "fast-float64"
            self.fast64 = copy.deepcopy(ffl.fast).double().cpu().eval()

    def __call__(self, tokens):
        if self.ffl.hooked is not None:
            return self.ffl.predict_reads(tokens)
        return score_tokens(self.fast64, tokens)


class GlitchFinder:
    """One run of the finder over a model, with its output folder (if any) and state."""

    def __init__(
        self,
        model,
        *,
        strategy: str | Strategy | Sequence[str | Strategy] = "all",
        budget: int = 20_000,
        seed: int = 0,
        device: str | torch.device = "auto",
        out: str | os.PathLike | None = None,
        minimize: bool = True,
        shorten: bool = True,
        diagnose: bool = True,
        resume: bool = False,
        seq_len: int | None = None,
        batch_size: int = 256,
        max_glitches: int = 100,
        progress: bool = False,
    ):
        if budget < 1:
            raise FFInterpError(f"budget must be at least 1 sequence, got {budget}")
        if batch_size < 1:
            raise FFInterpError(f"batch size must be at least 1, got {batch_size}")
        self.ffl = as_ffl_model(model, device)
        self.fast = self.ffl.fast.eval()
        self.device = self.ffl.device
        block = getattr(self.ffl.cfg, "block_size", None)
        self.seq_len = int(seq_len or block or 512)
        if self.seq_len < 4 or self.seq_len % 2:
            raise FFInterpError(f"--seq-len must be an even number >= 4, got {self.seq_len}")
        if block is not None and self.seq_len > block:
            raise FFInterpError(f"--seq-len {self.seq_len} exceeds the model's block size {block}")
        self.strategies = resolve_strategies(strategy)
        self.budget, self.seed, self.batch_size = budget, seed, batch_size
        self.minimize, self.shorten, self.diagnose = minimize, shorten, diagnose
        self.max_glitches, self.progress = max_glitches, progress
        self.out = Path(out) if out is not None else None
        self.verifier = _Verifier(self.ffl)
        self._diagnoser = None
        self.glitches: list[dict] = []
        self.seen: set[tuple[str, int]] = set()
        n = len(self.strategies)
        self.budgets = [budget // n + (1 if k < budget % n else 0) for k in range(n)]
        self.fingerprint = {
            "version": STATE_VERSION,
            "model": _model_digest(self.fast),
            "strategies": [s.params() for s in self.strategies],
            "budget": budget,
            "seed": seed,
            "seq_len": self.seq_len,
            "batch_size": batch_size,
            "minimize": minimize,
            "shorten": shorten,
            "diagnose": diagnose,
            "max_glitches": max_glitches,
        }
        self.state = self._fresh_state()
        if self.out is not None:
            self._open_out(resume)

    # ------------------------------------------------------------ state and files

    def _fresh_state(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "strategies": {
                s.name: {
                    "next_unit": 0,
                    "scored": 0,
                    "grad_evals": 0,
                    "best_margin": None,
                    "done": False,
                    "errors": 0,
                }
                for s in self.strategies
            },
            "gap": {"reads": [0] * len(GAP_EDGES), "errors": [0] * len(GAP_EDGES)},
            "decoys": {"reads": [0] * len(DECOY_EDGES), "errors": [0] * len(DECOY_EDGES)},
            "disagreements": [],
            "minimize_scored": 0,
            "wall_s": 0.0,
        }

    @property
    def jsonl(self) -> Path:
        return self.out / "glitches.jsonl"

    @property
    def state_path(self) -> Path:
        return self.out / "state.json"

    def _open_out(self, resume: bool) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise FFInterpError(f"--out {self.out}: exists and is not a directory")
        self.out.mkdir(parents=True, exist_ok=True)
        started = self.state_path.exists() or (self.jsonl.exists() and self.jsonl.stat().st_size > 0)
        if not resume:
            if started:
                raise FFInterpError(
                    f"{self.out} already holds a glitch search; "
                    "pass --resume to continue it or choose another --out"
                )
            self.jsonl.write_text("")
            return
        if self.state_path.exists():
            try:
                state = json.loads(self.state_path.read_text())
            except json.JSONDecodeError:
                raise FFInterpError(f"{self.state_path}: unreadable state file (not JSON)") from None
            if state.get("fingerprint") != self.fingerprint:
                diff = [
                    k for k in self.fingerprint if state.get("fingerprint", {}).get(k) != self.fingerprint[k]
                ]
                raise FFInterpError(
                    f"{self.out}: cannot resume: the saved search differs in {', '.join(diff)}; "
                    "rerun with the same model and options or choose another --out"
                )
            self.state = state
        self.glitches = read_jsonl(self.jsonl, repair=True) if self.jsonl.exists() else []
        if not self.jsonl.exists():
            self.jsonl.write_text("")
        self.seen = {(g["text"], g["read_pos"]) for g in self.glitches}

    def _save_state(self) -> None:
        if self.out is not None:
            write_json_atomic(self.state_path, self.state)

    def _append(self, record: dict) -> None:
        self.glitches.append(record)
        self.seen.add((record["text"], record["read_pos"]))
        if self.out is not None:
            with open(self.jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, separators=(",", ":")) + "\n")
                f.flush()
                os.fsync(f.fileno())

    # ------------------------------------------------------------ the run

    def run(self) -> GlitchReport:
        """Search with every strategy in turn (each gets an equal share of the budget)."""
        t0 = time.perf_counter()
        wall_before = float(self.state.get("wall_s", 0.0))
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            done = sum(st["scored"] for st in self.state["strategies"].values())
            bar = tqdm(total=self.budget, initial=done, unit="seq", desc="find-glitches", dynamic_ncols=True)
        self._bar = bar
        try:
            for strategy, share in zip(self.strategies, self.budgets):
                if len(self.glitches) >= self.max_glitches:
                    break
                self._run_strategy(strategy, share)
        finally:
            if bar is not None:
                bar.close()
            self.state["wall_s"] = wall_before + time.perf_counter() - t0
            self._save_state()
        report = GlitchReport(self.glitches, self.summary(), model=self.ffl)
        if self.out is not None:
            write_json_atomic(self.out / "summary.json", report.summary)
            report.save_html(self.out / "report.html")
        return report

    def _run_strategy(self, strategy: Strategy, share: int) -> None:
        st = self.state["strategies"][strategy.name]
        if st["done"]:
            return
        ctx = SearchContext(
            self.fast,
            self.seq_len,
            seed=self.seed,
            budget=share,
            batch_size=self.batch_size,
            device=self.device,
            strategy=strategy.name,
            on_scored=lambda sc, origins, record: self._on_scored(strategy, ctx, sc, origins, record),
        )
        ctx.scored, ctx.grad_evals = st["scored"], st["grad_evals"]
        if st["best_margin"] is not None:
            ctx.best_margin = st["best_margin"]
        unit = st["next_unit"]
        while not ctx.done and len(self.glitches) < self.max_glitches:
            before = ctx.scored
            try:
                strategy.run(ctx, unit)
            except BudgetSpent:
                break
            if ctx.scored == before:
                raise FFInterpError(
                    f"internal error: strategy {strategy.name!r} scored nothing in unit {unit}"
                )
            unit += 1
            st.update(
                next_unit=unit,
                scored=ctx.scored,
                grad_evals=ctx.grad_evals,
                best_margin=ctx.best_margin if ctx.best_margin != float("inf") else None,
            )
            self._save_state()
        st.update(
            scored=ctx.scored,
            grad_evals=ctx.grad_evals,
            best_margin=ctx.best_margin if ctx.best_margin != float("inf") else None,
            done=ctx.remaining <= 0 or len(self.glitches) >= self.max_glitches,
        )

    def _on_scored(self, strategy: Strategy, ctx: SearchContext, sc: Scored, origins: list[dict], record):
        st = self.state["strategies"][strategy.name]
        rd, s = sc.scores.reads, sc.scores
        feats = read_features(sc.tokens, rd)
        err = s.error
        st["errors"] += int(err.sum())
        for key, edges in (("gap", GAP_EDGES), ("decoys", DECOY_EDGES)):
            values = feats[key]
            b = _bins(values, edges)
            reads_h = torch.bincount(b, minlength=len(edges)).tolist()
            errs_h = torch.bincount(b[err], minlength=len(edges)).tolist()
            h = self.state[key]
            h["reads"] = [x + y for x, y in zip(h["reads"], reads_h)]
            h["errors"] = [x + y for x, y in zip(h["errors"], errs_h)]
        scored_now = ctx.scored + len(sc.tokens)
        if self._bar is not None:
            self._bar.update(len(sc.tokens))
        if bool(err.any()):
            cands = err.nonzero().flatten()
            if record is not None:
                failing = (sc.min_margin < 0).nonzero().flatten()
                rows = failing[torch.argsort(sc.min_margin[failing], stable=True)][:record].tolist()
                weakest = sc.weakest_pos[rd.batch[cands]] == rd.pos[cands]
                chosen = torch.isin(rd.batch[cands], torch.tensor(rows, dtype=torch.long)) & weakest
                cands = cands[chosen]
            self._consider(strategy, sc, origins, feats, cands, scored_now)
        if self._bar is not None:
            best = min(ctx.best_margin, float(sc.min_margin.min()))
            self._bar.set_postfix(glitches=len(self.glitches), best=f"{best:.3f}", refresh=False)

    def _consider(self, strategy, sc: Scored, origins, feats, cands, scored_now) -> None:
        rd, s = sc.scores.reads, sc.scores
        texts: dict[int, str] = {}
        fresh = []
        for k in cands.tolist():
            row = int(rd.batch[k])
            if row not in texts:
                texts[row] = str(to_text(sc.tokens[row]))
            if (texts[row], int(rd.pos[k])) not in self.seen:
                fresh.append(k)
        if not fresh:
            return
        rows = sorted({int(rd.batch[k]) for k in fresh})
        ver = self.verifier(sc.tokens[rows])
        vkey = {
            (rows[int(b)], int(p)): (int(pr), float(m), float(pc))
            for b, p, pr, m, pc in zip(ver.reads.batch, ver.reads.pos, ver.pred, ver.margin, ver.p_correct)
        }
        for k in fresh:
            if len(self.glitches) >= self.max_glitches:
                return
            row, pos = int(rd.batch[k]), int(rd.pos[k])
            key = (texts[row], pos)
            if key in self.seen:
                continue
            v_pred, v_margin, _ = vkey[(row, pos)]
            if v_pred == int(rd.bit[k]):
                note = {
                    "text": texts[row],
                    "read_pos": pos,
                    "fast_margin": float(s.margin[k]),
                    "verify_margin": v_margin,
                    "strategy": strategy.name,
                }
                log.error("internal error: fast and %s models disagree: %s", self.verifier.name, note)
                self.state["disagreements"].append(note)
                continue
            rec = self._record(strategy, sc, origins, feats, k, texts[row], v_pred, v_margin, scored_now)
            self._append(rec)

    def _record(self, strategy, sc, origins, feats, k, text, v_pred, v_margin, scored_now) -> dict:
        rd, s = sc.scores.reads, sc.scores
        row, pos = int(rd.batch[k]), int(rd.pos[k])
        rec = {
            "id": len(self.glitches),
            "text": text,
            "read_pos": pos,
            "expected": VOCAB[int(rd.bit[k])],
            "prediction": VOCAB[int(s.pred[k])],
            "p_correct": float(s.p_correct[k]),
            "margin": float(s.margin[k]),
            "verified_by": self.verifier.name,
            "verify_prediction": VOCAB[v_pred],
            "verify_margin": v_margin,
            "last_write_pos": int(rd.write_pos[k]),
            "gap": int(feats["gap"][k]),
            "decoys": int(feats["decoys"][k]),
            "writes": int(feats["writes"][k]),
            "seq_len": self.seq_len,
            "strategy": strategy.name,
            "seed": self.seed,
            "origin": origins[row] if row < len(origins) else {},
            "scored_at": scored_now,
            "minimized": None,
            "diagnosis": None,
        }
        tokens = sc.tokens[row]
        if self.minimize:
            rec["minimized"] = self._minimize(tokens, pos)
        if self.diagnose:
            rec["diagnosis"] = self._diagnose(tokens, pos)
        return rec

    def _minimize(self, tokens, pos) -> dict:
        from ffinterp.analysis.minimize import minimize

        m = minimize(
            self.fast, tokens, pos, shorten=self.shorten, device=self.device, batch_size=self.batch_size
        )
        self.state["minimize_scored"] += m.scored
        out = m.to_dict()
        ver = self.verifier(torch.as_tensor(_tokens(m.text))[None])
        at = (ver.reads.pos == m.read_pos).nonzero().flatten()
        if len(at):
            j = int(at[0])
            out["verified"] = bool(ver.pred[j] != ver.reads.bit[j])
            out["verify_margin"] = float(ver.margin[j])
        return out

    def _diagnose(self, tokens, pos) -> dict | None:
        if self.ffl.hooked is None:
            return {"label": "n/a", "note": "the model has no attention to diagnose (LSTM)"}
        from ffinterp.analysis.diagnose import Diagnoser

        if self._diagnoser is None:
            self._diagnoser = Diagnoser(self.ffl, seq_len=self.seq_len, seed=self.seed)
        return self._diagnoser.diagnose(tokens, pos)

    # ------------------------------------------------------------ results

    def summary(self) -> dict:
        st = self.state
        total = sum(s["scored"] for s in st["strategies"].values())
        per = {}
        for s in self.strategies:
            d = dict(st["strategies"][s.name])
            mine = [g["scored_at"] for g in self.glitches if g["strategy"] == s.name]
            d["glitches"] = len(mine)
            d["first_glitch_at"] = min(mine, default=None)
            d["params"] = s.params()
            per[s.name] = d
        mins = [g["minimized"]["length"] for g in self.glitches if g.get("minimized")]
        return {
            "model": self.ffl.name,
            "model_sha256": self.fingerprint["model"],
            "seq_len": self.seq_len,
            "seed": self.seed,
            "budget": self.budget,
            "device": str(self.device),
            "scored": total,
            "glitches": len(self.glitches),
            "distinct_minimized": len({g["minimized"]["text"] for g in self.glitches if g.get("minimized")}),
            "mean_minimized_length": (sum(mins) / len(mins)) if mins else None,
            "best_margin": min(
                (s["best_margin"] for s in st["strategies"].values() if s["best_margin"] is not None),
                default=None,
            ),
            "strategies": per,
            "minimize_scored": st["minimize_scored"],
            "verified_by": self.verifier.name,
            "disagreements": len(st["disagreements"]),
            "disagreement_examples": st["disagreements"][:10],
            "rate_by_gap": _rates(st["gap"], GAP_EDGES),
            "rate_by_decoys": _rates(st["decoys"], DECOY_EDGES),
            "wall_s": st["wall_s"],
            "max_glitches": self.max_glitches,
        }


def _rates(h: dict, edges: list[int]) -> list[dict]:
    out = []
    for k, lo in enumerate(edges):
        hi = edges[k + 1] if k + 1 < len(edges) else None
        n, e = h["reads"][k], h["errors"][k]
        if n:
            out.append({"lo": lo, "hi": hi, "reads": n, "errors": e, "rate": e / n})
    return out


def _tokens(text: str):
    from ffinterp.language import from_text

    return from_text(text)


def read_jsonl(path: str | os.PathLike, *, repair: bool = False) -> list[dict]:
    """Every glitch in a ``glitches.jsonl``. A torn last line (a kill mid-write) is dropped,
    and with ``repair`` cut from the file; a bad line elsewhere is an error."""
    path = Path(path)
    data = path.read_bytes()
    lines = data.split(b"\n")
    good_end = 0
    out = []
    pos = 0
    for k, line in enumerate(lines):
        end = pos + len(line) + 1
        last = k == len(lines) - 1
        if line.strip():
            try:
                rec = json.loads(line)
                if last:  # no newline after it: written partially, or not flushed whole
                    raise ValueError
            except ValueError:
                if last or all(not x.strip() for x in lines[k + 1 :]):
                    break
                raise FFInterpError(f"{path}:{k + 1}: corrupt line in the middle of the file") from None
            out.append(rec)
        good_end = min(end, len(data))
        pos = end
    if repair and good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return out


def find_glitches(
    model,
    strategy: str | Strategy | Sequence[str | Strategy] = "all",
    budget: int = 20_000,
    *,
    seed: int = 0,
    device: str | torch.device = "auto",
    out: str | os.PathLike | None = None,
    minimize: bool = True,
    shorten: bool = True,
    diagnose: bool = True,
    resume: bool = False,
    seq_len: int | None = None,
    batch_size: int = 256,
    max_glitches: int = 100,
    progress: bool = False,
) -> GlitchReport:
    """Search ``model`` for attention glitches and return a :class:`GlitchReport`.

    ``model`` is a checkpoint path, ``pretrained:NAME``, a fast GPT/LSTM or an
    :class:`~ffinterp.hooked.FFLModel`. ``strategy`` is ``"all"``, a registered name, a
    :class:`~ffinterp.analysis.search.Strategy` or a list; ``budget`` counts sequences scored
    on the fast model, shared equally. With ``out``, glitches are appended to
    ``out/glitches.jsonl`` as found and ``summary.json`` and ``report.html`` are written at the
    end; ``resume`` continues a killed run there. The same seed on the same device gives the
    same glitches.
    """
    return GlitchFinder(
        model,
        strategy=strategy,
        budget=budget,
        seed=seed,
        device=device,
        out=out,
        minimize=minimize,
        shorten=shorten,
        diagnose=diagnose,
        resume=resume,
        seq_len=seq_len,
        batch_size=batch_size,
        max_glitches=max_glitches,
        progress=progress,
    ).run()


__all__ = ["GlitchFinder", "GlitchReport", "find_glitches", "read_jsonl", "reads"]
