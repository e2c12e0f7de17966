#!/usr/bin/env bash
# Set up the environment (idempotent) and run the test suite on CPU: all of it (what CI runs), or with
# --quick the unit tests only (`-m "not integration"`: every package, in under 5 minutes on 2 cores).
# Other arguments go to pytest:  bash launch/test.sh --quick tests/model -x
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
for a in "$@"; do
  if [ "$a" = "--quick" ]; then args+=(-m "not integration"); else args+=("$a"); fi
done
bash launch/setup_env.sh test,deepspeed
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
exec .venv/bin/python -m pytest -q "${args[@]}"
