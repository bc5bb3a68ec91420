"""STS files and their metric, shared by training (dev evaluation, `eval-sts`) and export (per-variant Spearman).

An STS file is a TSV (optionally .gz): a header line, TAB-separated fields, no quoting, a score column and two
sentence columns (STS-B: score, sentence1, sentence2; SICK: relatedness_score, sentence_A, sentence_B).
Spearman is computed with numpy alone, because the `export` extra has no scipy.
"""

from __future__ import annotations

import gzip
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedline.errors import EmbedlineError

SCORE_COLUMNS = ("score", "relatedness_score", "similarity")
SENTENCE_COLUMNS = (("sentence1", "sentence2"), ("sentence_A", "sentence_B"), ("sent0", "sent1"))


@dataclass(frozen=True)
class StsPairs:
    """Sentence pairs with gold similarity scores, read from `path`."""

    path: Path
    sentences1: tuple[str, ...]
    sentences2: tuple[str, ...]
    scores: tuple[float, ...]

    @property
    def source(self) -> str:
        return str(self.path)

    def unique_sentences(self) -> list[str]:
        """Each sentence once, in the order of first appearance."""
        return list(dict.fromkeys((*self.sentences1, *self.sentences2)))

    def rows(self, sentences: list[str]) -> tuple[list[int], list[int]]:
        """The rows of each pair's first and second sentence in `sentences` (unique, in any order)."""
        position = {text: i for i, text in enumerate(sentences)}
        return [position[t] for t in self.sentences1], [position[t] for t in self.sentences2]


def read_sts(path: str | os.PathLike, *, min_pairs: int = 2,
             error: type[EmbedlineError] = EmbedlineError) -> StsPairs:
    """An STS TSV with at least `min_pairs` scored pairs; anything wrong is `error`, naming file:line.

    `error` lets each stage raise its own kind (training a DataError, export an ExportError).
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file does not exist")
    try:
        with _open_text(path) as f:
            pairs = _read_pairs(f, path, error)
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        raise error(f"{path}: cannot read as UTF-8 TSV ({exc})") from exc
    if len(pairs.scores) < min_pairs:
        raise error(f"{path}: only {len(pairs.scores)} scored pairs; a correlation needs at least {min_pairs}")
    return pairs


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _read_pairs(f: io.TextIOBase, path: Path, error: type[EmbedlineError]) -> StsPairs:
    """The pairs of an open STS file: the header picks the columns, blank lines are skipped."""
    header = f.readline().rstrip("\r\n").split("\t")
    score_col = next((header.index(c) for c in SCORE_COLUMNS if c in header), None)
    pair = next((p for p in SENTENCE_COLUMNS if p[0] in header and p[1] in header), None)
    if score_col is None or pair is None:
        raise error(
            f"{path}:1: header {header} needs a score column ({' / '.join(SCORE_COLUMNS)}) and two "
            f"sentence columns ({' / '.join('+'.join(p) for p in SENTENCE_COLUMNS)})"
        )
    col1, col2 = header.index(pair[0]), header.index(pair[1])
    sentences1: list[str] = []
    sentences2: list[str] = []
    scores: list[float] = []
    for line_no, line in enumerate(f, start=2):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise error(f"{path}:{line_no}: expected {len(header)} tab-separated fields, found {len(fields)}")
        try:
            score = float(fields[score_col])
        except ValueError:
            raise error(f"{path}:{line_no}: score {fields[score_col]!r} is not a number") from None
        sentences1.append(fields[col1].strip())
        sentences2.append(fields[col2].strip())
        scores.append(score)
    return StsPairs(path, tuple(sentences1), tuple(sentences2), tuple(scores))


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
