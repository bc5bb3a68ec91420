"""STS evaluation at export: Spearman (x100) between cosine similarity and gold scores, per variant.

Export cannot assume any data set is present, so this runs only when the user gives a file
(`embedline export --sts-file FILE` or $EMBEDLINE_STS_FILE): an STS TSV as `embedline.sts` reads it
(optionally .gz; STS-B or SICK columns). The numbers land in parity.json and embedline.json, and
`choose_variant` refuses a CPU variant that loses more than 0.5 Spearman to fp32.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from embedline.export.errors import ExportError
from embedline.sts import StsPairs, read_sts, spearman

STS_FILE_ENV = "EMBEDLINE_STS_FILE"
# Fewer pairs than this make a Spearman too noisy to gate a variant on.
MIN_PAIRS = 10


def resolve_sts_file(path: str | os.PathLike | None) -> Path | None:
    """The STS file to evaluate on: the argument, else $EMBEDLINE_STS_FILE, else None."""
    chosen = path or os.environ.get(STS_FILE_ENV)
    return Path(chosen).expanduser().resolve() if chosen else None


def read_sts_file(path: str | os.PathLike) -> StsPairs:
    """The STS pairs of `path`; a bad file, or fewer than MIN_PAIRS pairs, is an ExportError."""
    return read_sts(path, min_pairs=MIN_PAIRS, error=ExportError)


def sts_spearman(embed: Callable[[list[str]], np.ndarray], pairs: StsPairs) -> float:
    """Spearman x 100 of cosine(embed(s1), embed(s2)) against the gold scores, rounded to 2 decimals."""
    sentences = pairs.unique_sentences()
    embeddings = embed(sentences)  # (unique, dim)
    embeddings = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    first, second = pairs.rows(sentences)
    return round(100 * spearman((embeddings[first] * embeddings[second]).sum(axis=1), pairs.scores), 2)
