#!/usr/bin/env bash
# German -> English translation on the sentence pairs of Debian's Ding dictionary (trans-de-en):
# a small Transformer and a small Bahdanau GRU seq2seq, BPE subwords (tokenizers), corpus BLEU
# (sacrebleu) on the 1000-pair held-out test split, greedy (trainer) and beam 4 (engine).
# Needs `apt-get install -y trans-de-en`. Results and timings: docs/TRAINING.md.
#
#   scripts/train_translation.sh [transformer|bahdanau|eval|all]      (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
which=${1:-all}
mkdir -p runs
# One BPE vocabulary pair for both models (learnt on the training split, cached in runs/).
TASK=(translation --seed 0 --task-option tokenizer_dir='"runs/translation-bpe"')
COMMON=(--batch-size 64 --schedule cosine --min-lr 1e-5 --label-smoothing 0.1 --eval-every 500
        --eval-batches 8 --checkpoint-every 500)

if [[ $which == all || $which == transformer ]]; then
  /usr/bin/time -v nice -n 19 python -m attncore.train.cli "${TASK[@]}" --arch transformer \
    --out runs/translation-transformer "${COMMON[@]}" --steps 2500 --lr 1e-3 --warmup-steps 250 \
    --d-model 128 --num-heads 4 --num-encoder-layers 2 --num-decoder-layers 2 --dim-feedforward 512 \
    --dropout 0.1 2>&1 | tee runs/translation-transformer.log
fi

if [[ $which == all || $which == bahdanau ]]; then
  /usr/bin/time -v nice -n 19 python -m attncore.train.cli "${TASK[@]}" --arch seq2seq-bahdanau \
    --out runs/translation-bahdanau "${COMMON[@]}" --steps 1500 --lr 2e-3 --warmup-steps 100 \
    --embed-dim 128 --hidden-size 256 --dropout 0.1 2>&1 | tee runs/translation-bahdanau.log
fi

if [[ $which == all || $which == eval ]]; then
  for model in runs/translation-transformer runs/translation-bahdanau; do
    python -m attncore.train.evaluate "$model" --task translation "${TASK[@]:1}" --errors 5
    python -m attncore.train.evaluate "$model" --task translation "${TASK[@]:1}" --beam 4 --errors 5
  done
fi
