"""Fuzz every CLI command and file reader with the generators of ``tests/fuzzing.py`` and print,
per command or reader: inputs tried, clean refusals, accepted inputs and contract breaks
(tracebacks above all, which must be 0).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fuzz.py [--examples 300] [--suite validate ...]
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fuzzing  # noqa: E402
import torch  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def run_suite(suite: str, base: dict, tmp: Path, examples: int, skip_known: bool) -> dict:
    """Counts for one suite; the first few contract breaks are kept for printing."""
    counts = collections.Counter()
    breaks: list[str] = []

    @fuzzing.fuzz_settings(examples)
    @given(data=st.data())
    def fuzz(data):
        case = data.draw(fuzzing.cases(suite, base, tmp, skip_known))
        outcome, problem = fuzzing.check(case)
        counts["tried"] += 1
        if outcome.crash is not None or "Traceback" in outcome.err:
            counts["tracebacks"] += 1
        if problem is None:
            counts["refused" if outcome.code == 2 else "accepted"] += 1
        else:
            counts["broken"] += 1
            if len(breaks) < 5:
                breaks.append(f"{case.kind}: {problem.splitlines()[-1] if outcome.crash else problem}"[:400])

    fuzz()
    return {"counts": counts, "breaks": breaks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=300, help="inputs per suite")
    parser.add_argument("--suite", action="append", choices=fuzzing.SUITES, help="default: all")
    parser.add_argument("--all", action="store_true", help="also the flags in fuzzing.KNOWN_OPEN")
    parser.add_argument(
        "--memory-gb", type=float, default=8.0, help="address-space cap: a bomb fails, not the host"
    )
    args = parser.parse_args()
    cap = int(args.memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base = fuzzing.build_artifacts(tmp / "base")
        print(
            f"{'command / reader':<18}{'tried':>7}{'refused':>9}{'accepted':>10}{'broken':>8}"
            f"{'tracebacks':>12}{'s':>7}"
        )
        total = collections.Counter()
        for suite in args.suite or fuzzing.SUITES:
            t0 = time.perf_counter()
            r = run_suite(suite, base, tmp / suite.replace(" ", "_"), args.examples, not args.all)
            c = r["counts"]
            total.update(c)
            print(
                f"{suite:<18}{c['tried']:>7}{c['refused']:>9}{c['accepted']:>10}{c['broken']:>8}"
                f"{c['tracebacks']:>12}{time.perf_counter() - t0:>7.1f}",
                flush=True,
            )
            for b in r["breaks"]:
                print(f"    ! {b}", flush=True)
        print(
            f"{'total':<18}{total['tried']:>7}{total['refused']:>9}{total['accepted']:>10}{total['broken']:>8}"
            f"{total['tracebacks']:>12}"
        )
    sys.exit(1 if total["broken"] else 0)


if __name__ == "__main__":
    main()
