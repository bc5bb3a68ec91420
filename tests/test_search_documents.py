"""embedline/documents.py: every corpus format, streaming, and every CorpusError with its file:line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from embedline.errors import EmbedlineError
from embedline.documents import (
    SKIPPED_KEPT,
    CorpusCheck,
    CorpusError,
    CorpusFormat,
    Document,
    check_corpus,
    file_columns,
    read_documents,
    read_ids,
)

# The shared data beside the checkout (read there, never copied into the repository).
CRANFIELD = Path(__file__).resolve().parents[2] / "shared" / "data" / "retrieval" / "cranfield"


def write(path: Path, content: str | bytes) -> Path:
    """Write text (UTF-8) or bytes, gzip'd when the name ends in .gz."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def write_parquet(path: Path, columns: dict) -> Path:
    import pyarrow as pa  # the search extra
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=700)
    return path


def error(path: Path, fmt: CorpusFormat = CorpusFormat()) -> str:
    """check_corpus's one-line message for a bad file."""
    with pytest.raises(CorpusError) as info:
        check_corpus(path, fmt)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("name", ["lines.txt", "lines.txt.gz"])
def test_text_lines_ids_are_line_numbers(tmp_path, name):
    path = write(tmp_path / name, "first text\nsecond  text \r\nthird\n")
    docs = list(read_documents(path))
    assert docs == [
        Document("1", "first text", {}, f"{name}:1"),
        Document("2", "second  text ", {}, f"{name}:2"),
        Document("3", "third", {}, f"{name}:3"),
    ]


def test_text_lines_blank_line_counts_as_a_line(tmp_path):
    path = write(tmp_path / "c.txt", "one\n\n   \nfour\n")
    assert error(path) == "c.txt:2: empty text for id '2' (--skip-empty passes such documents over)"
    docs = list(read_documents(path, CorpusFormat(skip_empty=True)))
    assert [(d.id, d.text) for d in docs] == [("1", "one"), ("4", "four")]
    check = check_corpus(path, CorpusFormat(skip_empty=True))
    assert check == CorpusCheck(2, ["c.txt:2", "c.txt:3"], 2, "txt", None)


def test_text_lines_take_no_field_options(tmp_path):
    path = write(tmp_path / "c.txt", "one\n")
    with pytest.raises(CorpusError, match="c.txt: a text-lines file has no fields"):
        read_documents(path, CorpusFormat(title_field="title"))


@pytest.mark.parametrize("name", ["c.tsv", "c.tsv.gz"])
def test_tsv_with_title_and_metadata(tmp_path, name):
    path = write(tmp_path / name, 'doc_id\ttitle\ttext\tyear\n7\tA title\t"quoted" body\t007\n8\t\t  only text \t\n')
    fmt = CorpusFormat(title_field="title", metadata_fields=("year",))
    docs = list(read_documents(path, fmt))
    # The title joins as BEIR does; TSV has no quoting, so the quote marks are text; metadata that is not a plain number stays a string.
    assert docs == [
        Document("7", 'A title "quoted" body', {"year": "007"}, f"{name}:2"),
        Document("8", "only text", {"year": ""}, f"{name}:3"),
    ]
    assert check_corpus(path, fmt) == CorpusCheck(2, [], 0, "tsv", "doc_id")


def test_tsv_metadata_written_as_plain_numbers_become_numbers(tmp_path):
    values = ["1965", "-3", "0.25", "007", "1e5", "+3", "12a", "", "0"]
    rows = "".join(f"{i}\tt\t{v}\n" for i, v in enumerate(values))
    path = write(tmp_path / "c.tsv", "id\ttext\tm\n" + rows)
    got = [d.metadata["m"] for d in read_documents(path, CorpusFormat(metadata_fields=("m",)))]
    assert got == [1965, -3, 0.25, "007", "1e5", "+3", "12a", "", 0]


def test_tsv_without_title_keeps_the_text_as_is(tmp_path):
    path = write(tmp_path / "c.tsv", "id\ttext\n1\t  padded \n")
    assert [d.text for d in read_documents(path)] == ["  padded "]


@pytest.mark.parametrize("column", ["id", "_id", "doc_id", "docid", "corpus-id"])
def test_id_column_is_found(tmp_path, column):
    path = write(tmp_path / "c.tsv", f"text\t{column}\nhello\tx1\n")
    assert [d.id for d in read_documents(path)] == ["x1"]


def test_named_fields(tmp_path):
    path = write(tmp_path / "c.tsv", "key\tbody\tid\nk1\tsome body\tnot-this\n")
    docs = list(read_documents(path, CorpusFormat(id_field="key", text_field="body")))
    assert [(d.id, d.text) for d in docs] == [("k1", "some body")]


def test_crlf_and_byte_order_mark(tmp_path):
    path = write(tmp_path / "c.tsv", b"\xef\xbb\xbfid\ttext\r\n1\thello\r\n")
    assert [(d.id, d.text) for d in read_documents(path)] == [("1", "hello")]


def test_blank_lines_in_tables_are_passed_over(tmp_path):
    path = write(tmp_path / "c.tsv", "id\ttext\n\n1\thello\n\n2\tworld\n\n")
    assert [d.where for d in read_documents(path)] == ["c.tsv:3", "c.tsv:5"]


@pytest.mark.parametrize("name", ["c.csv", "c.csv.gz"])
def test_csv_quoting_and_multiline_records(tmp_path, name):
    content = 'id,title,text\n1,"Comma, title","line one\nline two"\n2,t,"say ""hi"""\n'
    docs = list(read_documents(write(tmp_path / name, content), CorpusFormat(title_field="title")))
    assert docs == [
        Document("1", "Comma, title line one\nline two", {}, f"{name}:2"),
        Document("2", 't say "hi"', {}, f"{name}:4"),  # the record after a two-line one starts on line 4
    ]


def test_csv_duplicate_names_the_lines_records_start_on(tmp_path):
    path = write(tmp_path / "c.csv", 'id,text\n1,"a\nb"\n2,c\n1,d\n')
    assert error(path) == "c.csv:5: duplicate id '1' (first at line 2)"


def test_csv_malformed(tmp_path):
    path = write(tmp_path / "c.csv", 'id,text\n1,ok\n2,"bad"x\n')
    assert error(path).startswith("c.csv:3: malformed CSV")


@pytest.mark.parametrize("name", ["c.jsonl", "c.ndjson", "c.jsonl.gz"])
def test_json_lines(tmp_path, name):
    rows = [
        {"_id": 12, "title": "T", "text": "body", "tags": ["a", 1], "score": 0.5, "extra": {"x": 1}},
        {"_id": "x", "title": None, "text": "other", "tags": [], "score": None},
    ]
    content = "\n".join(json.dumps(row) for row in rows) + "\n\n"
    fmt = CorpusFormat(title_field="title", metadata_fields=("tags", "score"))
    docs = list(read_documents(write(tmp_path / name, content), fmt))
    assert docs == [
        Document("12", "T body", {"tags": ["a", 1], "score": 0.5}, f"{name}:1"),
        Document("x", "other", {"tags": [], "score": None}, f"{name}:2"),
    ]


@pytest.mark.parametrize(
    ("line", "fmt", "expected"),
    [
        ('{"id": 1, "text": "a", "m": {"x": 1}}', CorpusFormat(metadata_fields=("m",)),
         "c.jsonl:2: metadata 'm' must be a JSON scalar or a list of them, not dict"),
        ('{"id": 1, "text": "a", "m": [[1]]}', CorpusFormat(metadata_fields=("m",)),
         "c.jsonl:2: metadata 'm' must be a JSON scalar or a list of them, not list"),
        ('{"id": true, "text": "a"}', CorpusFormat(), "c.jsonl:2: id 'id' must be a string or an integer, not bool"),
        ('{"id": 1.0, "text": "a"}', CorpusFormat(), "c.jsonl:2: id 'id' must be a string or an integer, not float"),
        ('{"id": null, "text": "a"}', CorpusFormat(), "c.jsonl:2: missing id ('id' is null)"),
        ('{"id": "2", "text": 5}', CorpusFormat(), "c.jsonl:2: 'text' must be text, not int"),
        ('{"id": "2", "text": null}', CorpusFormat(),
         "c.jsonl:2: empty text for id '2' (--skip-empty passes such documents over)"),
        ('{"id": "2"}', CorpusFormat(), "c.jsonl:2: no field 'text' (the object has: id)"),
        ('{"id": "2", "text": "a"', CorpusFormat(), "c.jsonl:2: invalid JSON (Expecting ',' delimiter at column 24)"),
        ('["id", "text"]', CorpusFormat(), "c.jsonl:2: not a JSON object"),
    ],
)
def test_json_lines_errors(tmp_path, line, fmt, expected):
    path = write(tmp_path / "c.jsonl", '{"id": "1", "text": "fine", "m": 1}\n' + line + "\n")
    assert error(path, fmt) == expected


def test_parquet(tmp_path):
    n = 2500  # three batches of 1024 rows over four row groups of 700
    path = write_parquet(
        tmp_path / "c.parquet",
        {"doc_id": list(range(n)), "title": ["t"] * n, "text": [f"text {i}" for i in range(n)],
         "lang": ["en"] * n, "unused": [b"x"] * n},
    )
    fmt = CorpusFormat(title_field="title", metadata_fields=("lang",))
    docs = list(read_documents(path, fmt))
    assert len(docs) == n
    assert docs[0] == Document("0", "t text 0", {"lang": "en"}, "c.parquet:row 1")
    assert docs[-1] == Document(str(n - 1), f"t text {n - 1}", {"lang": "en"}, f"c.parquet:row {n}")
    assert check_corpus(path, fmt) == CorpusCheck(n, [], 0, "parquet", "doc_id")


def test_parquet_errors(tmp_path):
    path = write_parquet(tmp_path / "c.parquet", {"id": ["a", "b", "a"], "text": ["x", None, "z"], "b": [b"1"] * 3})
    assert error(path) == "c.parquet:row 2: empty text for id 'b' (--skip-empty passes such documents over)"
    assert error(path, CorpusFormat(skip_empty=True)) == "c.parquet:row 3: duplicate id 'a' (first at row 1)"
    assert error(path, CorpusFormat(text_field="body")) == "c.parquet: no column 'body' (the file has: id, text, b)"
    message = error(path, CorpusFormat(metadata_fields=("b",)))
    assert message == "c.parquet:row 1: metadata 'b' must be a JSON scalar or a list of them, not bytes"
    broken = write(tmp_path / "broken.parquet", b"not parquet at all")
    assert error(broken).startswith("broken.parquet: cannot read as Parquet")


# -------------------------------------------------------------------------------------- check_corpus errors


def test_duplicate_id_names_both_lines(tmp_path):
    path = write(tmp_path / "corpus.tsv", "id\ttext\n5\ta\n12\tb\n7\tc\n12\td\n")
    assert error(path) == "corpus.tsv:5: duplicate id '12' (first at line 3)"
    # read_documents streams without remembering ids: duplicates are check_corpus's job.
    assert len(list(read_documents(path))) == 4


def test_empty_and_whitespace_ids(tmp_path):
    assert error(write(tmp_path / "a.tsv", "id\ttext\n\tno id\n")) == "a.tsv:2: empty id ('id')"
    assert error(write(tmp_path / "b.tsv", "id\ttext\n1\tx\n  \tno id\n")) == "b.tsv:3: empty id ('id')"


def test_whitespace_text_is_empty(tmp_path):
    path = write(tmp_path / "d.tsv", "id\ttext\n1\tok\n2\t   \n")
    assert error(path) == "d.tsv:3: empty text for id '2' (--skip-empty passes such documents over)"


def test_wrong_field_count(tmp_path):
    path = write(tmp_path / "c.tsv", "id\ttext\n1\tok\n2\ta\tb\n")
    assert error(path) == "c.tsv:3: 3 fields, but the header has 2 (TSV has no quoting: a tab inside a field splits it)"
    path = write(tmp_path / "c.tsv", "id\ttext\n1\tok\n2\n")
    assert error(path).startswith("c.tsv:3: 1 fields, but the header has 2")
    path = write(tmp_path / "c.csv", "id,text\n1,ok\n2,a,b\n")
    assert error(path) == "c.csv:3: 3 fields, but the header has 2"


@pytest.mark.parametrize("name", ["c.tsv", "c.tsv.gz", "c.txt", "c.jsonl", "c.csv"])
def test_invalid_utf8_names_its_line(tmp_path, name):
    body = {
        "c.txt": b"ok\nalso ok\n",
        "c.jsonl": b'{"id": 1, "text": "a"}\n{"id": 2, "text": "b"}\n',
        "c.csv": b'id,text\n1,"ok\n',  # the bad line is inside a quoted field that started on line 2
    }
    content = body.get(name, b"id\ttext\n1\tok\n") + b"bad \xff\xfe byte\n"
    assert error(write(tmp_path / name, content)) == f"{name}:3: invalid UTF-8 (byte 5 of the line)"


def test_missing_column_lists_the_columns(tmp_path):
    path = write(tmp_path / "c.tsv", "id\tbody\n1\tx\n")
    assert error(path) == "c.tsv: no column 'text' (the file has: id, body)"
    assert error(path, CorpusFormat(text_field="body", metadata_fields=("lang",))) == (
        "c.tsv: no column 'lang' (the file has: id, body)"
    )
    no_id = write(tmp_path / "n.tsv", "key\ttext\n1\tx\n")
    assert error(no_id) == "n.tsv: no id column (id, _id, doc_id, docid, corpus-id); name one (the file has: key, text)"


def test_missing_column_is_raised_before_iteration(tmp_path):
    path = write(tmp_path / "c.tsv", "id\tbody\n1\tx\n")
    with pytest.raises(CorpusError, match="no column 'text'"):
        read_documents(path)  # no next(): the options are checked when the reader is made


def test_empty_file_and_no_documents(tmp_path):
    assert error(write(tmp_path / "e.tsv", "")) == "e.tsv: empty file (no header line)"
    assert error(write(tmp_path / "e.csv.gz", "\n\n")) == "e.csv.gz: empty file (no header line)"
    assert error(write(tmp_path / "e.jsonl", "")) == "e.jsonl: empty file (no JSON object)"
    assert error(write(tmp_path / "e.txt", "")) == "e.txt: no documents"
    assert error(write(tmp_path / "h.tsv", "id\ttext\n")) == "h.tsv: no documents"
    blanks = write(tmp_path / "b.tsv", "id\ttext\n1\t\n2\t \n")
    assert error(blanks, CorpusFormat(skip_empty=True)) == "b.tsv: no documents (all 2 texts are empty)"


def test_unknown_type_and_missing_file(tmp_path):
    assert error(write(tmp_path / "c.xml", "<doc/>")).startswith("c.xml: unknown file type (expected .txt, .tsv")
    assert error(write(tmp_path / "c.parquet.gz", "x")).startswith("c.parquet.gz: unknown file type")
    assert error(tmp_path / "absent.tsv") == f"{tmp_path / 'absent.tsv'}: no such file"


def test_not_gzip(tmp_path):
    path = tmp_path / "c.tsv.gz"
    path.write_bytes(b"id\ttext\n1\tplain\n")
    assert error(path).startswith("c.tsv.gz: cannot read (")


def test_skipped_keeps_the_first_wheres_and_counts_all(tmp_path):
    path = write(tmp_path / "c.txt", "\n" * (SKIPPED_KEPT + 5) + "a text\n")
    check = check_corpus(path, CorpusFormat(skip_empty=True))
    assert check.documents == 1
    assert check.skipped_empty == [f"c.txt:{i}" for i in range(1, SKIPPED_KEPT + 1)]
    assert check.skipped_empty_count == SKIPPED_KEPT + 5


def test_read_documents_streams(tmp_path):
    """Documents before a bad row come out before the error: nothing is read ahead or held."""
    path = write(tmp_path / "c.tsv", "id\ttext\n1\ta\n2\tb\n3\n")
    docs = read_documents(path)
    assert [next(docs).id, next(docs).id] == ["1", "2"]
    with pytest.raises(CorpusError, match="c.tsv:4: 1 fields"):
        next(docs)


def test_errors_are_embedline_errors():
    assert issubclass(CorpusError, EmbedlineError)


def test_long_ids_are_cut_in_messages(tmp_path):
    long_id = "x" * 200
    path = write(tmp_path / "c.tsv", f"id\ttext\n{long_id}\ta\n{long_id}\tb\n")
    message = error(path)
    assert message.startswith("c.tsv:3: duplicate id 'xxxx") and len(message) < 120


# ------------------------------------------------------------------------------------------------- ids


def test_read_ids_from_an_id_list(tmp_path):
    path = write(tmp_path / "delete.txt", "12\n\n  7 \r\nabc\n")
    assert list(read_ids(path)) == [("12", "delete.txt:1"), ("7", "delete.txt:3"), ("abc", "delete.txt:4")]
    other = write(tmp_path / "ids", "1\n2\n")  # any name that is not a corpus format is a list of ids
    assert [doc_id for doc_id, _ in read_ids(other)] == ["1", "2"]


def test_read_ids_from_corpus_files(tmp_path):
    tsv = write(tmp_path / "c.tsv.gz", "text\t_id\na\tx1\nb\tx2\n")
    assert list(read_ids(tsv)) == [("x1", "c.tsv.gz:2"), ("x2", "c.tsv.gz:3")]
    jsonl = write(tmp_path / "c.jsonl", '{"doc_id": 3, "text": ""}\n')  # only the id is read: text may be empty
    assert list(read_ids(jsonl)) == [("3", "c.jsonl:1")]
    assert list(read_ids(tsv, id_field="text")) == [("a", "c.tsv.gz:2"), ("b", "c.tsv.gz:3")]
    with pytest.raises(CorpusError, match="c.tsv.gz: no id column"):
        list(read_ids(write(tmp_path / "c.tsv.gz", "key\n1\n")))


def test_read_ids_from_parquet(tmp_path):
    path = write_parquet(tmp_path / "c.parquet", {"id": [1, 2], "text": ["a", "b"]})
    assert list(read_ids(path)) == [("1", "c.parquet:row 1"), ("2", "c.parquet:row 2")]


def test_file_columns(tmp_path):
    assert file_columns(write(tmp_path / "c.csv", " id , text \n1,a\n")) == ["id", "text"]
    assert file_columns(write(tmp_path / "c.jsonl", '\n{"b": 1, "a": 2}\n')) == ["b", "a"]
    assert file_columns(write(tmp_path / "c.txt", "a\n")) == []


# --------------------------------------------------------------------------------------------- Cranfield


@pytest.fixture
def cranfield_corpus() -> Path:
    path = CRANFIELD / "corpus.tsv.gz"
    if not path.is_file():
        pytest.skip("shared Cranfield data not present")
    return path


def test_cranfield_corpus(cranfield_corpus):
    fmt = CorpusFormat(title_field="title")
    # Docs 471 and 995 are empty upstream (title and text): line 472 is doc 471 (line 1 is the header).
    assert error(cranfield_corpus, fmt).startswith("corpus.tsv.gz:472: empty text for id '471'")
    skip = CorpusFormat(title_field="title", skip_empty=True)
    check = check_corpus(cranfield_corpus, skip)
    assert check == CorpusCheck(1398, ["corpus.tsv.gz:472", "corpus.tsv.gz:996"], 2, "tsv", "doc_id")
    docs = list(read_documents(cranfield_corpus, skip))
    assert [d.id for d in docs] == [str(i) for i in range(1, 1401) if i not in (471, 995)]
    first = docs[0]
    assert first.text.startswith("experimental investigation of the aerodynamics of a wing in a slipstream . "
                                 "experimental investigation of the aerodynamics")
    assert [doc_id for doc_id, _ in read_ids(cranfield_corpus)] == [str(i) for i in range(1, 1401)]
