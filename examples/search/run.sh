#!/usr/bin/env bash
# The Cranfield collection from a corpus file to evaluated answers, as a user runs it:
# serve with an index -> index the corpus -> search -> eval-retrieval. From the repository root:
#     make example-search        (or: bash examples/search/run.sh)
# The data is read from ../shared/data/retrieval/cranfield (set CRANFIELD to read it from elsewhere).
set -euo pipefail
cd "$(dirname "$0")/../.."
CRANFIELD=${CRANFIELD:-../shared/data/retrieval/cranfield}
BIN=.venv/bin
STORE=${STORE:-$(mktemp -d)/store}
PORT=${PORT:-8101}

$BIN/embedline serve --index "$STORE" --grpc-port $PORT --http-port $((PORT + 1)) --metrics-port $((PORT + 2)) \
    --openai-port $((PORT + 3)) > "$STORE.serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
until grep -q "Ctrl-C to stop" "$STORE.serve.log"; do
    kill -0 $SERVER 2>/dev/null || { cat "$STORE.serve.log"; exit 1; }
    sleep 1
done

# 1,400 abstracts; two are empty in the source, so --skip-empty passes over them (and says so).
$BIN/embedline index --url 127.0.0.1:$PORT --store "$STORE" --collection cranfield \
    --input "$CRANFIELD/corpus.tsv.gz" --title-field title --skip-empty

# One question through the SDK, dense and hybrid.
$BIN/python - "$PORT" <<'PY'
import sys
from embedline.client import EmbeddingClient

with EmbeddingClient(f"127.0.0.1:{sys.argv[1]}") as client:
    question = "what similarity laws must be obeyed when constructing aeroelastic models of heated high speed aircraft"
    for hybrid in (False, True):
        print(f"\n{'hybrid' if hybrid else 'dense'}: {question}")
        for hit in client.search(question, k=3, collection="cranfield", hybrid=hybrid)[0]:
            print(f"  {hit.id:>5}  {hit.score:.3f}  {hit.text[:90]}")
PY

# The 225 queries with their graded judgments: the served index, exact search, BM25 and hybrid.
echo
$BIN/embedline eval-retrieval --url 127.0.0.1:$PORT --store "$STORE" --collection cranfield \
    --queries "$CRANFIELD/queries.tsv.gz" --qrels "$CRANFIELD/qrels.tsv.gz" --output "$STORE.metrics.json"
