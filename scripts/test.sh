#!/usr/bin/env bash
# Set up and run the whole test suite (what CI runs):
#   1. the default environment (.venv, TransformerLens 4.x): every test and notebook;
#   2. a second environment (.venv-tl3) with TransformerLens 3.x: the tests marked `tl3`
#      (hooked model, attention, patching), which must pass on both lines.
# Extra arguments go to the first pytest run only.
set -euo pipefail
cd "$(dirname "$0")/.."
TL3=${FFINTERP_TL3:-transformer-lens==3.9.0}
# Two pytest workers share the machine's cores: one BLAS/OpenMP thread each unless told
# otherwise, so the workers do not oversubscribe a 2-core machine.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

bash scripts/setup.sh
.venv/bin/ruff check ffinterp tests benchmarks
# Notebooks run too (through nbmake) once any are committed.
notebooks=()
if compgen -G "notebooks/*.ipynb" >/dev/null; then notebooks=(--nbmake --nbmake-timeout=900 notebooks); fi  # a cell may take minutes beside busy workers
.venv/bin/python -m pytest -n 2 tests "${notebooks[@]}" "$@"

echo "test.sh: TransformerLens 3.x environment (.venv-tl3, $TL3)" >&2
FFINTERP_VENV=.venv-tl3 FFINTERP_TRANSFORMER_LENS="$TL3" FFINTERP_NO_CHROMIUM=1 bash scripts/setup.sh
.venv-tl3/bin/python -c 'import ffinterp.tl_seam as s; assert not s.IS_BRIDGE, s.TL_LINE; print(s.TL_LINE)'
# Exit 5 (nothing collected) would mean the tl3 marker lost its tests: fail loudly instead.
rc=0
.venv-tl3/bin/python -m pytest -n 2 -m tl3 tests || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: no tests marked tl3 were collected in .venv-tl3; the TransformerLens 3.x run must test something" >&2
  exit 1
fi
exit "$rc"
