"""Labelled texts for the few-shot classifier: read a `text`/`label` TSV or CSV, check it, sample N shots.

Formats (optionally gzip'd):
  * `.tsv`: header line, fields separated by one TAB, no quoting (the shared data's format);
  * `.csv`: RFC 4180 quoting.
Both need a `text` and a `label` column (labels are strings; other columns are ignored). Blank lines are
skipped. Every problem is a `DataError` naming the file (and the line where there is one): a missing
column, an empty text or label, a single class, a class with fewer examples than the requested shots.

`read_contrast_pairs` reads the user-written pairs of `train-classifier --pairs-file`, in the same two
formats, with a header naming one of two column sets (other columns are ignored):
  * `anchor`, `positive`, `negative`: the positive is the anchor's intent in other words, the negative a
    different intent in similar words;
  * `text_a`, `text_b`, `same`: same is 1/0, true/false or yes/no (case-insensitive).
An optional `label` column names the class the anchor and the positive (text_a and text_b of a `same`
row) belong to; it is checked against the training file's labels (`check_pair_labels`) and lets the rows
join a supervised contrastive stage 1. A wrong field count, an empty text, a bad `same` value, a label on
a different-class row or a label the training file does not have is a `DataError` naming the file and line.
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from embedline.training.data import DataError, csv_records, open_text

log = logging.getLogger(__name__)

TEXT_COLUMN = "text"
LABEL_COLUMN = "label"


@dataclass(frozen=True)
class LabeledData:
    """Texts and their string labels, in file order (or class order after `sample_shots`)."""

    path: Path
    texts: tuple[str, ...]
    labels: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def classes(self) -> tuple[str, ...]:
        """The distinct labels, sorted: the head's output order and labels.json."""
        return tuple(sorted(set(self.labels)))

    def counts(self) -> dict[str, int]:
        counts = Counter(self.labels)
        return {label: counts[label] for label in self.classes}


def _rows(path: Path, columns: str = "text and label") -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of every line of a TSV or CSV file, the header included."""
    name = path.name.lower().removesuffix(".gz")
    if not name.endswith((".tsv", ".csv")):
        raise DataError(f"{path}: expected a .tsv or .csv file (optionally .gz) with columns {columns}")
    try:
        with open_text(path) as f:
            if name.endswith(".tsv"):
                for number, line in enumerate(f, start=1):
                    yield number, line.rstrip("\r\n").split("\t")
            else:
                yield from csv_records(f, path)
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read as UTF-8 text ({exc})") from exc


def _header(rows) -> tuple[int, list[str]]:
    """(line number, column names) of a file's first row, a UTF-8 byte-order mark removed."""
    header_line, header = next(rows, (1, []))
    return header_line, [h.strip().lstrip("\ufeff") for h in header]


def _records(path: Path, rows, header: list[str]):
    """(line number, fields) of every non-blank row after the header, each with the header's field count."""
    for line, fields in rows:
        if all(not field.strip() for field in fields):
            continue
        if len(fields) != len(header):
            raise DataError(f"{path}:{line}: expected {len(header)} fields ({', '.join(header)}), found {len(fields)}")
        yield line, fields


def read_texts(path: str | os.PathLike, label_required: bool = True) -> tuple[Path, list[str], list[str] | None]:
    """(resolved path, texts, labels) of a text/label file; labels is None when the file has no label column
    and `label_required` is False. Texts and labels are checked non-empty, with the file and line."""
    path = Path(path).expanduser().resolve()
    rows = _rows(path)
    header_line, header = _header(rows)
    required = (TEXT_COLUMN, LABEL_COLUMN) if label_required else (TEXT_COLUMN,)
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}:{header_line}: missing column(s) {', '.join(missing)} "
                        f"(header is {header}; the classifier reads 'text' and 'label')")
    text_at = header.index(TEXT_COLUMN)
    label_at = header.index(LABEL_COLUMN) if LABEL_COLUMN in header else None
    texts: list[str] = []
    labels: list[str] = []
    for line, fields in _records(path, rows, header):
        text = fields[text_at].strip()
        label = fields[label_at].strip() if label_at is not None else None
        if not text:
            raise DataError(f"{path}:{line}: empty text" + (f" (label {label!r})" if label else ""))
        if label_at is not None and not label:
            raise DataError(f"{path}:{line}: empty label")
        texts.append(text)
        if label is not None:
            labels.append(label)
    return path, texts, labels if label_at is not None else None


def read_labeled(path: str | os.PathLike) -> LabeledData:
    """All rows of a text/label file, checked: non-empty texts and labels, at least two classes."""
    path, texts, labels = read_texts(path)
    data = LabeledData(path, tuple(texts), tuple(labels))
    if len(data.classes) < 2:
        found = f"only the label {data.classes[0]!r}" if data.classes else "no examples"
        raise DataError(f"{path}: the label column has {found}; a classifier needs at least 2 classes")
    log.info("%s: %d examples, %d classes", path, len(data), len(data.classes))
    return data


def sample_shots(data: LabeledData, shots: int, seed: int) -> LabeledData:
    """`shots` examples of every class, drawn without replacement with `seed` (grouped by class).

    Classes are visited in sorted order with one seeded generator, so the sample depends only on
    (file contents, shots, seed), not on the file's row order within a class.
    """
    if shots < 1:
        raise DataError(f"{data.path}: --shots must be >= 1, got {shots}")
    counts = data.counts()
    short = {label: n for label, n in counts.items() if n < shots}
    if short:
        listed = ", ".join(f"{label!r} has {n}" for label, n in sorted(short.items()))
        raise DataError(f"{data.path}: --shots {shots} needs {shots} examples per class, but {listed}")
    rng = random.Random(seed)
    by_class: dict[str, list[int]] = {label: [] for label in counts}
    for i, label in enumerate(data.labels):
        by_class[label].append(i)
    chosen = [i for label in data.classes for i in sorted(rng.sample(by_class[label], shots))]
    return LabeledData(data.path, tuple(data.texts[i] for i in chosen), tuple(data.labels[i] for i in chosen))


TRIPLE_HEADER = ("anchor", "positive", "negative")
PAIR_HEADER = ("text_a", "text_b", "same")
_SAME = {"1": 1.0, "true": 1.0, "yes": 1.0, "0": 0.0, "false": 0.0, "no": 0.0}


@dataclass(frozen=True)
class ContrastPairs:
    """User-written contrast examples: `columns` are (anchor, positive, negative) with `same` None, or
    (text_a, text_b) with `same` the 1.0 / 0.0 targets."""

    path: Path
    header: tuple[str, ...]  # TRIPLE_HEADER or PAIR_HEADER
    columns: tuple[tuple[str, ...], ...]
    same: tuple[float, ...] | None
    labels: tuple[str, ...] | None = None  # the optional label column ("" where a row leaves it empty)
    lines: tuple[int, ...] = ()  # each row's line in the file

    def __len__(self) -> int:
        return len(self.columns[0])

    @property
    def is_triples(self) -> bool:
        return self.same is None

    def texts(self) -> set[str]:
        return {text for column in self.columns for text in column}


def read_contrast_pairs(path: str | os.PathLike) -> ContrastPairs:
    """The rows of a pairs file (see the module docstring), checked; at least one row."""
    path = Path(path).expanduser().resolve()
    formats = "anchor, positive, negative or text_a, text_b, same"
    rows = _rows(path, formats)
    header_line, header = _header(rows)
    header = [h.lower() for h in header]
    kind = next((names for names in (TRIPLE_HEADER, PAIR_HEADER) if set(names) <= set(header)), None)
    if kind is None:
        raise DataError(f"{path}:{header_line}: a pairs file needs the columns {formats} (header is {header})")
    at = [header.index(name) for name in kind]
    label_at = header.index(LABEL_COLUMN) if LABEL_COLUMN in header else None
    columns: tuple[list[str], ...] = tuple([] for _ in kind)
    same: list[float] = []
    labels: list[str] = []
    lines: list[int] = []
    for line, fields in _records(path, rows, header):
        values = [fields[i].strip() for i in at]
        texts = values if kind is TRIPLE_HEADER else values[:2]
        for name, text in zip(kind, texts):
            if not text:
                raise DataError(f"{path}:{line}: empty {name}")
        if kind is PAIR_HEADER:
            if values[2].lower() not in _SAME:
                raise DataError(f"{path}:{line}: same must be 1/0, true/false or yes/no, got {values[2]!r}")
            same.append(_SAME[values[2].lower()])
        label = fields[label_at].strip() if label_at is not None else ""
        if label and kind is PAIR_HEADER and same[-1] == 0.0:
            raise DataError(f"{path}:{line}: label {label!r} on a row with same = 0: a label names the class "
                            "both texts share")
        labels.append(label)
        lines.append(line)
        for column, text in zip(columns, texts):
            column.append(text)
    if not columns[0]:
        raise DataError(f"{path}: no pairs (only a header)")
    used = kind if kind is TRIPLE_HEADER else kind[:2]
    pairs = ContrastPairs(path, kind, tuple(tuple(c) for c in columns[:len(used)]),
                          tuple(same) if kind is PAIR_HEADER else None,
                          tuple(labels) if label_at is not None else None, tuple(lines))
    log.info("%s: %d user-written %s rows", path, len(pairs), ", ".join(kind))
    return pairs


def check_pair_labels(pairs: ContrastPairs, classes: tuple[str, ...]) -> None:
    """Every label a pairs row names is one of the training file's `classes` (else a DataError naming the
    pairs file and the row's line)."""
    for label, line in zip(pairs.labels or (), pairs.lines):
        if label and label not in classes:
            raise DataError(f"{pairs.path}:{line}: label {label!r} is not in the training file "
                            f"(its labels: {', '.join(classes)})")
