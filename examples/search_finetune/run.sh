#!/usr/bin/env bash
# Fine-tune the bundled model on your own queries, then serve and evaluate it, as a user runs it, one command
# a step: split the queries -> train -> export -> serve with an index -> index -> eval-retrieval.
# From the repository root:
#     make example-search-finetune      (or: bash examples/search_finetune/run.sh)
# The data is read from ../shared/data/retrieval/cranfield (set CRANFIELD to read it from elsewhere); everything
# written goes to WORK (a new temporary directory unless set). STEPS=60 and SEED=0 as benchmarks/README.md's
# "Retrieval fine-tuning" runs (15-20 minutes of training on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/../.."
CRANFIELD=${CRANFIELD:-../shared/data/retrieval/cranfield}
BIN=.venv/bin
WORK=${WORK:-$(mktemp -d)}
STORE=$WORK/store
PORT=${PORT:-8111}
STEPS=${STEPS:-60}
SEED=${SEED:-0}
echo "working in $WORK"

# 1. 225 queries -> 75 test, 25 dev, 125 train: a seeded shuffle of the query ids (the test queries are
#    never trained on, nor used to pick the best step).
$BIN/python -m embedline.training.simcse.retrieval_split --queries "$CRANFIELD/queries.tsv.gz" \
    --qrels "$CRANFIELD/qrels.tsv.gz" --output "$WORK/split" --test 75 --dev 25 --seed "$SEED"

# 2. Train: (query, relevant abstract) pairs, in-batch + BM25 hard negatives, the best step by dev nDCG@10.
#    The prompts are recorded in the artifact: `index` embeds abstracts with "passage: ", search the queries
#    with "query: ".
$BIN/embedline train --objective retrieval --corpus "$CRANFIELD/corpus.tsv.gz" \
    --queries "$WORK/split/train.queries.tsv" --qrels "$WORK/split/train.qrels.tsv" \
    --dev-queries "$WORK/split/dev.queries.tsv" --dev-qrels "$WORK/split/dev.qrels.tsv" \
    --query_prompt "query: " --passage_prompt "passage: " --negatives bm25 \
    --batch_size 32 --max_seq_length 128 --max_steps "$STEPS" --eval_steps 15 --warmup_ratio 0.1 \
    --seed "$SEED" --output "$WORK/cranfield-minilm"

# 3. Export: ONNX variants with their parity checks (serve would do it too; here it is a step of its own).
$BIN/embedline export --model "$WORK/cranfield-minilm"

# 4. Serve the fine-tuned artifact with search over STORE, on ports of its own.
$BIN/embedline serve --artifact "$WORK/cranfield-minilm" --index "$STORE" --grpc-port $PORT \
    --http-port $((PORT + 1)) --metrics-port $((PORT + 2)) --openai-port $((PORT + 3)) > "$WORK/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
until grep -q "Ctrl-C to stop" "$WORK/serve.log"; do
    kill -0 $SERVER 2>/dev/null || { cat "$WORK/serve.log"; exit 1; }
    sleep 1
done

# 5. Index the 1,400 abstracts through it (the two empty ones skipped), with the passage prompt.
$BIN/embedline index --url 127.0.0.1:$PORT --store "$STORE" --collection cranfield \
    --input "$CRANFIELD/corpus.tsv.gz" --title-field title --skip-empty

# 6. The 75 test queries only: served dense, exact dense, BM25 and hybrid.
echo
$BIN/embedline eval-retrieval --url 127.0.0.1:$PORT --store "$STORE" --collection cranfield \
    --queries "$WORK/split/test.queries.tsv" --qrels "$WORK/split/test.qrels.tsv" --output "$WORK/metrics.json"
echo "the same test queries with the bundled model: benchmarks/README.md, \"Retrieval fine-tuning\" (seed $SEED)"
