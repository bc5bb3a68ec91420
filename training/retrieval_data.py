"""Retrieval data: a corpus, queries and their judgments, read and checked whole before anything is trained.

Shared by the retrieval objective (simcse/retrieval.py) and `diagnose` over query-passage pairs.

Files are read as `embedline index` and `eval-retrieval` read them (the core's `embedline.documents` and
`embedline.retrieval`), so one file means the same thing to the trainer, the index and the evaluation:

  * corpus: TSV/CSV/JSON lines/Parquet with an id and a text column (+ an optional title, joined as
    title + " " + text). Documents with an empty text are skipped and counted (Cranfield has two);
  * queries: query_id + text; qrels: query_id, doc_id, score (> 0 = relevant, <= 0 = judged not relevant).

Bad input fails before anything is trained: a judgment naming a query the queries file lacks or a document
the corpus lacks is a `file:line` error; an empty corpus, queries or qrels file is an error naming the file.
Queries without a relevant judgment are reported and skipped, and so are judgments of empty documents.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from embedline.documents import CorpusFormat, check_corpus, file_columns, read_documents, read_ids
from embedline.retrieval import QrelsError, read_qrels, read_queries

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Corpus:
    """The passages, in file order: `ids[row]`, `texts[row]`; `row[id]` the inverse."""

    path: Path
    ids: tuple[str, ...]
    texts: tuple[str, ...]
    empty_ids: frozenset[str]  # documents with an empty text: not trained on, not ranked

    @cached_property
    def row(self) -> dict[str, int]:
        return {doc_id: row for row, doc_id in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class JudgedQueries:
    """The queries that have a relevant passage, with their judgments.

    texts: {query id: text}, in the queries file's order; relevant: {query id: {corpus row: score > 0}};
    qrels: {query id: {doc id: score}}, every judgment of those queries (what `embedline.retrieval.evaluate`
    scores rankings against).
    """

    texts: dict[str, str]
    relevant: dict[str, dict[int, int]]
    qrels: dict[str, dict[str, int]]
    skipped_queries: int      # queries of the file without a relevant judgment
    skipped_judgments: int    # relevant judgments of empty documents

    def pairs(self) -> list[tuple[str, int]]:
        """(query id, relevant corpus row) for every relevant judgment: the training examples, in a fixed order."""
        return [(query_id, row) for query_id in self.texts for row in sorted(self.relevant[query_id])]


def resolve_title_field(corpus: str | os.PathLike, title_field: str) -> str:
    """"auto": "title" when the corpus has such a column, else none (""); any other value as it is."""
    if title_field != "auto":
        return title_field
    return "title" if "title" in file_columns(corpus) else ""


def read_corpus(path: str | os.PathLike, title_field: str = "") -> Corpus:
    """The corpus's non-empty documents; a duplicate id, a bad row or an empty file is a CorpusError."""
    path = Path(path)
    fmt = CorpusFormat(title_field=title_field or None, skip_empty=True)
    check = check_corpus(path, fmt)  # the whole file first: duplicates and bad rows name their line
    documents = list(read_documents(path, fmt))
    ids = tuple(doc.id for doc in documents)
    every_id = {doc_id for doc_id, _ in read_ids(path, check.id_field)} if check.kind != "txt" else set(ids)
    empty = frozenset(every_id - set(ids))
    if empty:
        log.warning("%s: %d documents with an empty text are skipped (%s)", path.name, len(empty),
                    ", ".join(sorted(empty)[:5]))
    return Corpus(path, ids, tuple(doc.text for doc in documents), empty)


def read_judged_queries(queries_path: str | os.PathLike, qrels_path: str | os.PathLike, corpus: Corpus,
                        role: str = "training") -> JudgedQueries:
    """The queries with a relevant judgment; `role` ("training", "dev") names them in messages."""
    queries = read_queries(queries_path)
    every_document = set(corpus.ids) | corpus.empty_ids
    qrels = read_qrels(qrels_path, queries=queries, documents=every_document)
    rows = corpus.row
    relevant: dict[str, dict[int, int]] = {}
    skipped_judgments = 0
    for query_id, judged in qrels.items():
        skipped_judgments += sum(1 for doc_id, score in judged.items() if score > 0 and doc_id in corpus.empty_ids)
        scored = {rows[doc_id]: score for doc_id, score in judged.items() if score > 0 and doc_id in rows}
        if scored:
            relevant[query_id] = scored
    texts = {query_id: text for query_id, text in queries.items() if query_id in relevant}
    if not texts:
        raise QrelsError(f"{Path(qrels_path).name}: no query has a relevant judgment (score > 0) of a non-empty "
                         "document; nothing to train or evaluate on")
    skipped = len(queries) - len(texts)
    if skipped:
        log.warning("%s: %d of %d queries have no relevant judgment in %s: skipped", Path(queries_path).name,
                    skipped, len(queries), Path(qrels_path).name)
    if skipped_judgments:
        log.warning("%s: %d relevant judgments name an empty document: skipped", Path(qrels_path).name,
                    skipped_judgments)
    log.info("%s queries: %d, with %d relevant judgments", role, len(texts), sum(map(len, relevant.values())))
    return JudgedQueries(texts, {q: relevant[q] for q in texts}, {q: qrels[q] for q in texts}, skipped,
                         skipped_judgments)


@dataclass(frozen=True)
class RetrievalData:
    """Everything the objective reads: the corpus, the training queries and the dev queries (or None)."""

    corpus: Corpus
    train: JudgedQueries
    dev: JudgedQueries | None

    def __post_init__(self) -> None:
        if self.dev is not None:
            shared = set(self.train.texts) & set(self.dev.texts)
            if shared:
                log.warning("%d dev queries are training queries too (e.g. %r): the dev nDCG@10 is optimistic and "
                            "model selection with it", len(shared), sorted(shared)[0])


def read_retrieval_data(corpus: str, queries: str, qrels: str, dev_queries: str = "", dev_qrels: str = "",
                        title_field: str = "") -> RetrievalData:
    """Read and check every file of a retrieval run (see the module docstring)."""
    documents = read_corpus(corpus, title_field)
    train = read_judged_queries(queries, qrels, documents, "training")
    dev = read_judged_queries(dev_queries, dev_qrels, documents, "dev") if dev_queries else None
    return RetrievalData(documents, train, dev)
