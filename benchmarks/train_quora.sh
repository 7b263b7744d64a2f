#!/usr/bin/env bash
# The exact commands behind docs/results.md. Run from the repo root:
#   nice -n 10 bash benchmarks/train_quora.sh > runs/logs/train_quora.log 2>&1 &
# Data stays under runs/ (gitignored). CPU only; sized for 2 shared cores (~25 min per model).
set -euo pipefail
TWINQ=${TWINQ:-.venv/bin/twinq}
PY=${PY:-.venv/bin/python}
DATA=${TWINQ_DATA:-../shared/data}
B=runs/quora-beir
PAIRS=${PAIRS:-3000}

# 1. BEIR-format Quora set + cluster-disjoint training pairs + snapshot of the corpus.
[ -f runs/quora-snap/CURRENT ] || $PY benchmarks/build_quora_beir.py --out $B --queries 1000 \
    --seed 13 --snapshot-root runs/quora-snap --threads 2

# 2. Rerankers: with and without swap augmentation (same pairs, same mined negatives).
for SWAP in swap no-swap; do
  [ -f runs/ce-$SWAP/training.json ] || $TWINQ train reranker --pairs $B/train_pairs.tsv \
      --out runs/ce-$SWAP --$SWAP --max-pairs $PAIRS --max-dev-pairs 1000 --negatives 1 \
      --epochs 1 --lr 2e-5 --batch-size 32 --max-length 64 --seed 0 --threads 1 \
      --fusion-root runs/quora-snap
done

# 3. Pair classification on the held-apart labelled Quora set (questions disjoint from training).
for SWAP in swap no-swap; do
  $TWINQ eval pairs --model runs/ce-$SWAP --pairs $B/labelled_test.tsv --out runs/eval-pairs-$SWAP --json
done

# 4. Retrieval: recall-only vs rerank-only vs fused on 1000 held-out clusters.
$TWINQ eval retrieval --root runs/quora-snap --queries $B/queries.jsonl --qrels $B/qrels/test.tsv \
    --reranker runs/ce-swap --recall-k 100 --rerank-depth 20 --out runs/eval-retrieval-swap

# 5. LCQMC dev (Chinese; the bundled model is English: expect weak numbers).
$TWINQ eval pairs --model runs/ce-swap --pairs $DATA/lcqmc/dev.txt --out runs/eval-lcqmc-swap --json
