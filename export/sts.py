"""STS evaluation at export: Spearman (x100) between cosine similarity and gold scores, per variant.

Export cannot assume any data set is present, so this runs only when the user gives a file
(`embedline export --sts-file FILE` or $EMBEDLINE_STS_FILE): a TSV (optionally .gz), header line,
TAB-separated, no quoting, with the columns of STS-B (sentence1, sentence2, score) or SICK
(sentence_A, sentence_B, relatedness_score). The numbers land in parity.json and embedline.json, and
`choose_variant` refuses a CPU variant that loses more than 0.5 Spearman to fp32.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedline.export.errors import ExportError

STS_FILE_ENV = "EMBEDLINE_STS_FILE"
_COLUMNS = (("sentence1", "sentence2", "score"), ("sentence_A", "sentence_B", "relatedness_score"))


@dataclass(frozen=True)
class StsPairs:
    """Sentence pairs with gold similarity scores, read from `source`."""

    sentences1: tuple[str, ...]
    sentences2: tuple[str, ...]
    scores: np.ndarray  # float64 (pairs,)
    source: str

    def unique_sentences(self) -> list[str]:
        return list(dict.fromkeys((*self.sentences1, *self.sentences2)))


def resolve_sts_file(path: str | os.PathLike | None) -> Path | None:
    """The STS file to evaluate on: the argument, else $EMBEDLINE_STS_FILE, else None."""
    chosen = path or os.environ.get(STS_FILE_ENV)
    return Path(chosen).expanduser().resolve() if chosen else None


def read_sts_file(path: str | os.PathLike) -> StsPairs:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            header = f.readline().rstrip("\n").split("\t")
            rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    except OSError as exc:
        raise ExportError(f"{path}: cannot read the STS file ({exc})") from exc
    columns = next((c for c in _COLUMNS if set(c) <= set(header)), None)
    if columns is None:
        raise ExportError(f"{path}: expected STS-B (sentence1, sentence2, score) or SICK (sentence_A, sentence_B, "
                          f"relatedness_score) columns, found {header}")
    a, b, s = (header.index(c) for c in columns)
    try:
        pairs = [(row[a], row[b], float(row[s])) for row in rows]
    except (IndexError, ValueError) as exc:
        raise ExportError(f"{path}: malformed row ({exc})") from exc
    if len(pairs) < 10:
        raise ExportError(f"{path}: only {len(pairs)} pairs; an STS Spearman needs more")
    first, second, scores = zip(*pairs)
    return StsPairs(tuple(first), tuple(second), np.asarray(scores, dtype=np.float64), str(path))


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as scipy.stats.rankdata)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two equal-length vectors."""
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    ra -= ra.mean()
    rb -= rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra * ra).sum() * (rb * rb).sum()))


def sts_spearman(embed: Callable[[list[str]], np.ndarray], pairs: StsPairs) -> float:
    """Spearman x 100 of cosine(embed(s1), embed(s2)) against the gold scores, rounded to 2 decimals."""
    sentences = pairs.unique_sentences()
    embeddings = embed(sentences)  # (unique, dim)
    embeddings = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    index = {s: i for i, s in enumerate(sentences)}
    first = embeddings[[index[s] for s in pairs.sentences1]]
    second = embeddings[[index[s] for s in pairs.sentences2]]
    return round(100 * spearman((first * second).sum(axis=1), pairs.scores), 2)
