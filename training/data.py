"""Readers for training and evaluation files, and the deterministic batch order.

Formats:
  * text (`.txt`, `.txt.gz`, anything not CSV/TSV): one sentence per line (unsupervised SimCSE).
  * CSV (`.csv`, `.csv.gz`, RFC 4180 quoting): header with `sent0, sent1` and optionally `hard_neg`
    (SimCSE's nli_for_simcse.csv layout) or `label` (1 = similar, 0 = dissimilar, for the contrastive loss).
  * STS TSV (`.tsv`, `.tsv.gz`, no quoting): header with a score column and two sentence columns
    (STS-B: score, sentence1, sentence2; SICK: relatedness_score, sentence_A, sentence_B); read by
    `embedline.sts`, which export shares.

Blank lines are skipped and counted; a malformed row is a `DataError` naming file:line.
Training data is column-major (`columns[c][i]`) so a batch of any objective is a list of text columns
plus optional labels: the shape the losses (and the few-shot classifier trainer) consume.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from embedline import sts
from embedline.errors import EmbedlineError

log = logging.getLogger(__name__)

# Objectives whose pairs carry a similarity label in [0, 1] (a triple becomes a positive and a negative pair).
SIMILARITY_PAIR_OBJECTIVES = ("contrastive", "cosine")
# Objectives that read the CSV's label column: a similarity, or (supcon) a class id.
LABELLED_OBJECTIVES = (*SIMILARITY_PAIR_OBJECTIVES, "supcon")


class DataError(EmbedlineError):
    """A training or evaluation file that is missing, malformed or too small for the configuration."""


@dataclass(frozen=True)
class TrainingData:
    """Examples as text columns: unsup (sentence,); sup/triplet (sent0, sent1[, hard_neg]); contrastive (a, b)."""

    path: Path
    column_names: tuple[str, ...]
    columns: tuple[tuple[str, ...], ...]
    labels: tuple[float, ...] | None  # contrastive, cosine: pair similarity; supcon: class id
    skipped_empty: int

    def __len__(self) -> int:
        return len(self.columns[0])


@dataclass(frozen=True)
class Batch:
    """One step's examples: `columns[c]` is a list of texts; `labels` (batch,) for labelled pairs."""

    columns: list[list[str]]
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.columns[0])


def open_text(path: Path) -> io.TextIOBase:
    """A UTF-8 text file, gzip'd or not (newline='' as the csv module wants); a missing file is a DataError."""
    if not path.is_file():
        raise DataError(f"{path}: file does not exist")
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _kind(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    return "csv" if name.endswith(".csv") else "tsv" if name.endswith(".tsv") else "text"


def read_sentences(path: str | os.PathLike) -> TrainingData:
    """One sentence per line; blank lines skipped and counted."""
    path = Path(path)
    sentences: list[str] = []
    skipped = 0
    try:
        with open_text(path) as f:
            for line in f:
                text = line.strip()
                if text:
                    sentences.append(text)
                else:
                    skipped += 1
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read as UTF-8 text ({exc})") from exc
    return TrainingData(path, ("sentence",), (tuple(sentences),), None, skipped)


def csv_records(f: io.TextIOBase, path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each record of an open CSV file; a malformed one is a DataError naming the line."""
    reader = csv.reader(f, strict=True)
    try:
        for row in reader:
            yield reader.line_num, row
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from exc


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-header CSV row; blank rows yield an empty list."""
    try:
        with open_text(path) as f:
            yield from csv_records(f, path)
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read as UTF-8 CSV ({exc})") from exc


def read_pairs_csv(path: str | os.PathLike, objective: str, hard_negatives: bool = True) -> TrainingData:
    """sent0/sent1[/hard_neg|label] rows for the sup, triplet, contrastive, cosine and supcon objectives.

    contrastive, cosine: a `label` column gives each pair's label; without one, triples become two
    labelled pairs, (sent0, sent1, 1) and (sent0, hard_neg, 0). supcon: `label` is the pair's class id (an
    integer >= 0); any hard_neg column is not read.
    """
    path = Path(path)
    rows = _csv_rows(path)
    header_line, header = next(rows, (1, []))
    header = [h.strip() for h in header]
    missing = [c for c in ("sent0", "sent1") if c not in header]
    use_hard_neg = "hard_neg" in header and objective != "supcon" and (hard_negatives or objective != "sup")
    if objective == "triplet" and "hard_neg" not in header:
        missing.append("hard_neg")
    if objective in SIMILARITY_PAIR_OBJECTIVES and "label" not in header and "hard_neg" not in header:
        missing.append("label or hard_neg")
    if objective == "supcon" and "label" not in header:
        missing.append("label (the class id)")
    if missing:
        raise DataError(
            f"{path}:{header_line}: header {header} lacks column(s) {', '.join(missing)} "
            f"(the {objective} objective reads sent0, sent1 and hard_neg or label)"
        )
    wanted = ["sent0", "sent1"] + (["hard_neg"] if use_hard_neg else [])
    use_label = objective in LABELLED_OBJECTIVES and "label" in header
    index = {name: header.index(name) for name in header}
    columns: list[list[str]] = [[] for _ in wanted]
    labels: list[float] = []
    skipped = 0
    for line, row in rows:
        if not row or all(not field.strip() for field in row):
            skipped += 1
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{line}: expected {len(header)} fields ({', '.join(header)}), found {len(row)}")
        values = [row[index[name]].strip() for name in wanted]
        for name, value in zip(wanted, values):
            if not value:
                hint = "; pass --hard_negatives=false to ignore that column" if name == "hard_neg" else ""
                raise DataError(f"{path}:{line}: empty {name}{hint}")
        if use_label:
            labels.append(_read_label(row[index["label"]].strip(), objective, f"{path}:{line}"))
        for column, value in zip(columns, values):
            column.append(value)

    if objective in SIMILARITY_PAIR_OBJECTIVES and not use_label:
        # Triples -> labelled pairs: (anchor, positive, 1) then (anchor, hard negative, 0).
        anchors, positives, negatives = columns
        columns = [anchors + anchors, positives + negatives]
        labels = [1.0] * len(anchors) + [0.0] * len(anchors)
        wanted = ["sent0", "sent1"]
    return TrainingData(
        path,
        tuple(wanted),
        tuple(tuple(c) for c in columns),
        tuple(labels) if objective in LABELLED_OBJECTIVES else None,
        skipped,
    )


def _read_label(raw: str, objective: str, where: str) -> float:
    """A pair's label: similarity in [0, 1] (contrastive, cosine) or an integer class id >= 0 (supcon)."""
    if objective == "supcon":
        if not raw.isdigit():
            raise DataError(f"{where}: label {raw!r} is not a class id (an integer >= 0)")
        return float(raw)
    try:
        label = float(raw)
    except ValueError:
        raise DataError(f"{where}: label {raw!r} is not a number (1 = similar, 0 = dissimilar)") from None
    if not 0.0 <= label <= 1.0:
        raise DataError(f"{where}: label {raw!r} is outside [0, 1]")
    return label


def load_training_data(path: str | os.PathLike, objective: str, hard_negatives: bool = True) -> TrainingData:
    """The training file for `objective`, checked for enough distinct sentences."""
    path = Path(path)
    kind = _kind(path)
    if objective == "unsup":
        if kind != "text":
            raise DataError(f"{path}: the unsup objective reads a text file with one sentence per line")
        data = read_sentences(path)
    else:
        if kind != "csv":
            raise DataError(f"{path}: the {objective} objective reads a CSV file with columns sent0, sent1, ...")
        data = read_pairs_csv(path, objective, hard_negatives)
    if len(data) == 0:
        raise DataError(f"{path}: no examples (blank lines skipped: {data.skipped_empty})")
    if len(set(data.columns[0])) < 2 and objective in ("unsup", "sup"):
        raise DataError(f"{path}: fewer than 2 distinct sentences; in-batch negatives need at least 2")
    log.info("%s: %d examples (%s), %d blank lines skipped", path, len(data), ", ".join(data.column_names),
             data.skipped_empty)
    return data


def read_sts(path: str | os.PathLike) -> sts.StsPairs:
    """An STS TSV (header, score + two sentence columns, no quoting); a bad file is a DataError."""
    return sts.read_sts(path, error=DataError)


# --- Batch order -----------------------------------------------------------------------------------------


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch: the last partial batch is dropped (every step sees batch_size negatives)."""
    return num_examples // batch_size


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The example indices of global optimizer step `step`: a pure function of (seed, step), so resuming
    at any step replays exactly the batches an uninterrupted run would have seen."""
    per_epoch = steps_per_epoch(num_examples, batch_size)
    epoch, position = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_examples, generator=generator)
    return order[position * batch_size : (position + 1) * batch_size].tolist()


def make_batch(data: TrainingData, indices: list[int]) -> Batch:
    columns = [[column[i] for i in indices] for column in data.columns]
    labels = None
    if data.labels is not None:
        labels = torch.tensor([data.labels[i] for i in indices], dtype=torch.float32)
    return Batch(columns, labels)
