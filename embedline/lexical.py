"""BM25 as the embedded store computes it (SQLite FTS5), for the collections and for texts held in memory.

One definition of the lexical ranking, shared by search (the embedded store's `search_text`, hybrid search)
and training (hard negatives mined by BM25, `train --objective retrieval`): FTS5's bm25() (k1 1.2, b 0.75)
over Porter-stemmed unicode61 tokens, a query being the OR of its distinct words less a small stop list.
`Bm25Index` builds a throwaway in-memory FTS5 table, so a ranking made here equals the embedded store's for
the same documents. Stdlib only (sqlite3).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Sequence

# The FTS5 tokenizer of every lexical index.
FTS5_TOKENIZE = "porter unicode61"
# Words too common to rank by: dropped from BM25 queries (an OR over "the" would touch every document).
STOP_WORDS = frozenset(
    "a an and are as at be but by can do does for from how in is it its of on or that the their there these "
    "this to was were what when where which who why will with".split())


def match_expression(query: str) -> str | None:
    """The FTS5 MATCH expression of a query: its distinct words, stop words dropped, OR'ed (None: no word left).

    Each word is quoted, so FTS5's own syntax (AND, NEAR, *, column filters) in a user's text is plain text.
    """
    terms = [t for t in re.findall(r"\w+", query.lower()) if t not in STOP_WORDS]
    if not terms:
        return None
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in dict.fromkeys(terms))


class Bm25Index:
    """BM25 over texts held in memory: `search(queries, k)` -> per query [(row, score), ...], best first.

    Rows are positions in `texts`; empty texts are indexed too (they match nothing). Scores are FTS5's bm25()
    negated, so higher is better, as the store's hits.
    """

    def __init__(self, texts: Sequence[str]):
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.execute(f"CREATE VIRTUAL TABLE lexical USING fts5(text, tokenize='{FTS5_TOKENIZE}')")
        self._db.executemany("INSERT INTO lexical(rowid, text) VALUES (?, ?)",
                             ((row, text) for row, text in enumerate(texts)))
        self._db.commit()

    def search(self, queries: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        results = []
        for query in queries:
            match = match_expression(query)
            if match is None:
                results.append([])
                continue
            rows = self._db.execute("SELECT rowid, bm25(lexical) FROM lexical WHERE lexical MATCH ? "
                                    "ORDER BY bm25(lexical) LIMIT ?", (match, k))
            results.append([(int(row), -float(score)) for row, score in rows])
        return results

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Bm25Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
