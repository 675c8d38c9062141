#!/usr/bin/env bash
# One-time (idempotent) set-up on a fresh machine with Python 3.11:
#   - a virtual environment in .venv with the pinned CPU build of torch pre-installed
#     (override with FFINTERP_TORCH, e.g. FFINTERP_TORCH="torch==2.14.1" for a CUDA build),
#   - ffinterp with its test extras,
#   - with FFINTERP_TRANSFORMER_LENS (e.g. "transformer-lens==3.9.0"), that TransformerLens
#     pinned in place of the newest one ffinterp's range allows (FFINTERP_VENV picks the folder),
#   - Debian's chromium for kaleido's PNG/SVG export and the offline-HTML browser test
#     (skipped when not root or apt-get is missing; set FFINTERP_NO_CHROMIUM=1 to skip).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${FFINTERP_VENV:-.venv}
TORCH=${FFINTERP_TORCH:-torch==2.13.0}
TL=${FFINTERP_TRANSFORMER_LENS:-}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH"
if [ -n "$TL" ]; then
  "$VENV/bin/python" -m pip install -q "$TL"
fi
# Repeat the TransformerLens pin here so resolving ffinterp's own range can never move it.
"$VENV/bin/python" -m pip install -q -e ".[test]" ${TL:+"$TL"}

if [ -z "${FFINTERP_NO_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's chromium for PNG/SVG export" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; PNG/SVG export tests will fail" >&2
  else
    echo "setup: chromium not found and cannot apt-get it; PNG/SVG export needs it" >&2
  fi
fi
