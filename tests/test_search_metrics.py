"""embedline/retrieval.py: hand-computed metrics, parity with sentence-transformers' evaluator, queries/qrels files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from embedline.documents import CorpusError
from embedline.retrieval import (
    QrelsError,
    evaluate,
    mrr_at_k,
    ndcg_at_k,
    ranking_from_scores,
    read_qrels,
    read_queries,
    recall_at_k,
)

from test_search_documents import write

# The shared data beside the checkout (read there, never copied into the repository).
CRANFIELD = Path(__file__).resolve().parents[2] / "shared" / "data" / "retrieval" / "cranfield"

# One query's judgments: graded, with a judged non-relevant (0) and a -1 (trec_eval: not relevant).
RELEVANT = {"a": 1, "b": 0, "c": 3, "d": 2, "e": -1}




# ------------------------------------------------------------------------------------------- metrics


def test_ndcg_graded_by_hand():
    # Ranked gains 1, 0, 3 at ranks 1-3; ideal 3, 2, 1. Discount log2(rank + 1): 1, log2(3), 2.
    dcg = 1 / 1 + 0 + 3 / 2
    ideal = 3 / 1 + 2 / math.log2(3) + 1 / 2
    assert ndcg_at_k(["a", "b", "c"], RELEVANT, 3) == pytest.approx(dcg / ideal)
    # k = 2 cuts the ideal too: 3 + 2 / log2(3).
    assert ndcg_at_k(["a", "b", "c"], RELEVANT, 2) == pytest.approx(1 / (3 + 2 / math.log2(3)))
    assert ndcg_at_k(["c", "d", "a"], RELEVANT, 3) == pytest.approx(1.0)


def test_ndcg_binary_by_hand():
    dcg = 1 / 1 + 0 + 1 / 2
    ideal = 1 + 1 / math.log2(3) + 1 / 2  # three relevant documents (a, c, d)
    assert ndcg_at_k(["a", "b", "c"], RELEVANT, 3, binary=True) == pytest.approx(dcg / ideal)
    assert ndcg_at_k(["d", "a", "c"], RELEVANT, 3, binary=True) == pytest.approx(1.0)


def test_non_positive_and_unjudged_documents_gain_nothing():
    assert ndcg_at_k(["e", "b", "x", "y"], RELEVANT, 10) == 0.0
    assert recall_at_k(["e", "b", "x"], RELEVANT, 10) == 0.0
    assert mrr_at_k(["e", "b", "x"], RELEVANT, 10) == 0.0
    # A non-relevant document ahead of a relevant one only pushes it down.
    assert ndcg_at_k(["e", "c"], {"c": 3, "e": -1}, 10) == pytest.approx(1 / math.log2(3))


def test_recall_by_hand():
    assert recall_at_k(["a", "b", "c"], RELEVANT, 3) == pytest.approx(2 / 3)
    assert recall_at_k(["a", "b", "c"], RELEVANT, 1) == pytest.approx(1 / 3)
    assert recall_at_k([], RELEVANT, 10) == 0.0
    assert recall_at_k(["a"], {"a": 0}, 10) == 0.0  # no relevant document: 0, as trec_eval


def test_mrr_by_hand():
    assert mrr_at_k(["x", "d", "a"], RELEVANT, 10) == 0.5
    assert mrr_at_k(["c"], RELEVANT, 10) == 1.0
    assert mrr_at_k(["x", "y", "a"], RELEVANT, 2) == 0.0  # the first relevant is past k


def test_a_document_ranked_twice_gains_once():
    assert ndcg_at_k(["c", "c", "d", "a"], RELEVANT, 4) == pytest.approx(
        (3 + 0 + 2 / 2 + 1 / math.log2(5)) / (3 + 2 / math.log2(3) + 1 / 2)
    )
    assert recall_at_k(["c", "c"], RELEVANT, 2) == pytest.approx(1 / 3)


def test_k_must_be_positive():
    with pytest.raises(ValueError):
        ndcg_at_k(["a"], RELEVANT, 0)


def test_ties_are_broken_as_trec_eval_does():
    # Score descending, then document id descending (string order): what pytrec_eval sees through BEIR.
    assert ranking_from_scores({"a": 0.5, "c": 0.9, "b": 0.5, "d": 0.1}) == ["c", "b", "a", "d"]
    # The metrics take the order they are given: a tie is the ranker's to break.
    assert mrr_at_k(["b", "a"], {"a": 1}, 10) == 0.5


def test_evaluate_means_over_queries_with_relevant_documents():
    qrels = {
        "q1": {"a": 2, "b": 0},   # scored
        "q2": {"x": 0},           # judged, nothing relevant: not scored
        "q3": {"c": 1, "d": 1},   # scored, never ranked: counts as 0
    }
    rankings = {"q1": ["b", "a"], "q2": ["x"], "q9": ["a"]}  # q9 has no qrels: not scored
    scores = evaluate(rankings, qrels, ndcg_k=10, recall_k=100, mrr_k=10)
    assert scores == pytest.approx({
        "ndcg@10": (1 / math.log2(3)) / 2,
        "ndcg@10_binary": (1 / math.log2(3)) / 2,
        "recall@100": 1 / 2,
        "mrr@10": 0.5 / 2,
        "queries": 2,
    })
    assert set(evaluate(rankings, qrels, ndcg_k=5, recall_k=20, mrr_k=3)) == {
        "ndcg@5", "ndcg@5_binary", "recall@20", "mrr@3", "queries"
    }


def test_evaluate_reports_ids_that_do_not_match():
    with pytest.raises(QrelsError, match="do the query ids match"):
        evaluate({"001": ["a"]}, {"1": {"a": 1}})
    with pytest.raises(QrelsError, match="no query in the qrels has a relevant document"):
        evaluate({"1": ["a"]}, {"1": {"a": 0}})


def _information_retrieval_evaluator():
    try:
        from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    except ImportError:
        try:  # sentence-transformers before 6
            from sentence_transformers.evaluation import InformationRetrievalEvaluator
        except ImportError:
            pytest.skip("sentence-transformers is not installed")
    return InformationRetrievalEvaluator


def test_matches_sentence_transformers_evaluator():
    """Same scores, same numbers: ST's NDCG@k is our binary nDCG; its MRR and recall are ours."""
    evaluator_class = _information_retrieval_evaluator()
    rng = np.random.default_rng(7)
    n_queries, n_docs = 20, 60
    queries = rng.normal(size=(n_queries, 16))
    docs = rng.normal(size=(n_docs, 16))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    scores = queries @ docs.T
    query_ids = [f"q{i}" for i in range(n_queries)]
    doc_ids = [f"d{i}" for i in range(n_docs)]
    relevant_docs = {
        qid: {doc_ids[j] for j in np.flatnonzero(rng.random(n_docs) < 0.08)} for qid in query_ids[2:]
    }  # q0, q1: no qrels; others may draw none, and ST leaves out those with an empty set as BEIR does
    evaluator = evaluator_class(
        queries=dict.fromkeys(query_ids, "unused"), corpus=dict.fromkeys(doc_ids, "unused"),
        relevant_docs=relevant_docs, mrr_at_k=[10], ndcg_at_k=[10], accuracy_at_k=[1],
        precision_recall_at_k=[10, 100], map_at_k=[10], write_csv=False,
    )
    # What compute_all_metrics hands compute_metrics: per query (in evaluator.queries_ids order) its hits.
    index = {qid: i for i, qid in enumerate(query_ids)}
    hits = [
        [{"corpus_id": doc_id, "score": float(scores[index[qid], j])} for j, doc_id in enumerate(doc_ids)]
        for qid in evaluator.queries_ids
    ]
    theirs = evaluator.compute_metrics(hits)

    rankings = {qid: ranking_from_scores(dict(zip(doc_ids, scores[index[qid]].tolist()))) for qid in query_ids}
    qrels = {qid: dict.fromkeys(docs_, 1) for qid, docs_ in relevant_docs.items()}
    ours = evaluate(rankings, qrels, ndcg_k=10, recall_k=100, mrr_k=10)
    ours_recall10 = evaluate(rankings, qrels, recall_k=10)["recall@10"]

    assert ours["queries"] == len(evaluator.queries_ids) > 10
    assert ours["ndcg@10_binary"] == pytest.approx(theirs["ndcg@k"][10], abs=1e-12)
    assert ours["ndcg@10"] == ours["ndcg@10_binary"]  # binary qrels: linear gains are binary gains
    assert ours["mrr@10"] == pytest.approx(theirs["mrr@k"][10], abs=1e-12)
    assert ours["recall@100"] == pytest.approx(theirs["recall@k"][100], abs=1e-12)
    assert ours["recall@100"] == pytest.approx(1.0)  # 100 > 60 documents
    assert ours_recall10 == pytest.approx(theirs["recall@k"][10], abs=1e-12)


# ------------------------------------------------------------------------------------------------ files


def test_read_queries(tmp_path):
    path = write(tmp_path / "queries.tsv.gz", 'query_id\ttext\n1\twhat is "lift" ?\n2\tdrag\n')
    assert read_queries(path) == {"1": 'what is "lift" ?', "2": "drag"}
    beir = write(tmp_path / "queries.jsonl", '{"_id": 3, "text": "q three", "metadata": {}}\n')
    assert read_queries(beir) == {"3": "q three"}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("qid\ttext\n1\ta\n1\tb\n", "q.tsv:3: duplicate query id '1' (first at q.tsv:2)"),
        ("qid\ttext\n1\ta\n2\t \n", "q.tsv:3: empty query text for id '2'"),
        ("qid\ttext\n1\ta\n2\n", "q.tsv:3: 1 fields, but the header has 2"),
        ("qid\tbody\n1\ta\n", "q.tsv: no query text column (text, query); the file has: qid, body"),
        ("qid\ttext\n", "q.tsv: no queries"),
    ],
)
def test_read_queries_errors(tmp_path, content, expected):
    with pytest.raises(CorpusError) as info:
        read_queries(write(tmp_path / "q.tsv", content))
    assert str(info.value).startswith(expected)


def test_read_qrels(tmp_path):
    path = write(tmp_path / "qrels.tsv", "query-id\tcorpus-id\tscore\n1\t10\t2\n1\t11\t0\n2\t10\t-1\n")
    assert read_qrels(path) == {"1": {"10": 2, "11": 0}, "2": {"10": -1}}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("query_id\tdoc_id\tscore\n1\t10\t2\n1\t11\thigh\n", "r.tsv:3: score 'high' is not an integer"),
        ("query_id\tdoc_id\tscore\n1\t10\t1.5\n", "r.tsv:2: score '1.5' is not an integer"),
        ("query_id\tdoc_id\tscore\n1\t10\n", "r.tsv:2: 2 fields, but the header has 3"),
        ("query_id\tdoc_id\tscore\n1\t10\t1\n1\t10\t2\n", "r.tsv:3: a second judgment for query '1' and document '10'"),
        ("query_id\tdoc_id\tscore\n\t10\t1\n", "r.tsv:2: empty or invalid 'query_id'"),
        ("query_id\tdoc\tscore\n1\t10\t1\n", "r.tsv: no document id column (doc_id, corpus-id, docid, corpus_id)"),
        ("query_id\tdoc_id\tscore\n", "r.tsv: no judgments"),
    ],
)
def test_read_qrels_errors(tmp_path, content, expected):
    with pytest.raises(QrelsError if "fields" not in expected else CorpusError) as info:
        read_qrels(write(tmp_path / "r.tsv", content))
    assert str(info.value).startswith(expected)


def test_qrels_error_is_a_corpus_error():
    assert issubclass(QrelsError, CorpusError)


# --------------------------------------------------------------------------------------------- Cranfield


@pytest.fixture
def cranfield() -> Path:
    if not (CRANFIELD / "qrels.tsv.gz").is_file():
        pytest.skip("shared Cranfield data not present")
    return CRANFIELD


def test_cranfield_queries_and_qrels(cranfield):
    queries = read_queries(cranfield / "queries.tsv.gz")
    qrels = read_qrels(cranfield / "qrels.tsv.gz")
    assert len(queries) == 225 and list(queries)[:2] == ["1", "2"]
    assert sum(len(judged) for judged in qrels.values()) == 1612
    assert len(qrels) == 225 and set(qrels) == set(queries)
    assert {score for judged in qrels.values() for score in judged.values()} == {1, 2, 3, 4}
    assert qrels["1"]["184"] >= 1  # SOURCE.md's spot check
    # Ranking each query's judged documents best first is a perfect run.
    perfect = {qid: sorted(judged, key=judged.__getitem__, reverse=True) for qid, judged in qrels.items()}
    assert evaluate(perfect, qrels) == pytest.approx(
        {"ndcg@10": 1.0, "ndcg@10_binary": 1.0, "recall@100": 1.0, "mrr@10": 1.0, "queries": 225}
    )
