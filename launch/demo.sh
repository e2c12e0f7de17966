#!/usr/bin/env bash
# The main job on the embedded default, end to end on a CPU machine (about 6 minutes on 2 cores):
#   1. set up .venv                      4. train the tiny GLM-5 with 2 processes (EP=2), TensorBoard + checkpoints,
#                                           validation loss on the held-out 5% every 50 iterations
#   2. train a byte-level BPE tokenizer  5. export the checkpoint to Hugging Face and verify its logits
#   3. build token shards from a real corpus (Python's own standard library: no download)
#   6. load the export with transformers and generate a few tokens
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh test
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
PY=.venv/bin/python
OUT="${OUT_DIR:-runs/demo}"
ITERS="${TRAIN_ITERS:-200}"
rm -rf "$OUT" && mkdir -p "$OUT"
STDLIB=$($PY -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
mapfile -t FILES < <(ls "$STDLIB"/*.py | head -400)

echo "== tokenizer (byte-level BPE, 500 tokens, fits the tiny model's 512) and shards (5% of documents held out for validation)"
$PY -c "import sys; from data.tokenizer import train_bpe_tokenizer; train_bpe_tokenizer(sys.argv[2:], 500, sys.argv[1])" \
  "$OUT/tokenizer" "${FILES[@]}"
$PY tools/preprocess_data.py --input "${FILES[@]}" --tokenizer "$OUT/tokenizer" --output-dir "$OUT/shards" \
  --shard-size 1MiB --chunk-tokens 65536 --workers 2 --valid-fraction 0.05
$PY tools/inspect_shards.py "$OUT/shards/manifest.json" --verify > "$OUT/shards/summary.json"

echo "== training: tiny GLM-5 (MLA + DSA + MoE + MTP), 2 processes, expert parallel 2"
.venv/bin/torchrun --nproc_per_node 2 launch/pretrain.py \
  --preset tiny --expert-model-parallel-size 2 --use-distributed-optimizer \
  --data-path "$OUT/shards/manifest.json" --tokenizer "$OUT/tokenizer" \
  --valid-data-path "$OUT/shards/valid-manifest.json" --eval-interval 50 --eval-iters 4 \
  --train-iters "$ITERS" --global-batch-size 16 --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 20 \
  --log-interval 20 --tensorboard-dir "$OUT/tensorboard" --save "$OUT/checkpoints" --save-interval 100

echo "== export to Hugging Face (fp32) and verify against transformers"
$PY tools/export_hf.py --load "$OUT/checkpoints" --output "$OUT/hf" --dtype fp32 --tokenizer "$OUT/tokenizer" --verify

echo "== generate with transformers"
$PY tools/generate_hf.py --model "$OUT/hf" --prompt "def " --max-new-tokens 24

echo
echo "Done. TensorBoard:  .venv/bin/tensorboard --logdir $OUT/tensorboard   (lm loss, lm loss validation, ...)"
echo "      checkpoints:  $OUT/checkpoints   Hugging Face export: $OUT/hf"
