#!/usr/bin/env bash
# Create .venv and install the project's dependencies (CPU torch from this machine's local wheel, then the
# rest). The project installs no packages: its code runs from this checkout (README.md, "Why no importable
# package"), so a plain, non-editable install is all there is to it.
# Idempotent: a second run only checks. Usage: source-free; `bash launch/setup_env.sh [extras]`.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-test}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
STAMP=".venv/.installed-$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)-$EXTRAS"
if [ ! -f "$STAMP" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q ".[$EXTRAS]"
  touch "$STAMP"
fi
