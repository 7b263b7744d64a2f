#!/usr/bin/env bash
# The reranker ablation behind docs/results.md (issue 9): one change per row against `base`, then
# `final` combines what helped (labelled pairs, lr 5e-5) with 6x the pairs, `all` with every
# cluster-disjoint training positive (32k), `all-neg2` with two negatives each, `all-neg2-ep2` a
# second pass from `all-neg2` at a lower learning rate, `listwise` the listwise loss on `all`'s
# data. Rows before session 4 used random batches (BASE says so); `final-grouped` checks that
# length-grouped batches, now the default, cost nothing.
# Each row: train, score the held-out human-labelled pairs, rerank the Quora BEIR queries; then
# benchmarks/ablation_table.py prints the table.
#   nice bash benchmarks/ablate_reranker.sh > runs/logs/ablate.log 2>&1 &
# Needs runs/quora-beir and runs/quora-snap (benchmarks/build_quora_beir.py). CPU only, 2 cores:
# about 5 to 12 minutes per row, 40 for `final`, 70 for `all`, 50 for `all-neg2`, 45 for
# `listwise`, 35 for `all-grouped` (55 on an AVX2-only CPU). Data stays under runs/ (gitignored).
set -euo pipefail
TWINQ=${TWINQ:-.venv/bin/twinq}
B=runs/quora-beir
A=runs/ablation
ROWS=${ROWS:-"base labelled lr5e-5 final all len32 bands1-5 no-margin final-grouped all-neg2 all-neg2-ep2 listwise all-grouped all-margin0.1"}
BASE=(--pairs $B/train_pairs.tsv --max-pairs 2000 --max-dev-pairs 1000 --negatives 1 --epochs 1
      --lr 2e-5 --batch-size 32 --max-length 64 --seed 0 --threads 2 --fusion-root runs/quora-snap
      --random-batches)
declare -A EXTRA=(
  [base]=""
  [labelled]="--labelled $B/labelled_train.tsv"
  [lr5e-5]="--lr 5e-5"
  [bands1-5]="--bands 1-5"
  [len32]="--max-length 32"
  [no-margin]="--margin=-10"
  [final]="--labelled $B/labelled_train.tsv --max-pairs 12000 --lr 5e-5"
  [all]="--labelled $B/labelled_train.tsv --max-pairs 40000 --lr 5e-5"
)
# Session 4's rows: `final` or `all` with one or two changes.
EXTRA[final-grouped]="${EXTRA[final]} --group-by-length"
EXTRA[all-neg2]="${EXTRA[all]} --negatives 2 --group-by-length"
EXTRA[all-neg2-ep2]="${EXTRA[all]} --base $A/all-neg2 --lr 2e-5 --group-by-length"
# Session 6: `all` trained listwise, each anchor's twin against 4 mined near misses in one softmax;
# `all-grouped`, `all` in length-grouped batches (and the ensemble check's pointwise partner).
EXTRA[listwise]="${EXTRA[all]} --loss listwise --negatives 4 --group-by-length"
EXTRA[all-grouped]="${EXTRA[all]} --group-by-length"
# Session 7: `all-grouped` with twice the false-negative margin (no-margin showed how much the
# unlabelled duplicates among mined near misses cost).
EXTRA[all-margin0.1]="${EXTRA[all-grouped]} --margin 0.1"
# `all-grouped` with its mined training negatives vetted by a trained reranker (`all-margin0.1`,
# so run that row first): those it gives a duplicate probability above 0.5 are dropped
# (pipelines/denoise.py). Not measured yet (about an hour on an AVX2-only 2-core CPU), so it is
# not among the default ROWS: ROWS=all-denoised runs it.
EXTRA[all-denoised]="${EXTRA[all-grouped]} --denoise-with $A/all-margin0.1"
# Session 8 (issue 18): every row now trains with one easy negative per positive pair (a random
# corpus question or an out-of-domain one), mines near misses for labelled positives too, and
# fits the twin decision on serving-like dev queries. `mid-easy` is `final` with 4,000 pairs
# (about 25 minutes); `mid-easy0` turns the easy negatives off to measure what they cost.
EXTRA[mid-easy]="--labelled $B/labelled_train.tsv --max-pairs 4000 --lr 5e-5 --group-by-length"
EXTRA[mid-easy0]="${EXTRA[mid-easy]} --easy-negatives 0"
mkdir -p $A
for row in $ROWS; do
  out=$A/$row
  # shellcheck disable=SC2086 # EXTRA holds several flags
  [ -f $out/training.json ] || $TWINQ train reranker "${BASE[@]}" ${EXTRA[$row]} --out $out
  [ -f $out/pairs/report.json ] || $TWINQ eval pairs --model $out --pairs $B/labelled_heldout.tsv --out $out/pairs --json > /dev/null
  [ -f $out/retrieval/report.json ] || $TWINQ eval retrieval --root runs/quora-snap \
      --queries $B/queries.jsonl --qrels $B/qrels/test.tsv --reranker $out --recall-k 100 \
      --rerank-depth 20 --out $out/retrieval > /dev/null
  # The twin decision (rows trained before session 8 have no decision model).
  [ -f $out/decide/report.json ] || ! grep -q '"decision"' $out/training.json || $TWINQ eval decide \
      --root runs/quora-snap --queries $B/queries.jsonl --qrels $B/qrels/test.tsv --reranker $out \
      --out $out/decide > /dev/null
done
# Symmetric scoring at inference: the base model, both orders averaged (no training), if trained.
[ ! -d $A/base ] || [ -f $A/base/pairs-symmetric/report.json ] || $TWINQ eval pairs --model $A/base --symmetric \
    --pairs $B/labelled_heldout.tsv --out $A/base/pairs-symmetric --json > /dev/null
# Symmetric scoring in retrieval (both orders averaged, twice the rerank cost) for the best row.
S=$A/all-neg2-ep2
[ ! -d $S ] || [ -f $S/retrieval-symmetric/report.json ] || $TWINQ eval retrieval --root runs/quora-snap \
    --queries $B/queries.jsonl --qrels $B/qrels/test.tsv --reranker $S --recall-k 100 \
    --rerank-depth 20 --symmetric --out $S/retrieval-symmetric > /dev/null
.venv/bin/python benchmarks/ablation_table.py $A
