"""Hard negatives for retrieval: each training query's top passages by BM25 and/or by the model being trained.

DPR (Karpukhin et al., EMNLP 2020) adds one BM25 passage per question that does not contain the answer to
the in-batch negatives; ANCE (Xiong et al., ICLR 2021) mines them from the model's own index instead, and
refreshes that index as the model moves, since yesterday's hard negatives are easy today. Here:

  * `bm25`: the core's BM25 (`embedline.lexical`, the ranking `index` and hybrid search use), mined once;
  * `self`: an exact search of the corpus embedded by the current model (corpora of thousands of passages
    take seconds), mined at the start and again every `refresh_steps`;
  * `bm25+self`: both lists interleaved, each passage once.

Labelled passages are never candidates: a query's passages judged relevant (score > 0) are taken out of its
list, and how many were is counted (the first half of the false-negative guard; the loss holds the second,
training/simcse/losses.py: guarded_info_nce_loss). Each step draws its negatives from the candidates with a
generator seeded by (seed, step), so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from embedline.lexical import Bm25Index


@dataclass
class Candidates:
    """Each training query's hard-negative candidates (corpus rows, best first), and how they were mined.

    step: the optimizer step they were mined before (-1: none yet); labelled_excluded: relevant passages
    taken out of the top lists at the latest mining (the labelled false negatives the guard kept out).
    """

    rows: dict[str, list[int]] = field(default_factory=dict)
    step: int = -1
    labelled_excluded: int = 0

    def to_state(self) -> dict[str, Any]:
        return {"rows": self.rows, "step": self.step, "labelled_excluded": self.labelled_excluded}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Candidates:
        return cls({q: list(rows) for q, rows in state["rows"].items()}, state["step"], state["labelled_excluded"])


def _without_relevant(ranked: Sequence[int], relevant: dict[int, int], depth: int) -> tuple[list[int], int]:
    """The first `depth` rows of `ranked` that are not labelled relevant, and how many relevant ones were passed."""
    kept, excluded = [], 0
    for row in ranked:
        if row in relevant:
            excluded += 1
        elif len(kept) < depth:
            kept.append(row)
        else:
            break
    return kept, excluded


def bm25_candidates(texts: Sequence[str], queries: dict[str, str], relevant: dict[str, dict[int, int]],
                    depth: int) -> tuple[dict[str, list[int]], int]:
    """({query id: top `depth` BM25 rows that are not relevant}, relevant rows excluded) over `texts`."""
    with Bm25Index(texts) as index:
        ids = list(queries)
        hits = index.search([queries[q] for q in ids], depth + max(map(len, relevant.values())))
    out, excluded = {}, 0
    for query_id, ranked in zip(ids, hits):
        out[query_id], passed = _without_relevant([row for row, _ in ranked], relevant[query_id], depth)
        excluded += passed
    return out, excluded


def dense_candidates(query_vectors: np.ndarray, passage_vectors: np.ndarray, query_ids: Sequence[str],
                     relevant: dict[str, dict[int, int]], depth: int) -> tuple[dict[str, list[int]], int]:
    """The same from an exact search: unit vectors, query_vectors[i] is query_ids[i]'s."""
    reach = min(len(passage_vectors), depth + max(map(len, relevant.values())))
    scores = torch.from_numpy(query_vectors) @ torch.from_numpy(passage_vectors).T
    top = torch.topk(scores, reach, dim=1).indices.tolist()
    out, excluded = {}, 0
    for query_id, ranked in zip(query_ids, top):
        out[query_id], passed = _without_relevant(ranked, relevant[query_id], depth)
        excluded += passed
    return out, excluded


def interleave(first: dict[str, list[int]], second: dict[str, list[int]], depth: int) -> dict[str, list[int]]:
    """Both lists of each query taken in turns (first[0], second[0], first[1], ...), each row once, cut at depth."""
    out = {}
    for query_id in first:
        a, b = first[query_id], second.get(query_id, [])
        merged = [row for pair in zip(a, b) for row in pair] + a[len(b):] + b[len(a):]
        out[query_id] = list(dict.fromkeys(merged))[:depth]
    return out


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one step's negative draws: a pure function of (seed, step), like the batch order."""
    return torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * step + 1)


def draw_negatives(candidates: list[int], relevant: dict[int, int], count: int, corpus_size: int,
                   generator: torch.Generator) -> list[int]:
    """`count` distinct rows from `candidates` at random; when they are too few, random non-relevant rows."""
    chosen = [candidates[i] for i in torch.randperm(len(candidates), generator=generator)[:count].tolist()]
    while len(chosen) < count and len(relevant) + len(chosen) < corpus_size:
        row = int(torch.randint(corpus_size, (1,), generator=generator))
        if row not in relevant and row not in chosen:
            chosen.append(row)
    return chosen
