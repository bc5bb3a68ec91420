"""`embedline eval-retrieval`: how well a served index ranks a labelled query set.

    embedline eval-retrieval --url 127.0.0.1:8001 --collection cranfield \\
        --queries queries.tsv.gz --qrels qrels.tsv.gz

Four rankings of every query that has relevance judgments, each scored with nDCG@10, recall@100 and MRR@10
(metrics.py: BEIR's definitions), plus nDCG@10 with binary gains (what sentence-transformers'
InformationRetrievalEvaluator reports):

    dense (served)   client.search through the server: the query prompt, the served variant and the ANN index
    dense (exact)    the same query embeddings ranked by an exact scan of the collection: what the ANN costs
    bm25             the collection's full-text index alone
    hybrid           dense + BM25 by reciprocal rank fusion, through the server

A server started without `--index` has no search model: the dense and hybrid rankings then come from the
local store with query embeddings from the server, and the report says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import numpy as np

from embedline.client.cli import Progress, positive_float
from embedline.client.connection import DEFAULT_TIMEOUT_S, DEFAULT_URL
from embedline.client.errors import ModelNotFoundError
from embedline.client.sync import EmbeddingClient
from embedline.retrieval import QrelsError, evaluate, read_qrels, read_queries
from embedline.search.store import (DEFAULT_COLLECTION, MAX_K, Collection, Hit, default_store_uri, hybrid_search,
                                    open_store)

QUERIES_PER_CALL = 64
DEPTH = 100  # hits ranked per query: recall@100 needs 100


def labelled_queries(queries: dict[str, str], qrels: dict[str, dict[str, int]]) -> dict[str, str]:
    """The queries that can be scored (they have a judged relevant document); the rest are reported."""
    judged = {q for q, docs in qrels.items() if any(score > 0 for score in docs.values())}
    unknown = sorted(judged - set(queries))
    if unknown:
        raise QrelsError(f"the qrels judge {len(unknown)} queries the queries file lacks (e.g. {unknown[0]!r})")
    skipped = len(queries) - len(judged)
    if skipped:
        print(f"eval-retrieval: {skipped} queries have no relevance judgments: not scored", file=sys.stderr)
    return {q: text for q, text in queries.items() if q in judged}


def rank(queries: dict[str, str], search: Callable[[list[str]], list[list[Hit]]], label: str) -> dict[str, list[str]]:
    """query id -> ranked document ids, asking `search` QUERIES_PER_CALL queries at a time."""
    ids, texts = list(queries), list(queries.values())
    progress = Progress(len(ids))
    rankings = {}
    try:
        for start in range(0, len(ids), QUERIES_PER_CALL):
            for query_id, hits in zip(ids[start:start + QUERIES_PER_CALL], search(texts[start:start + QUERIES_PER_CALL])):
                rankings[query_id] = [hit.id for hit in hits]
            progress.update(min(QUERIES_PER_CALL, len(ids) - start))
    finally:
        progress.close()
    return rankings


def rankers(client: EmbeddingClient, collection: Collection, depth: int) -> dict[str, Callable]:
    """The four ways of ranking (see the module doc), each: query texts -> hits per query."""
    def embed(texts: list[str]) -> np.ndarray:
        return client.embed(texts, prompt_name=collection.model.query_prompt)

    served = True
    try:
        client.search("probe", k=1, collection=collection.name)
    except ModelNotFoundError as exc:
        if "no search index" not in str(exc):
            raise
        served = False
    name = "served" if served else "local ANN"
    return {
        f"dense ({name})": (lambda texts: client.search(texts, k=depth, collection=collection.name)) if served
        else (lambda texts: collection.search(embed(texts), depth)),
        "dense (exact)": lambda texts: collection.search(embed(texts), depth, exact=True),
        "bm25": lambda texts: collection.search_text(texts, depth),
        f"hybrid ({name})": (lambda texts: client.search(texts, k=depth, collection=collection.name, hybrid=True))
        if served else (lambda texts: hybrid_search(collection, embed(texts), texts, depth)),
    }


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server gRPC endpoint HOST:PORT (default {DEFAULT_URL})")
    parser.add_argument("--store", default=None, help=f"the store the server serves (default {default_store_uri()})")
    parser.add_argument("--collection", default=DEFAULT_COLLECTION, help=f"default {DEFAULT_COLLECTION!r}")
    parser.add_argument("--queries", required=True, help="TSV with a header: query_id, text (.gz ok)")
    parser.add_argument("--qrels", required=True, help="TSV with a header: query_id, doc_id, score (.gz ok)")
    parser.add_argument("--depth", type=int, default=DEPTH, help=f"hits ranked per query (default {DEPTH})")
    parser.add_argument("--output", default=None, help="also write the metrics as JSON to this file")
    parser.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds per call (default {DEFAULT_TIMEOUT_S:g})")


def run(args: argparse.Namespace) -> int:
    if not 10 <= args.depth <= MAX_K:
        raise QrelsError(f"--depth must be from 10 to {MAX_K}, got {args.depth}")
    qrels = read_qrels(args.qrels)
    queries = labelled_queries(read_queries(args.queries), qrels)
    collection = open_store(args.store).open(args.collection)
    results = {}
    with EmbeddingClient(args.url, timeout=args.timeout) as client:
        for label, search in rankers(client, collection, args.depth).items():
            results[label] = evaluate(rank(queries, search, label), qrels)
    print(f"{len(queries)} queries, collection {args.collection!r} ({collection.count()} documents, "
          f"model {collection.model.name})")
    print(f"{'ranking':<22} {'nDCG@10':>8} {'recall@100':>11} {'MRR@10':>8} {'nDCG@10 binary':>15}")
    for label, metrics in results.items():
        print(f"{label:<22} {metrics['ndcg@10']:>8.4f} {metrics['recall@100']:>11.4f} {metrics['mrr@10']:>8.4f} "
              f"{metrics['ndcg@10_binary']:>15.4f}")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump({"collection": args.collection, "model": collection.model.to_json(), "results": results}, f,
                      indent=2)
    return 0
