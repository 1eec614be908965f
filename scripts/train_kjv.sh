#!/usr/bin/env bash
# Long documents: classify King James Bible chapters by genre (7 classes) with RAN reading the
# whole chapter, against a Transformer encoder of the same width that sees only its window (the
# first 128 tokens), and against the same RAN reading only those 128 tokens. Same data, split, BPE vocabulary, width, steps and batch for both.
# Needs `apt-get install -y sword-text-kjv`. Results and timings: docs/TRAINING.md.
#
#   scripts/train_kjv.sh [ran|ran128|transformer|eval|all]      (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
which=${1:-all}
mkdir -p runs
TASK=(kjv --seed 0 --task-option label='"genre"' --task-option level='"bpe"' --task-option vocab_size=4000)
COMMON=(--steps 600 --batch-size 16 --lr 2e-3 --schedule cosine --warmup-steps 50 --min-lr 1e-4
        --weight-decay 0.01 --dropout 0.1 --eval-every 100 --eval-batches 8 --checkpoint-every 100
        --d-model 64 --num-heads 4)

if [[ $which == all || $which == ran ]]; then
  /usr/bin/time -v nice -n 19 python -m attncore.train.cli "${TASK[@]}" --arch ran-classifier \
    --out runs/kjv-ran "${COMMON[@]}" --head-size 16 --num-layers 2 --window-size 128 --min-window-size 16 \
    2>&1 | tee runs/kjv-ran.log
fi

if [[ $which == all || $which == ran128 ]]; then  # the same RAN reading only the first 128 tokens
  /usr/bin/time -v nice -n 19 python -m attncore.train.cli "${TASK[@]}" --task-option max_len=128 \
    --arch ran-classifier --out runs/kjv-ran-128 "${COMMON[@]}" --head-size 16 --num-layers 2 \
    --window-size 128 --min-window-size 16 2>&1 | tee runs/kjv-ran-128.log
fi

if [[ $which == all || $which == transformer ]]; then
  /usr/bin/time -v nice -n 19 python -m attncore.train.cli "${TASK[@]}" --task-option max_len=128 \
    --arch transformer-classifier --out runs/kjv-transformer-128 "${COMMON[@]}" --num-encoder-layers 2 \
    --dim-feedforward 128 --max-positions 128 2>&1 | tee runs/kjv-transformer-128.log
fi

if [[ $which == all || $which == eval ]]; then
  python -m attncore.train.evaluate runs/kjv-ran "${TASK[@]:1}" --task kjv
  python -m attncore.train.evaluate runs/kjv-transformer-128 "${TASK[@]:1}" --task kjv --task-option max_len=128
  python -m attncore.train.evaluate runs/kjv-ran-128 "${TASK[@]:1}" --task kjv --task-option max_len=128
  python scripts/kjv_engine_check.py runs/kjv-ran
  python scripts/kjv_engine_check.py runs/kjv-transformer-128 128
fi
