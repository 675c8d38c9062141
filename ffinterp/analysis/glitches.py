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

Under ``torchrun`` (see :mod:`ffinterp.distributed`) the search runs in *rounds*: in a
round starting at unit ``u`` rank ``r`` runs unit ``u + r``, then rank 0 gathers every
rank's glitches and counters, merges them in unit order (dedup, ``max_glitches``), alone
appends to the JSONL and saves the state, and broadcasts the agreed state. With one process
a round is one unit, so the single-process run is the same loop. Sampling strategies have
a fixed cost per unit, so a unit starts at the same place in its stream whoever runs it:
the glitches and counts are those of one process for any world size, and ``next_unit``
means the same for any world size, so ``--resume`` may use another one. Searches that stop
early (evolve, gradient) split the budget left evenly each round and seed restarts with the
best candidates every rank found in the last round (island-model migration).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ffinterp import distributed
from ffinterp.analysis import adversary  # noqa: F401  (registers the "distribution" strategy)
from ffinterp.analysis.report import GlitchReport, write_json_atomic
from ffinterp.analysis.search import (
    BudgetSpent,
    Scored,
    SearchContext,
    Strategy,
    read_features,
    resolve_strategies,
)
from ffinterp.checkpoints import model_digest
from ffinterp.errors import FFInterpError
from ffinterp.language import VOCAB, from_text, reads, to_text
from ffinterp.scoring import score_tokens
from ffinterp.text import count

log = logging.getLogger("ffinterp.glitches")

STATE_VERSION = 1
GAP_EDGES = [2**k for k in range(1, 17)]  # gap bins [2,4), [4,8), ... in tokens
DECOY_EDGES = [0, 1, 2, 3, 5, 9, 17, 33, 65, 129]  # decoy bins [0,1), [1,2), [2,3), [3,5) ...
# How the CLI spells the arguments the errors below name (FFInterpError.for_cli).
OUT = {"another out=": "another --out", "out=": "--out "}  # replaced in this order
SEQ_LEN = {"seq_len": "--seq-len"}


def _bins(values: torch.Tensor, edges: list[int]) -> torch.Tensor:
    return (torch.bucketize(values, torch.tensor(edges), right=True) - 1).clamp(min=0)


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
        dist: distributed.Dist | None = None,
    ):
        self.dist = dist if dist is not None else distributed.current()
        if budget < 1:
            raise FFInterpError(f"budget must be >= 1, got {budget}")
        if batch_size < 1:
            raise FFInterpError(f"batch_size must be >= 1, got {batch_size}")
        self.ffl = as_ffl_model(model, device)
        self.fast = self.ffl.fast.eval()
        self.device = self.ffl.device
        block = getattr(self.ffl.cfg, "block_size", None)
        self.seq_len = int(seq_len or block or 512)
        if self.seq_len < 4 or self.seq_len % 2:
            raise FFInterpError(f"seq_len must be an even number >= 4, got {self.seq_len}", flags=SEQ_LEN)
        if block is not None and self.seq_len > block:
            raise FFInterpError(
                f"seq_len {self.seq_len} exceeds the model's block size {block}", flags=SEQ_LEN
            )
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
        fingerprint = {
            "version": STATE_VERSION,
            "model": model_digest(self.fast),
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
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back (tuples -> lists)
        self.state = self._fresh_state()
        if self.out is not None:
            self._open_shared_out(resume)

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
            raise FFInterpError(f"out={self.out}: exists and is not a directory", flags=OUT)
        with _writing(self.out):
            self.out.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            with _writing(self.out):
                self._open_out_locked(resume)
        except BaseException:
            self._release_lock()
            raise

    def _take_lock(self) -> None:
        """Hold ``out/.lock`` for the run: a second search writing the same files would
        interleave lines and clobber the state, so it is refused instead."""
        import fcntl

        with _writing(self.out):
            lock = open(self.out / ".lock", "a")  # noqa: SIM115 - held until the run ends
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise FFInterpError(
                f"out={self.out}: another find-glitches run is writing there ({self.out / '.lock'} is "
                "held); wait for it to finish or choose another out=",
                flags=OUT,
            ) from None
        self._lock = lock

    def _release_lock(self) -> None:
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.close()  # closing the file drops the flock

    def __del__(self) -> None:
        self._release_lock()

    def _open_out_locked(self, resume: bool) -> None:
        started = self.state_path.exists() or (self.jsonl.exists() and self.jsonl.stat().st_size > 0)
        if not resume:
            if started:
                raise FFInterpError(
                    f"{self.out} already holds a glitch search; "
                    "pass resume=True to continue it or choose another out=",
                    flags={"resume=True": "--resume", **OUT},
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
                    "rerun with the same model and options or choose another out=",
                    flags=OUT,
                )
            self.state = state
        self.glitches = read_jsonl(self.jsonl, repair=True) if self.jsonl.exists() else []
        if not self.jsonl.exists():
            self.jsonl.write_text("")
        self.seen = {(g["text"], g["read_pos"]) for g in self.glitches}

    def _open_shared_out(self, resume: bool) -> None:
        """Rank 0 alone opens (or resumes) the output folder; the others adopt its state."""
        if not self.dist.active:
            self._open_out(resume)
            return
        error = None
        if self.dist.is_main:
            try:
                self._open_out(resume)
            except FFInterpError as e:
                error = e
        self.dist.agree(error)
        self.state, self.glitches = self.dist.broadcast((self.state, self.glitches))
        self.seen = {(g["text"], g["read_pos"]) for g in self.glitches}

    def _save_state(self) -> None:
        if self.out is not None and self.dist.is_main:
            with _writing(self.state_path):
                write_json_atomic(self.state_path, self.state)

    def _append(self, record: dict) -> None:
        self.glitches.append(record)
        self.seen.add((record["text"], record["read_pos"]))
        if not self.dist.active:  # several ranks: rank 0 writes the merged round (_write)
            self._write(record)

    def _write(self, record: dict) -> None:
        """Append one whole line to the JSONL and fsync it (a kill leaves at most a torn
        last line, which resuming drops)."""
        if self.out is not None:
            line = json.dumps(record, separators=(",", ":")) + "\n"
            with _writing(self.jsonl), open(self.jsonl, "a", encoding="utf-8") as f:
                size = f.tell()
                try:
                    f.write(line)
                    f.flush()
                    os.fsync(f.fileno())
                except OSError:  # a full disk: cut the torn line, so the file stays whole lines
                    with contextlib.suppress(OSError):
                        f.truncate(size)
                    raise

    # ------------------------------------------------------------ the run

    def run(self) -> GlitchReport:
        """Search with every strategy in turn (each gets an equal share of the budget)."""
        t0 = time.perf_counter()
        wall_before = float(self.state.get("wall_s", 0.0))
        bar = None
        if self.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            done = sum(st["scored"] for st in self.state["strategies"].values())
            bar = tqdm(total=self.budget, initial=done, unit="seq", desc="find-glitches", dynamic_ncols=True)
        self._bar = bar
        # On an exception the state file keeps the last unit boundary (written by
        # _run_strategy); saving the live state here would count a half unit twice.
        try:
            try:
                for strategy, share in zip(self.strategies, self.budgets):
                    if len(self.glitches) >= self.max_glitches:
                        break
                    self._run_strategy(strategy, share)
                if bar is not None and bar.n < bar.total:  # finished early: say why, not an ETA
                    bar.total = bar.n
                    full = len(self.glitches) >= self.max_glitches
                    asked = count(self.max_glitches, "glitch")
                    why = f"found the {asked} asked for" if full else "every strategy finished early"
                    bar.set_postfix_str(f"stopped: {why}", refresh=True)
            finally:
                if bar is not None:
                    bar.close()
            self.state["wall_s"] = wall_before + time.perf_counter() - t0
            self._save_state()
            report = GlitchReport(self.glitches, self.summary(), model=self.ffl)
            if self.out is not None and self.dist.is_main:
                with _writing(self.out / "summary.json"):
                    write_json_atomic(self.out / "summary.json", report.summary)
                with _writing(self.out / "report.html"):
                    report.save_html(self.out / "report.html")
        finally:
            self._release_lock()
        return report

    def _run_strategy(self, strategy: Strategy, share: int) -> None:
        """Rounds of one unit per rank (one unit in a single process) until the strategy's
        share of the budget is spent or ``max_glitches`` are found."""
        if self.state["strategies"][strategy.name]["done"]:
            return
        d = self.dist
        elites: list[tuple[float, str]] = []

        def on_scored(sc: Scored, origins: list[dict], record: int | None) -> None:
            if track:
                _keep_best(elites, sc)
            self._on_scored(strategy, ctx, sc, origins, record)

        ctx = SearchContext(
            self.fast,
            self.seq_len,
            seed=self.seed,
            budget=share,
            batch_size=self.batch_size,
            device=self.device,
            strategy=strategy.name,
            on_scored=on_scored,
        )
        cost = strategy.unit_cost(ctx)
        track = d.active and cost is None  # searches that stop early exchange their best
        while not self.state["strategies"][strategy.name]["done"]:
            st = self.state["strategies"][strategy.name]
            unit = st["next_unit"] + d.rank
            agreed, n0 = copy.deepcopy(self.state), len(self.glitches)
            if cost is not None:  # a fixed-cost unit starts where one process would start it
                ctx.scored, ctx.budget = unit * cost, share
            else:  # an even split of the budget left
                left = share - st["scored"]
                ctx.scored = st["scored"]
                ctx.budget = st["scored"] + left // d.world_size + int(d.rank < left % d.world_size)
            ctx.grad_evals, ctx.stopped = st["grad_evals"], False
            ctx.best_margin = float("inf") if st["best_margin"] is None else st["best_margin"]
            ctx.migrants = self._migrants(strategy.name) if track else None
            elites.clear()
            ctx.findings = []
            start, grads = ctx.scored, ctx.grad_evals
            if not ctx.done and len(self.glitches) < self.max_glitches:
                try:
                    strategy.run(ctx, unit)
                except BudgetSpent:
                    pass
                else:
                    if ctx.scored == start:
                        raise FFInterpError(
                            f"internal error: strategy {strategy.name!r} scored nothing in unit {unit}"
                        )
            mine = {
                "unit": unit,
                "scored": ctx.scored - start,
                "grad_evals": ctx.grad_evals - grads,
                "best_margin": ctx.best_margin,
                "state": self.state,
                "records": self.glitches[n0:],
                "elites": list(elites),
                "findings": ctx.findings,
            }
            if d.active:  # back to the agreed state; rank 0 merges everyone's round into it
                self.state, self.glitches = agreed, self.glitches[:n0]
            results = d.gather(mine)  # every rank sends; rank 0 alone gets the list
            merged = self._merge_round(strategy, share, agreed, n0, results) if d.is_main else None
            self._adopt(d.broadcast(merged), n0)

    def _merge_round(self, strategy: Strategy, share: int, base: dict, n0: int, results: list[dict]) -> dict:
        """Rank 0: fold a round's units into the agreed state in unit order, as one process
        would have run them: glitches deduplicated and renumbered, counts added, and nothing
        after the unit that reached ``max_glitches``."""
        state = copy.deepcopy(base)
        st = state["strategies"][strategy.name]
        kept = self.glitches[:n0]
        seen = {(g["text"], g["read_pos"]) for g in kept}
        accepted: list[dict] = []
        elites: list[tuple[float, str]] = []
        for res in sorted(results, key=lambda r: r["unit"]):
            if res["scored"] == 0:
                continue
            _add_counts(state, base, res["state"])
            st["scored"] += res["scored"]
            st["grad_evals"] += res["grad_evals"]
            st["next_unit"] = res["unit"] + 1
            if res["best_margin"] != float("inf"):
                st["best_margin"] = min(res["best_margin"], st["best_margin"] or float("inf"))
            elites += res["elites"]
            if res.get("findings"):
                st.setdefault("findings", []).extend(res["findings"])
            for rec in res["records"]:
                key = (rec["text"], rec["read_pos"])
                if len(kept) + len(accepted) >= self.max_glitches:
                    break
                if key not in seen:
                    seen.add(key)
                    accepted.append({**rec, "id": n0 + len(accepted)})
            if len(kept) + len(accepted) >= self.max_glitches:
                break
        st["done"] = st["scored"] >= share or len(kept) + len(accepted) >= self.max_glitches
        if "minimize_scored" in state:  # the kept glitches' cost, not that of dropped duplicates
            spent = sum((r.get("minimized") or {}).get("scored", 0) for r in accepted)
            state["minimize_scored"] = base["minimize_scored"] + spent
        if self.dist.active:
            shard = state.setdefault("shard", {"world_size": self.dist.world_size, "migrants": {}})
            shard["world_size"] = self.dist.world_size
            if elites:
                best = {text: m for m, text in sorted(elites, reverse=True)}  # text -> lowest margin
                shard["migrants"][strategy.name] = sorted(best.items(), key=lambda tm: tm[1])[:MIGRANTS]
        return {"state": state, "records": accepted}

    def _adopt(self, merged: dict, n0: int) -> None:
        """Every rank: take the agreed state of the round; rank 0 writes it (lines first, then
        the state, so a kill in between only makes the resumed round skip known glitches)."""
        self.state = merged["state"]
        self.glitches = self.glitches[:n0] + merged["records"]
        self.seen = {(g["text"], g["read_pos"]) for g in self.glitches}
        if self.dist.active and self.dist.is_main:
            for rec in merged["records"]:
                self._write(rec)
        self._save_state()
        if getattr(self, "_bar", None) is not None:
            self._bar.n = sum(s["scored"] for s in self.state["strategies"].values())
            self._bar.refresh()

    def _migrants(self, name: str):
        texts = self.state.get("shard", {}).get("migrants", {}).get(name)
        return from_text([t for t, _ in texts]) if texts else None

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
        scored_now = ctx.scored  # already counts this batch
        distributed.check_stop()  # a SIGTERM stops the search here, between batches
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
            # position in the strategy's stream: the sequences scored up to and including
            # this one, as if scored one at a time (ctx.scored already counts the batch)
            "scored_at": scored_now - len(sc.tokens) + row + 1,
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
            self._diagnoser = Diagnoser(self.ffl, seq_len=self.seq_len)
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
            # the table's best row; the most negative margin among all reads scored (kept or
            # not, verified or not) is named apart
            "best_margin": min((g["margin"] for g in self.glitches), default=None),
            "best_margin_scored": min(
                (s["best_margin"] for s in st["strategies"].values() if s["best_margin"] is not None),
                default=None,
            ),
            "kept": (
                f"the first {self.max_glitches} verified glitches in search order (max_glitches reached); "
                "the table sorts them by margin"
                if len(self.glitches) >= self.max_glitches
                else "every verified glitch found"
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
            "read_heads": self._diagnoser.ref.detection if self._diagnoser is not None else None,
        }


def _rates(h: dict, edges: list[int]) -> list[dict]:
    out = []
    for k, lo in enumerate(edges):
        hi = edges[k + 1] if k + 1 < len(edges) else None
        n, e = h["reads"][k], h["errors"][k]
        if n:
            out.append({"lo": lo, "hi": hi, "reads": n, "errors": e, "rate": e / n})
    return out


MIGRANTS = 8  # best candidates each rank's evolve/gradient restarts share per round


def _is_count(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _add_counts(into: dict, base: dict, after: dict) -> None:
    """Add what one unit counted (``after`` minus ``base``) into ``into``: numbers and
    fixed-length lists of numbers add up, other lists gain the unit's new items, the rest
    (flags, fingerprints) is left alone. Generic, so new counters merge without changes here."""
    for key, a in after.items():
        b = base.get(key)
        if key not in base:
            into[key] = copy.deepcopy(a)
        elif isinstance(b, dict) and isinstance(a, dict):
            _add_counts(into[key], b, a)
        elif _is_count(a) and _is_count(b):
            into[key] += a - b
        elif isinstance(a, list) and isinstance(b, list):
            if a and len(a) == len(b) and all(_is_count(x) for x in a + b):
                into[key] = [x + y - z for x, y, z in zip(into[key], a, b)]
            else:
                into[key] = into[key] + copy.deepcopy(a[len(b) :])


def _keep_best(elites: list[tuple[float, str]], sc: Scored) -> None:
    """Remember a batch's lowest-margin rows that are not glitches yet: what migrates."""
    ok = (sc.min_margin >= 0).nonzero().flatten()
    if len(ok):
        best = ok[torch.argsort(sc.min_margin[ok], stable=True)][:MIGRANTS]
        elites += [(float(sc.min_margin[r]), str(to_text(sc.tokens[r]))) for r in best.tolist()]
        elites.sort()
        del elites[4 * MIGRANTS :]


@contextlib.contextmanager
def _writing(path: Path):
    """Turn a failed write (full disk, no permission, a file where a folder should be) into one
    line naming ``path``, and remove the temp file an atomic write of ``path`` left behind."""
    try:
        yield
    except OSError as e:
        with contextlib.suppress(OSError):
            path.with_name(f".{path.name}.tmp{os.getpid()}").unlink(missing_ok=True)
        raise FFInterpError(f"{path}: cannot write ({e.strerror or type(e).__name__})") from None


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
    dist: distributed.Dist | None = None,
) -> GlitchReport:
    """Search ``model`` for attention glitches and return a :class:`GlitchReport`.

    ``model`` is a checkpoint path, ``pretrained:NAME``, a fast GPT/LSTM or an
    :class:`~ffinterp.hooked.FFLModel`. ``strategy`` is ``"all"``, a registered name, a
    :class:`~ffinterp.analysis.search.Strategy` or a list; ``budget`` counts sequences scored
    on the fast model, shared equally. With ``out``, glitches are appended to
    ``out/glitches.jsonl`` as found and ``summary.json`` and ``report.html`` are written at the
    end; ``resume`` continues a killed run there. The same seed on the same device gives the
    same glitches. Under ``torchrun`` (``dist``: default :func:`ffinterp.distributed.current`)
    every rank calls this; the ranks share the work and rank 0 alone writes ``out``.
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
        dist=dist,
    ).run()


__all__ = ["GlitchFinder", "GlitchReport", "find_glitches", "read_jsonl", "reads"]
