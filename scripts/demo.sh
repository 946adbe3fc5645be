#!/usr/bin/env bash
# The main job on its embedded default: set up, then train a tiny DenseRetNet on the bundled State of the Union
# corpus with the bundled tokenizer (CPU, a few minutes). It ends with the validation loss and perplexity, the
# saved model, a generated sample and a loss-curve PNG. Extra arguments go to `densessm train` (they win).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One intra-op thread unless told otherwise: the tiny model's matrices gain little from more, and on a busy
# machine oversubscribed threads slow every step down many times over.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/densessm train \
    --model_name_or_path dense_retnet_tiny \
    --output_dir outputs/demo --overwrite_output_dir --data_cache_dir outputs/data_cache \
    --block_size 128 --per_device_train_batch_size 16 --max_steps 600 \
    --learning_rate 3e-3 --lr_scheduler_type cosine --warmup_ratio 0.05 --weight_decay 0.01 \
    --eval_strategy steps --eval_steps 150 --logging_steps 50 --save_steps 300 --save_total_limit 2 \
    --report_to tensorboard --seed 0 "$@"
