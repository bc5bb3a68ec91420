"""Query-passage pairs for `embedline diagnose`: alignment and uniformity of a retrieval model's two sides.

    embedline diagnose --artifact DIR --corpus corpus.tsv --queries queries.tsv --qrels qrels.tsv --output DIR

A retrieval model is judged on pairs that are not paraphrases: a short question and the passage that answers
it. Its positives are the (query, relevant passage) pairs of the qrels (score > 0), each side embedded with
the model's own prompt for it ("query", and the first of "passage", "document", ... it has), as `index` and
search embed them. Measured by diagnose.py's `pair_measures` (Wang & Isola 2020, unit vectors; lower is
better for both):

  * alignment: E ||f(q) - f(p)||^2 over the pairs;
  * uniformity: log E exp(-2 ||f(x) - f(y)||^2) over the pairs' queries and passages together, and over each
    side alone (`uniformity_queries`, `uniformity_passages`): a model whose queries all sit in one corner of
    the space shows it on the query side first;
  * positive_cosine: the mean cosine of a query and its relevant passage, beside `random_pair_cosine`, a query
    and a passage of another pair (the gap is what ranking works with).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedline import artifact as art
from embedline.retrieval import PASSAGE_PROMPTS, QUERY_PROMPT
from embedline.training.retrieval_data import read_corpus, read_judged_queries, resolve_title_field


@dataclass(frozen=True)
class QueryPassagePairs:
    """Unique queries and passages and, per pair, the row of each side: queries[left[i]] ~ passages[right[i]]."""

    source: Path                    # the qrels file
    queries: tuple[str, ...]
    passages: tuple[str, ...]
    left: np.ndarray
    right: np.ndarray

    @property
    def texts(self) -> list[str]:
        return [*self.queries, *self.passages]

    @property
    def sides(self) -> tuple[str, ...]:
        return ("query",) * len(self.queries) + ("passage",) * len(self.passages)


def read_pairs(corpus: str | os.PathLike, queries: str | os.PathLike, qrels: str | os.PathLike,
               title_field: str = "auto", max_texts: int = 0, seed: int = 0) -> QueryPassagePairs:
    """The relevant pairs of `qrels` (the retrieval trainer's reader and checks); with `max_texts`, a seeded
    subset of the pairs whose queries and passages number at most that many."""
    documents = read_corpus(corpus, resolve_title_field(corpus, title_field))
    judged = read_judged_queries(queries, qrels, documents, "diagnosed")
    pairs = judged.pairs()
    if max_texts:
        order = np.random.default_rng(seed).permutation(len(pairs))
        kept: list[int] = []
        seen: set[Any] = set()
        for i in order:
            query_id, row = pairs[i]
            added = {("q", query_id), ("p", row)} - seen
            if len(seen) + len(added) > max_texts:
                continue
            seen |= added
            kept.append(int(i))
        pairs = [pairs[i] for i in sorted(kept)]
    query_ids = list(dict.fromkeys(q for q, _ in pairs))
    rows = list(dict.fromkeys(row for _, row in pairs))
    query_at = {q: i for i, q in enumerate(query_ids)}
    row_at = {row: i for i, row in enumerate(rows)}
    return QueryPassagePairs(Path(qrels), tuple(judged.texts[q] for q in query_ids),
                             tuple(documents.texts[row] for row in rows),
                             np.array([query_at[q] for q, _ in pairs]), np.array([row_at[r] for _, r in pairs]))


def side_prompts(source: str | os.PathLike) -> tuple[str, str]:
    """(query prompt, passage prompt) texts of an artifact or model directory ("" where it has none)."""
    path, _ = art.resolve_model_source(source)
    config_file = Path(path) / art.PROMPTS_FILE
    prompts = (art.read_json(config_file).get("prompts") or {}) if config_file.is_file() else {}
    passage = next((prompts[name] for name in PASSAGE_PROMPTS if name in prompts), "")
    return prompts.get(QUERY_PROMPT, ""), passage


def embed_pairs(embed: Any, source: str | os.PathLike, pairs: QueryPassagePairs) -> np.ndarray:
    """Queries then passages, each side with the model's prompt: rows in the order of `pairs.texts`."""
    query_prompt, passage_prompt = side_prompts(source)
    queries = embed([query_prompt + text for text in pairs.queries])
    passages = embed([passage_prompt + text for text in pairs.passages])
    return np.concatenate([queries, passages])
