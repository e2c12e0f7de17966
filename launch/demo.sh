#!/usr/bin/env bash
# Set up the environment (idempotent) and run the main job on the embedded default: the tiny
# GLM-5 (MLA + DSA + MoE + MTP) trained on CPU with two processes, TensorBoard logs in runs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh test
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
OUT="${OUT_DIR:-runs/demo}"
mkdir -p "$OUT"
.venv/bin/torchrun --nproc_per_node 2 launch/pretrain.py \
  --preset tiny --mock-data --expert-model-parallel-size 2 \
  --train-iters "${TRAIN_ITERS:-100}" --global-batch-size 8 --lr 3e-3 --lr-warmup-iters 5 \
  --log-interval 10 --tensorboard-dir "$OUT/tensorboard" "$@"
echo
echo "Done. Look at the run with:  .venv/bin/tensorboard --logdir $OUT/tensorboard"
