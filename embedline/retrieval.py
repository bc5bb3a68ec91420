"""Retrieval metrics as BEIR reports them (pytrec_eval's trec_eval definitions), the queries / qrels files, and
the prompt names of the two sides of retrieval.

Shared by search (`eval-retrieval`, the collections' model record) and training (`train --objective retrieval`,
`diagnose`), so both read the same files with the same file:line errors and score with the same definitions.

Definitions (a document is relevant when its qrels score is > 0; unjudged documents are not relevant):

    nDCG@k     trec_eval's ndcg_cut: gain = the qrels score (linear, not 2^rel - 1), discount log2(rank + 1),
               ideal DCG from all the query's judged scores > 0, best first. Scores <= 0 gain nothing.
    recall@k   relevant documents in the top k / all the query's relevant documents.
    MRR@k      1 / rank of the first relevant document in the top k, else 0 (BEIR's own mrr).

`evaluate` averages over the queries with at least one relevant document, as BEIR does (pytrec_eval only
scores the queries in the qrels). It differs from BEIR in one corner: a query in the qrels with no ranking at
all counts as 0 here, where BEIR (averaging over the queries pytrec_eval returned) leaves it out of the mean.

Rankings are lists, best first: ties are the caller's to order. `ranking_from_scores` orders them the way
trec_eval does (score descending, then document id descending), which is what pytrec_eval sees from BEIR;
sentence-transformers' InformationRetrievalEvaluator breaks ties by ascending id instead, so on tied scores
the two can differ at the cut.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from embedline import wire
from embedline.documents import CorpusError, file_columns, read_rows

QUERY_ID_FIELDS = ("query_id", "query-id", "qid", "_id", "id")
QUERY_TEXT_FIELDS = ("text", "query")
QRELS_DOC_FIELDS = ("doc_id", "corpus-id", "docid", "corpus_id")
QRELS_SCORE_FIELDS = ("score", "relevance")
# The prompt names of the two sides, as sentence-transformers models name them: queries get "query"; passages
# the first of these the model has ("passage" as E5, "document" or "doc"). `train --objective retrieval`
# records its prompts under "query" and "passage"; `index` and search look them up by these names.
QUERY_PROMPT = wire.QUERY_PROMPT  # the wire contract's: the SDK prepends it to search queries
PASSAGE_PROMPTS = ("passage", "document", "doc", "corpus")


class QrelsError(CorpusError):
    """A queries or qrels file that is malformed (a CorpusError, so one except clause covers every input file)."""


# ------------------------------------------------------------------------------------------------ files


def read_queries(path: str | os.PathLike) -> dict[str, str]:
    """{query id: text} from a queries file with a header (TSV, CSV or JSON lines, optionally .gz).

    Columns: the first of QUERY_ID_FIELDS and of QUERY_TEXT_FIELDS the file has. An empty query text or a
    repeated id is an error naming its line.
    """
    path = Path(path)
    columns = file_columns(path)
    id_col = _pick(columns, QUERY_ID_FIELDS, path.name, "query id")
    text_col = _pick(columns, QUERY_TEXT_FIELDS, path.name, "query text")
    queries: dict[str, str] = {}
    first_where: dict[str, str] = {}
    for where, row in read_rows(path, [id_col, text_col]):
        query_id = _id(row[id_col], where, id_col)
        text = row[text_col]
        if not isinstance(text, str) or not text.strip():
            raise QrelsError(f"{where}: empty query text for id {query_id!r}")
        if query_id in queries:
            raise QrelsError(f"{where}: duplicate query id {query_id!r} (first at {first_where[query_id]})")
        queries[query_id] = text
        first_where[query_id] = where
    if not queries:
        raise QrelsError(f"{path.name}: no queries")
    return queries


def read_qrels(path: str | os.PathLike, *, queries: Mapping[str, Any] | None = None,
               documents: Mapping[str, Any] | set[str] | None = None) -> dict[str, dict[str, int]]:
    """{query id: {document id: score}} from a qrels file with a header (BEIR's qrels/test.tsv layout).

    Columns: query_id | query-id | qid, doc_id | corpus-id | docid, score. Every judgment is kept, scores
    <= 0 included (they mark a judged non-relevant document); a repeated (query, document) pair is an error.
    With `queries` / `documents` (the ids of the queries file and of the corpus), a judgment naming an id
    that is not there is an error naming its line: a typo or a file of another collection.
    """
    path = Path(path)
    qrels: dict[str, dict[str, int]] = {}
    for where, query_id, doc_id, score in qrels_rows(path):
        if queries is not None and query_id not in queries:
            raise QrelsError(f"{where}: query {query_id!r} is not in the queries file")
        if documents is not None and doc_id not in documents:
            raise QrelsError(f"{where}: document {doc_id!r} is not in the corpus")
        judged = qrels.setdefault(query_id, {})
        if doc_id in judged:
            raise QrelsError(f"{where}: a second judgment for query {query_id!r} and document {doc_id!r}")
        judged[doc_id] = score
    if not qrels:
        raise QrelsError(f"{path.name}: no judgments")
    return qrels


def qrels_rows(path: str | os.PathLike) -> Iterator[tuple[str, str, str, int]]:
    """(where, query id, document id, score) of each judgment of a qrels file, checked one by one."""
    path = Path(path)
    columns = file_columns(path)
    query_col = _pick(columns, QUERY_ID_FIELDS[:3], path.name, "query id")
    doc_col = _pick(columns, QRELS_DOC_FIELDS, path.name, "document id")
    score_col = _pick(columns, QRELS_SCORE_FIELDS, path.name, "score")
    for where, row in read_rows(path, [query_col, doc_col, score_col]):
        yield where, _id(row[query_col], where, query_col), _id(row[doc_col], where, doc_col), _score(
            row[score_col], where)


def _pick(columns: list[str], candidates: Sequence[str], name: str, what: str) -> str:
    for candidate in candidates:
        if candidate in columns:
            return candidate
    raise QrelsError(f"{name}: no {what} column ({', '.join(candidates)}); the file has: {', '.join(columns)}")


def _id(value: Any, where: str, column: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise QrelsError(f"{where}: empty or invalid {column!r}")
    return value


def _score(value: Any, where: str) -> int:
    """An integer relevance: trec_eval reads qrels scores as integers, so 1.5 would not mean what it says."""
    if isinstance(value, bool):
        raise QrelsError(f"{where}: score {value!r} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    try:
        return int(str(value).strip())
    except ValueError:
        raise QrelsError(f"{where}: score {value!r} is not an integer") from None


# ---------------------------------------------------------------------------------------------- metrics


def ndcg_at_k(ranking: Sequence[str], relevant: Mapping[str, int], k: int, *, binary: bool = False) -> float:
    """trec_eval's ndcg_cut.k (linear gains); binary=True: every relevant document gains 1 (what
    sentence-transformers' InformationRetrievalEvaluator reports as NDCG@k)."""
    _check_k(k)
    ideal = sorted((rel for rel in relevant.values() if rel > 0), reverse=True)[:k]
    if binary:
        ideal = [1] * len(ideal)
    if not ideal:
        return 0.0
    return _dcg(_gains(ranking[:k], relevant, binary)) / _dcg(ideal)


def recall_at_k(ranking: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    """|relevant in the top k| / |relevant|; 0 for a query without relevant documents (as trec_eval)."""
    _check_k(k)
    wanted = {doc_id for doc_id, rel in relevant.items() if rel > 0}
    if not wanted:
        return 0.0
    return len(wanted.intersection(ranking[:k])) / len(wanted)


def mrr_at_k(ranking: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    """1 / rank of the first relevant document within the top k, else 0."""
    _check_k(k)
    for rank, doc_id in enumerate(ranking[:k], 1):
        if relevant.get(doc_id, 0) > 0:
            return 1.0 / rank
    return 0.0


def evaluate(
    rankings: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Mapping[str, int]],
    ndcg_k: int = 10,
    recall_k: int = 100,
    mrr_k: int = 10,
) -> dict[str, float]:
    """Means over the queries with a relevant document in the qrels (others are not scored, as in BEIR).

    Keys: "ndcg@{ndcg_k}", "ndcg@{ndcg_k}_binary", "recall@{recall_k}", "mrr@{mrr_k}" and "queries" (how many
    were scored). A scored query missing from `rankings` counts as 0. If no ranked query has qrels at all, the
    ids do not match (e.g. "001" against "1"): that is an error, not a silent 0.
    """
    scored = [query_id for query_id, judged in qrels.items() if any(rel > 0 for rel in judged.values())]
    if not scored:
        raise QrelsError("no query in the qrels has a relevant document (score > 0)")
    if rankings and not any(query_id in rankings for query_id in scored):
        raise QrelsError(
            f"none of the {len(rankings)} ranked queries has a relevant document in the qrels: do the query ids match?"
        )
    totals = {"ndcg": 0.0, "ndcg_binary": 0.0, "recall": 0.0, "mrr": 0.0}
    for query_id in scored:
        ranking, relevant = rankings.get(query_id, []), qrels[query_id]
        totals["ndcg"] += ndcg_at_k(ranking, relevant, ndcg_k)
        totals["ndcg_binary"] += ndcg_at_k(ranking, relevant, ndcg_k, binary=True)
        totals["recall"] += recall_at_k(ranking, relevant, recall_k)
        totals["mrr"] += mrr_at_k(ranking, relevant, mrr_k)
    n = len(scored)
    return {
        f"ndcg@{ndcg_k}": totals["ndcg"] / n,
        f"ndcg@{ndcg_k}_binary": totals["ndcg_binary"] / n,
        f"recall@{recall_k}": totals["recall"] / n,
        f"mrr@{mrr_k}": totals["mrr"] / n,
        "queries": n,
    }


def ranking_from_scores(scores: Mapping[str, float]) -> list[str]:
    """Document ids best first, ties broken as trec_eval does (document id descending, compared as strings).

    pytrec_eval takes a run as {doc id: score} and re-sorts it this way, so a ranking made here is the one BEIR
    evaluates, ties included.
    """
    return sorted(scores, key=lambda doc_id: (scores[doc_id], doc_id), reverse=True)


def _gains(top: Sequence[str], relevant: Mapping[str, int], binary: bool) -> list[float]:
    """Each ranked document's gain; a document listed twice gains once (a pytrec_eval run cannot repeat one)."""
    seen: set[str] = set()
    gains = []
    for doc_id in top:
        rel = relevant.get(doc_id, 0) if doc_id not in seen else 0
        seen.add(doc_id)
        gains.append(0 if rel <= 0 else 1 if binary else rel)
    return gains


def _dcg(gains: Sequence[float]) -> float:
    # rank r (1-based) is discounted by log2(r + 1): trec_eval's log2(i + 2) for 0-based i.
    return sum(gain / math.log2(i + 2) for i, gain in enumerate(gains) if gain > 0)


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
