#!/usr/bin/env bash
# Set up the environment (idempotent) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh test,deepspeed
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
exec .venv/bin/python -m pytest -q "$@"
