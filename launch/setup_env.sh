#!/usr/bin/env bash
# Create .venv on Python >= 3.12 and install the project's dependencies: torch 2.13.0 first (PyPI's build; it
# runs on the CPU too), then `pip install .[extras]` (megatron-core 0.19.2 and the rest, setup.cfg). The project
# installs no packages: its code runs from this checkout (README.md, "Why no importable package").
# Idempotent: a second run only checks. Usage: `bash launch/setup_env.sh [extras]` (default: test);
# PYTHON=/path/to/python3.12 picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-test}"

is_312() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; }

find_python() {  # 3.12 first (the release megatron-core 0.19.2 ships wheels for), then newer
  local c
  for c in "${PYTHON:-}" python3.12 python3 python3.13; do
    [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && is_312 "$c" && { command -v "$c"; return; }
  done
  if command -v pyenv >/dev/null 2>&1; then  # pyenv keeps versions it does not put on PATH
    for c in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -V -r) \
             $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[3-9])(\.[0-9]+)?$' | sort -V); do
      c="$(pyenv root)/versions/$c/bin/python3"
      is_312 "$c" && { echo "$c"; return; }
    done
  fi
  return 1
}

if [ -x .venv/bin/python ] && ! is_312 .venv/bin/python; then
  echo "setup_env: .venv is not Python >= 3.12; making it again"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  PY=$(find_python) || {
    echo "setup_env: no Python >= 3.12 found (PATH, pyenv): install one (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12" >&2
    exit 1
  }
  "$PY" -m venv .venv
fi
STAMP=".venv/.installed-$(cat setup.cfg pyproject.toml launch/setup_env.sh | sha256sum | cut -c1-16)-$EXTRAS"
if [ ! -f "$STAMP" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, pinned (setup.cfg allows 2.13.x): an unpinned torch would pull whatever release is newest.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q ".[$EXTRAS]"
  touch "$STAMP"
fi
