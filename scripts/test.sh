#!/usr/bin/env bash
# Set up and run the whole test suite (what CI runs):
#   1. the default environment (.venv, TransformerLens 4.x): every test and notebook;
#   2. a second environment (.venv-tl3) with TransformerLens 3.x: the hooked-model,
#      attention and patching tests, which must pass on both lines.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check ffinterp tests benchmarks
.venv/bin/python -m pytest -n 2 tests "$@"
