"""Reading a corpus file as documents, streaming, and checking it whole before anything is written.

Formats, by file name (the text formats may end in `.gz`):

    .txt             one text per line, no header; the id is the 1-based line number. A blank line is a line
                     (so ids stay line numbers) and falls under the empty-text rule.
    .tsv             header line, TAB-separated, no quoting: `line.rstrip("\\n").split("\\t")` (shared/data's
                     convention), so every row must have the header's field count.
    .csv             RFC 4180 (the csv module), header line; a quoted field may span lines. A field over the
                     csv module's limit (128 Ki characters; a process-wide setting, left alone) is an error.
    .jsonl .ndjson   one JSON object per line; an integer id becomes its decimal string.
    .parquet         read a batch of rows at a time, only the columns needed.

Every line format is read as bytes and each line is decoded here, so invalid UTF-8 names its line (a text-mode
file would only give a byte offset into the decompressed stream). Blank lines in TSV/CSV/JSON lines hold no
record and are passed over. Every problem is a `CorpusError` whose message starts with where it is:
"corpus.tsv:17: ..." (1-based line; Parquet: "corpus.parquet:row 17").

Ids are always strings (BEIR's convention), compared exactly as written: " 12" and "12" are different ids.
Metadata from TSV/CSV is text, except a field written exactly as a plain decimal number ("1965", "-3",
"0.25"), which becomes that number, so that `year >= 1960` filters as a user expects; "007", "1e5" or
"+3" stay text, since reading them as numbers could change their meaning. JSON lines and Parquet keep their
own types (JSON scalars or lists of them).
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from embedline.errors import EmbedlineError

# Looked for in this order when no id field is named: BEIR's corpus.jsonl says "_id", its qrels "corpus-id".
ID_FIELDS = ("id", "_id", "doc_id", "docid", "corpus-id")
TEXT_FIELD = "text"
PARQUET_BATCH_ROWS = 1024
SKIPPED_KEPT = 10  # how many skipped documents' wheres a CorpusCheck keeps (all are counted)

_TEXT_SUFFIXES = {".txt": "txt", ".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_KNOWN = ".txt, .tsv, .csv, .jsonl, .ndjson (each optionally .gz) or .parquet"
_JSON_SCALARS = (str, int, float, bool, type(None))


class CorpusError(EmbedlineError):
    """A corpus (or queries, qrels, ids) file that cannot be read as documents; the message starts with where."""


@dataclass(frozen=True)
class Document:
    """One document of a corpus file, with where it came from for messages."""

    id: str
    text: str
    metadata: dict  # JSON-able values only
    where: str      # "corpus.tsv:17" (file name + 1-based line); Parquet: "corpus.parquet:row 17"


@dataclass(frozen=True)
class CorpusFormat:
    """How to read a corpus file: what `embedline index` options fill in."""

    id_field: str | None = None      # None: the first of ID_FIELDS the file has; .txt files: the line number
    text_field: str | None = None    # None: "text"
    title_field: str | None = None   # joined as BEIR / sentence-transformers do: (title + " " + text).strip()
    metadata_fields: tuple[str, ...] = ()
    skip_empty: bool = False         # empty / whitespace texts: an error, or skipped and counted


@dataclass(frozen=True)
class CorpusCheck:
    """What a full pass over a corpus file found (it raised CorpusError on anything wrong)."""

    documents: int                                          # documents that will be indexed
    skipped_empty: list[str] = field(default_factory=list)  # wheres of the first SKIPPED_KEPT skipped ones
    skipped_empty_count: int = 0                            # all skipped (skip_empty) empty texts
    kind: str = ""                                          # "txt", "tsv", "csv", "jsonl" or "parquet"
    id_field: str | None = None                             # the id field used (None: .txt line numbers)


@dataclass(frozen=True)
class _Fields:
    """The columns a read takes, resolved against the file's own columns."""

    id: str
    text: str
    title: str | None
    metadata: tuple[str, ...]

    def wanted(self) -> list[str]:
        named = [self.id, self.text, *([self.title] if self.title else []), *self.metadata]
        return list(dict.fromkeys(named))


# ---------------------------------------------------------------------------------------------- public API


def read_documents(path: str | os.PathLike, fmt: CorpusFormat = CorpusFormat()) -> Iterator[Document]:
    """The documents of a corpus file, streamed: memory is one row (line formats) or one batch (Parquet).

    A bad row raises CorpusError when it is reached; duplicate ids are not looked for here (that takes memory
    for every id: see `check_corpus`). The file, its type and the named columns are checked before this returns.
    """
    return _without_empty(_open_documents(Path(path), fmt), fmt.skip_empty, on_skip=None)


def check_corpus(path: str | os.PathLike, fmt: CorpusFormat = CorpusFormat()) -> CorpusCheck:
    """Read the whole file once and raise CorpusError on the first problem, so nothing is half-indexed.

    Beyond what `read_documents` checks, it finds duplicate ids: it keeps every id seen (memory O(ids)) with its
    where, so the message can name both lines.
    """
    path = Path(path)
    skipped: list[str] = []
    skipped_count = 0

    def on_skip(where: str) -> None:
        nonlocal skipped_count
        skipped_count += 1
        if len(skipped) < SKIPPED_KEPT:
            skipped.append(where)

    first_where: dict[str, str] = {}
    for doc in _without_empty(_open_documents(path, fmt), fmt.skip_empty, on_skip):
        if doc.id in first_where:
            raise CorpusError(f"{doc.where}: duplicate id {_show(doc.id)} (first at {_position(first_where[doc.id])})")
        first_where[doc.id] = doc.where
    if not first_where:
        why = f" (all {skipped_count} texts are empty)" if skipped_count else ""
        raise CorpusError(f"{path.name}: no documents{why}")
    kind = file_kind(path)
    id_field = None if kind == "txt" else _resolve_fields(fmt, file_columns(path), path.name).id
    return CorpusCheck(len(first_where), skipped, skipped_count, kind, id_field)


def read_ids(path: str | os.PathLike, id_field: str | None = None) -> Iterator[tuple[str, str]]:
    """(id, where) of each id in a file: for `embedline index --delete`.

    A TSV/CSV/JSON lines/Parquet file is read as a corpus (its id field: `id_field`, or the first of ID_FIELDS).
    Anything else (.txt, no extension, ...) is one id per line, surrounding whitespace dropped, blank lines
    passed over.
    """
    path = _existing(Path(path))
    kind = _kind_or_none(path)
    if kind in (None, "txt"):
        return _id_lines(path)
    column = id_field or _detect_id(file_columns(path), path.name)
    return ((_id_value(row[column], where, column), where) for where, row in read_rows(path, [column]))


def file_kind(path: str | os.PathLike) -> str:
    """"txt", "tsv", "csv", "jsonl" or "parquet", from the file name; anything else is a CorpusError."""
    kind = _kind_or_none(Path(path))
    if kind is None:
        raise CorpusError(f"{Path(path).name}: unknown file type (expected {_KNOWN})")
    return kind


def file_columns(path: str | os.PathLike) -> list[str]:
    """The column names of a TSV/CSV/Parquet file; a JSON lines file: its first object's keys; .txt: none."""
    path = _existing(Path(path))
    kind = file_kind(path)
    if kind == "txt":
        return []
    if kind == "parquet":
        return list(_parquet_file(path).schema_arrow.names)
    if kind == "jsonl":
        for _, obj in _json_objects(path):
            return list(obj)
        raise CorpusError(f"{path.name}: empty file (no JSON object)")
    for _, header in _delimited_records(path, kind):
        return [name.strip() for name in header]
    raise CorpusError(f"{path.name}: empty file (no header line)")


def read_rows(path: str | os.PathLike, columns: Sequence[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, {column: value}) of each record of a TSV/CSV/JSON lines/Parquet file, only `columns` read.

    For other tabular files (queries, qrels) that want this module's checks and messages. The columns are
    checked against the file's before this returns.
    """
    path = _existing(Path(path))
    kind = file_kind(path)
    if kind == "txt":
        raise CorpusError(f"{path.name}: a text-lines file has no columns")
    _require_columns(list(columns), file_columns(path), path.name)
    wanted = list(dict.fromkeys(columns))
    if kind == "parquet":
        return _parquet_rows(path, wanted)
    if kind == "jsonl":
        return _json_rows(path, wanted)
    return _delimited_rows(path, kind, wanted)


# ------------------------------------------------------------------------------------------ documents


def _open_documents(path: Path, fmt: CorpusFormat) -> Iterator[Document]:
    """Documents before the empty-text rule; the file and its columns are checked now, not on first next()."""
    kind = file_kind(path)
    path = _existing(path)
    if kind == "txt":
        named = [fmt.id_field, fmt.text_field, fmt.title_field, *fmt.metadata_fields]
        if any(named):
            raise CorpusError(f"{path.name}: a text-lines file has no fields to name (one text per line, id = line)")
        return _text_line_documents(path)
    fields = _resolve_fields(fmt, file_columns(path), path.name)
    documents = (_document(where, row, fields) for where, row in read_rows(path, fields.wanted()))
    if kind in ("tsv", "csv"):
        return (replace(doc, metadata={k: _number_or_text(v) for k, v in doc.metadata.items()}) for doc in documents)
    return documents


_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")
_DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)\.[0-9]+")


def _number_or_text(value: str) -> Any:
    """A TSV/CSV metadata field: a plain decimal number becomes one (see the module doc), the rest stays text."""
    if _INTEGER.fullmatch(value):
        return int(value)
    if _DECIMAL.fullmatch(value):
        return float(value)
    return value


def _without_empty(
    docs: Iterator[Document], skip_empty: bool, on_skip: Callable[[str], None] | None
) -> Iterator[Document]:
    """Documents with some text; an empty one is an error, or (skip_empty) passed over and reported to on_skip."""
    for doc in docs:
        if doc.text.strip():
            yield doc
        elif not skip_empty:
            raise CorpusError(f"{doc.where}: empty text for id {_show(doc.id)} (--skip-empty passes such documents over)")
        elif on_skip is not None:
            on_skip(doc.where)


def _text_line_documents(path: Path) -> Iterator[Document]:
    for number, line in _lines(path):
        yield Document(str(number), _chomp(line), {}, f"{path.name}:{number}")


def _document(where: str, row: dict[str, Any], fields: _Fields) -> Document:
    doc_id = _id_value(row[fields.id], where, fields.id)
    text = _text_value(row[fields.text], where, fields.text)
    if fields.title:
        # BEIR and sentence-transformers' evaluators search over exactly this string.
        text = (_text_value(row[fields.title], where, fields.title) + " " + text).strip()
    metadata = {name: _metadata_value(row[name], where, name) for name in fields.metadata}
    return Document(doc_id, text, metadata, where)


def _resolve_fields(fmt: CorpusFormat, columns: list[str], name: str) -> _Fields:
    fields = _Fields(
        id=fmt.id_field or _detect_id(columns, name),
        text=fmt.text_field or TEXT_FIELD,
        title=fmt.title_field,
        metadata=tuple(fmt.metadata_fields),
    )
    _require_columns(fields.wanted(), columns, name)
    return fields


def _detect_id(columns: list[str], name: str) -> str:
    for candidate in ID_FIELDS:
        if candidate in columns:
            return candidate
    raise CorpusError(f"{name}: no id column ({', '.join(ID_FIELDS)}); name one (the file has: {_list(columns)})")


def _require_columns(wanted: list[str], columns: list[str], name: str) -> None:
    missing = [column for column in wanted if column not in columns]
    if missing:
        raise CorpusError(f"{name}: no column {_show(missing[0])} (the file has: {_list(columns)})")


# --------------------------------------------------------------------------------------------- values


def _id_value(value: Any, where: str, column: str) -> str:
    """An id as a string: JSON/Parquet integers are accepted as their decimal string (BEIR's ids are strings)."""
    if value is None:
        raise CorpusError(f"{where}: missing id ({_show(column)} is null)")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise CorpusError(f"{where}: id {_show(column)} must be a string or an integer, not {type(value).__name__}")
    doc_id = str(value)
    if not doc_id.strip():
        raise CorpusError(f"{where}: empty id ({_show(column)})")
    return doc_id


def _text_value(value: Any, where: str, column: str) -> str:
    if value is None:  # a JSON/Parquet null text is an empty text: the empty-text rule decides
        return ""
    if not isinstance(value, str):
        raise CorpusError(f"{where}: {_show(column)} must be text, not {type(value).__name__}")
    return value


def _metadata_value(value: Any, where: str, column: str) -> Any:
    """A value the store can keep as JSON and filter on: a scalar or a flat list of scalars."""
    if isinstance(value, _JSON_SCALARS):
        return value
    if isinstance(value, list) and all(isinstance(item, _JSON_SCALARS) for item in value):
        return value
    raise CorpusError(
        f"{where}: metadata {_show(column)} must be a JSON scalar or a list of them, not {type(value).__name__}"
    )


# ------------------------------------------------------------------------------------------- formats


def _kind_or_none(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    stem = name.removesuffix(".gz")
    for suffix, kind in _TEXT_SUFFIXES.items():
        if stem.endswith(suffix):
            return kind
    return None


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise CorpusError(f"{path}: no such file")
    return path


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based number, decoded text with its line ending) of each line; only b"\\n" ends a line, as in TSV."""
    try:
        with _open_binary(path) as f:
            for number, raw in enumerate(f, 1):
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # a UTF-8 byte order mark (spreadsheet exports) is not part of the header
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    where = f"{path.name}:{number}"
                    raise CorpusError(f"{where}: invalid UTF-8 (byte {exc.start + 1} of the line)") from None
                yield number, line
    except (OSError, EOFError) as exc:  # gzip: not gzip'd, or cut short
        raise CorpusError(f"{path.name}: cannot read ({exc})") from exc


def _chomp(line: str) -> str:
    """The line without its ending ("\\n", or "\\r\\n" from Windows editors)."""
    line = line.removesuffix("\n")
    return line.removesuffix("\r")


def _delimited_records(path: Path, kind: str) -> Iterator[tuple[int, list[str]]]:
    """(line a record starts on, fields) of each non-blank TSV/CSV record, the header included."""
    if kind == "tsv":
        for number, line in _lines(path):
            text = _chomp(line)
            if text:
                yield number, text.split("\t")
        return
    reader = csv.reader((line for _, line in _lines(path)), strict=True)
    before = 0  # lines consumed before the current record: it starts on the next one
    try:
        for row in reader:
            if row:
                yield before + 1, row
            before = reader.line_num
    except csv.Error as exc:
        raise CorpusError(f"{path.name}:{reader.line_num}: malformed CSV ({exc})") from None


def _delimited_rows(path: Path, kind: str, wanted: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    records = _delimited_records(path, kind)
    first = next(records, None)
    if first is None:  # read_rows checked the header; the file changed since
        raise CorpusError(f"{path.name}: empty file (no header line)")
    header = [name.strip() for name in first[1]]
    index = {column: header.index(column) for column in wanted}
    hint = " (TSV has no quoting: a tab inside a field splits it)" if kind == "tsv" else ""
    for number, fields in records:
        where = f"{path.name}:{number}"
        if len(fields) != len(header):
            raise CorpusError(f"{where}: {len(fields)} fields, but the header has {len(header)}{hint}")
        yield where, {column: fields[i] for column, i in index.items()}


def _json_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in _lines(path):
        text = line.strip()
        if not text:
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path.name}:{number}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise CorpusError(f"{path.name}:{number}: not a JSON object")
        yield number, obj


def _json_rows(path: Path, wanted: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    for number, obj in _json_objects(path):
        where = f"{path.name}:{number}"
        missing = [column for column in wanted if column not in obj]
        if missing:
            raise CorpusError(f"{where}: no field {_show(missing[0])} (the object has: {_list(list(obj))})")
        yield where, {column: obj[column] for column in wanted}


def _parquet_file(path: Path) -> Any:
    import pyarrow as pa  # only Parquet needs pyarrow: the other formats work without it
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"{path.name}: cannot read as Parquet ({exc})") from exc


def _parquet_rows(path: Path, wanted: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows a batch at a time: memory is one batch of the wanted columns, whatever the row groups hold."""
    import pyarrow as pa

    row = 0
    try:
        for batch in _parquet_file(path).iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
            values = {column: batch.column(column).to_pylist() for column in wanted}
            for i in range(batch.num_rows):
                row += 1
                yield f"{path.name}:row {row}", {column: values[column][i] for column in wanted}
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"{path.name}:row {row + 1}: cannot read as Parquet ({exc})") from exc


def _id_lines(path: Path) -> Iterator[tuple[str, str]]:
    for number, line in _lines(path):
        doc_id = line.strip()
        if doc_id:
            yield doc_id, f"{path.name}:{number}"


# ---------------------------------------------------------------------------------------------- messages


def _position(where: str) -> str:
    """ "corpus.tsv:5" -> "line 5"; "corpus.parquet:row 5" -> "row 5" (for "first at ...")."""
    tail = where.rsplit(":", 1)[-1]
    return f"line {tail}" if tail.isdigit() else tail


def _show(value: str, limit: int = 60) -> str:
    """A value quoted for a one-line message, cut if long (an id could be a whole text by mistake)."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _list(columns: list[str]) -> str:
    return ", ".join(columns[:20]) + (f", ... ({len(columns)} in all)" if len(columns) > 20 else "") or "none"
