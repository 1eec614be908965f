#!/usr/bin/env bash
# Train the dates models (seq2seq-bahdanau and transformer) with the bundled NumPy trainer and
# evaluate them: greedy exact match on 2000 held-out test examples (seed 0: the test split's
# calendar days are disjoint from training; ambiguous day/month inputs are left out).
# Results and timings: docs/TRAINING.md. Runs one training at a time, niced (shared 2-core box).
#
#   scripts/train_dates.sh [bahdanau|transformer|all]      (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
which=${1:-all}
mkdir -p runs

if [[ $which == all || $which == bahdanau ]]; then
  /usr/bin/time -v nice -n 19 python -m attncore.train.cli dates --arch seq2seq-bahdanau --out runs/dates-bahdanau \
    --seed 0 --steps 600 --batch-size 128 --lr 3e-3 --schedule cosine --warmup-steps 30 --min-lr 1e-4 \
    --embed-dim 32 --hidden-size 128 --checkpoint-every 100 2>&1 | tee runs/dates-bahdanau.log
  nice -n 19 python -m attncore.train.evaluate runs/dates-bahdanau --task dates --seed 0 --n 2000 --errors 20
fi

if [[ $which == all || $which == transformer ]]; then
  /usr/bin/time -v nice -n 19 python -m attncore.train.cli dates --arch transformer --out runs/dates-transformer \
    --seed 0 --steps 1500 --batch-size 128 --lr 1e-3 --schedule cosine --warmup-steps 150 --min-lr 1e-5 \
    --d-model 64 --num-heads 4 --num-encoder-layers 2 --num-decoder-layers 2 --dim-feedforward 128 \
    --checkpoint-every 250 2>&1 | tee runs/dates-transformer.log
  nice -n 19 python -m attncore.train.evaluate runs/dates-transformer --task dates --seed 0 --n 2000 --errors 20
fi
