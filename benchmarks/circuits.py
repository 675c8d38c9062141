"""The read circuit of every shipped transformer, written to docs/circuits.json.

    python benchmarks/circuits.py            # all shipped transformers, 32 pairs each
    python benchmarks/circuits.py --n 64 --models glitchy-512,mixture-512

For each model: the heads named by effect (patching each head's output at the read from clean
into last-write-flipped runs, on the model's own length), where they look by offset from the
last write, the companion heads (needed, carrying no bit), and the path-patching summary of
how the bit reaches the read head. ``benchmarks/results_table.py`` renders it per model in
docs/results.md. Prints one block per model and the seconds it took.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ffinterp.analysis.readheads import detect_read_heads
from ffinterp.hooked import load_model
from ffinterp.pretrained import index

OUT = Path(__file__).parents[1] / "docs" / "circuits.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=32, help="Sequences (one flipped pair each) per set.")
    ap.add_argument("--models", default="", help="Comma-separated names (default: every transformer).")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    names = [m["name"] for m in index() if m["arch"] != "lstm"]
    if args.models:
        names = [n for n in args.models.split(",") if n]
    out = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name in names:
        t0 = time.perf_counter()
        model = load_model(f"pretrained:{name}", device="cpu")
        rh = detect_read_heads(model, "in", "sparse", n=args.n)
        entry = rh.to_dict() | {"stable": rh.stable, "check": rh.check, "table": rh.table()}
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        out[name] = entry
        print(f"== {name} ({entry['seconds']} s)\n{rh.table()}\n", flush=True)
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
