#!/usr/bin/env bash
# The GPU check: every test marked `gpu` (each beside the code it tests: TE in bf16 and each FP8 recipe, the local
# backend on CUDA, resume with TE's fused Adam and the distributed optimizer, HF import -> TE run and
# back, export --verify with the model on CUDA, recompute and grouped GEMM with TE, tools/bench.py on
# glm5-proxy at seq 4096 in bf16 and FP8 blockwise, the CUDA memory tags and nsys profiler ranges) on one
# GPU, in under 8 minutes.
#   bash launch/gpu_check.sh [extra pytest args]        (PYTHON=... picks the interpreter)
# First installs what is missing: Transformer Engine, megatron-core, webdataset, pytest -- from PyPI,
# or offline from the wheels launch/gpu_prepare.sh put in .device/te/ (or a flat directory TE_CACHE,
# e.g. /tmp/te as ../shared/device/te-setup.sh assembles it). Logs and benchmark figures: runs/gpu_check/.
set -euo pipefail
cd "$(dirname "$0")/.."
MCORE=$(grep -oP 'megatron-core==\K[0-9.]+' setup.cfg)  # the release setup.cfg pins (0.19.2)
start=$SECONDS
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    PYTHON=.venv/bin/python
  fi
fi
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else f'no CUDA GPU visible to {sys.executable}')"
missing() { for m in transformer_engine.pytorch megatron.core webdataset pytest; do
              "$PYTHON" -c "import $m" >/dev/null 2>&1 || echo "$m"; done; }

flat_cache() {  # a directory holding core.name, the TE core wheel, the other wheels and the TE torch sdist
  if [ -n "${TE_CACHE:-}" ]; then echo "$TE_CACHE"; return; fi
  if [ -f /tmp/te/core.name ] && [ -f "/tmp/te/$(cat /tmp/te/core.name)" ]; then echo /tmp/te; return; fi
  [ -f .device/te/small/core.name ] || return 0
  local d; d=$(mktemp -d); cp .device/te/small/* "$d/"
  local core; core=$(cat "$d/core.name")
  if [ -f ".device/te/full/$core" ]; then cp ".device/te/full/$core" "$d/"
  elif [ -f .device/te/p0 ]; then cat .device/te/p0 .device/te/q* > "$d/$core"; fi
  echo "$d"
}

todo=$(missing)
if [ -n "$todo" ]; then
  echo "gpu_check: installing $(echo $todo)"
  cache=$(flat_cache)
  if [ -n "$cache" ]; then
    core=$(cat "$cache/core.name")
    [ "$(sha256sum "$cache/$core" | cut -d' ' -f1)" = "$(cat "$cache/core.sha256")" ] \
      || { echo "gpu_check: $cache/$core is incomplete (run launch/gpu_prepare.sh again)"; exit 1; }
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile "$cache"/*.whl
    if ! "$PYTHON" -c "import transformer_engine.pytorch" >/dev/null 2>&1; then
      src=$(mktemp -d); tar xzf "$cache"/transformer_engine_torch-*.tar.gz -C "$src"
      arch=$("$PYTHON" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')")
      (cd "$src"/transformer_engine_torch-* && NVTE_CUDA_ARCHS=$arch MAX_JOBS=$(nproc) NVTE_FRAMEWORK=pytorch \
        "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation . > "$src/build.log" 2>&1) \
        || { tail -40 "$src/build.log"; exit 1; }
    fi
  else  # online
    "$PYTHON" -m pip install -q --no-build-isolation "transformer-engine[pytorch]>=2.20,<2.21" "megatron-core==$MCORE" \
      webdataset pytest
  fi
  todo=$(missing)
  [ -z "$todo" ] || { echo "gpu_check: still missing: $todo"; exit 1; }
  echo "gpu_check: installed in $((SECONDS - start)) s"
fi
"$PYTHON" -c "import torch, transformer_engine, megatron.core as m; print('gpu_check:', torch.cuda.get_device_name(), \
'torch', torch.__version__, 'TE', transformer_engine.__version__, 'megatron-core', m.__version__)" 2>/dev/null
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONWARNINGS=ignore
# The benchmarks first, alone on the GPU, so their figures are the GPU's; then the tests: the tiny runs are
# start-up bound (imports, CPU), so five groups share the GPU at once.
logs=runs/gpu_check; mkdir -p "$logs"; rm -f "$logs"/bench-*.json
status=0
"$PYTHON" -m pytest -q -m gpu tests/ -k bench -p no:cacheprovider -rfEs "$@" > "$logs/bench.log" 2>&1 \
  || status=1
tail -1 "$logs/bench.log"; grep -E "^(FAILED|ERROR)" "$logs/bench.log" || true
cat "$logs"/bench-*.json 2>/dev/null || true
# one layer's DSA core attention, megatron-core's backends beside ours (tools/bench_dsa.py), GLM-5's 64
# heads and top-k 2048; a backend whose package is missing prints "unavailable"
timeout "${DSA_BENCH_TIMEOUT:-180}" "$PYTHON" tools/bench_dsa.py --seq-lengths 4096,16384 --topk 2048 --heads 64 \
  --bf16 --paths none,dense,blockwise,triton,tilelang,cudnn --dense-limit-gb 60 --repeats 2 \
  > "$logs/bench-dsa.jsonl" 2> "$logs/bench-dsa.log" || { echo "bench_dsa: exit $?"; tail -5 "$logs/bench-dsa.log"; status=1; }
cat "$logs/bench-dsa.jsonl"
echo "gpu_check: benchmarks done in $((SECONDS - start)) s; tests"
groups=("te_bf16 or fp8_recipe" "resume" "export" "recompute or grouped")
pids=()
for i in "${!groups[@]}"; do
  "$PYTHON" -m pytest -q -m gpu tests/ -k "${groups[$i]}" -p no:cacheprovider -rfEs \
    --basetemp "$(mktemp -d)/t" "$@" > "$logs/group$i.log" 2>&1 &
  pids+=($!)
done
# the gpu tests in none of the groups above (NCCL collectives
# and saves, the DSA kernels and backends, the activation measurement), found by the marker
rest="not (te_bf16 or fp8_recipe or resume or export or recompute or grouped or bench)"
i=${#groups[@]}; groups+=("the other gpu tests")
"$PYTHON" -m pytest -q -m gpu tests/ -k "$rest" -p no:cacheprovider -rfEs --basetemp "$(mktemp -d)/t" "$@" \
  > "$logs/group$i.log" 2>&1 &
pids+=($!)
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || status=1
  echo "--- ${groups[$i]}: $(tail -1 "$logs/group$i.log")"
  grep -E "^(FAILED|ERROR)" "$logs/group$i.log" || true
done
echo "gpu_check: tests done in $((SECONDS - start)) s"
echo "gpu_check: $( [ $status = 0 ] && echo passed || echo "FAILED (logs in $logs/)" ) in $((SECONDS - start)) s"
exit $status
