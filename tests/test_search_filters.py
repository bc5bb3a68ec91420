"""The metadata filter language (embedline/search/filters.py): parsing, errors, the Milvus rendering, and the key
property: `matches()` and the SQLite rendering select exactly the same documents."""

from __future__ import annotations

import json
import random
import sqlite3

import pytest

from embedline.errors import EmbedlineError
from embedline.search.filters import (
    And,
    Compare,
    FilterError,
    In,
    Not,
    Or,
    Truthy,
    matches,
    parse_filter,
    to_milvus,
    to_sql,
)

# ---------------------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text, expected",
    [
        ("year >= 1960", Compare("year", ">=", 1960)),
        ("x != -2.5", Compare("x", "!=", -2.5)),
        ("x < 1e3", Compare("x", "<", 1000.0)),
        ("x <= .5", Compare("x", "<=", 0.5)),
        ("x>-1", Compare("x", ">", -1)),
        ('lang == "en"', Compare("lang", "==", "en")),
        ("lang == 'e\\'n\\n\\u00e9'", Compare("lang", "==", "e'n\né")),
        ("c == True", Compare("c", "==", True)),
        ("c == FALSE", Compare("c", "==", False)),
        ("draft", Truthy("draft")),
        ('source in ["nasa", "rae"]', In("source", ("nasa", "rae"))),
        ("n NOT IN [1, 2.5]", In("n", (1, 2.5), negated=True)),
        ("not draft", Not(Truthy("draft"))),
        ("!draft", Not(Truthy("draft"))),
        ("not not a", Not(Not(Truthy("a")))),
        ("a and b AND c", And((Truthy("a"), Truthy("b"), Truthy("c")))),
        ("a && b", And((Truthy("a"), Truthy("b")))),
        ("a Or b || c", Or((Truthy("a"), Truthy("b"), Truthy("c")))),
        ("((a))", Truthy("a")),
        ("_x1 == 1", Compare("_x1", "==", 1)),
    ],
)
def test_parse_constructs(text, expected):
    parsed = parse_filter(text)
    assert parsed == expected
    assert type(getattr(parsed, "value", None)) is type(getattr(expected, "value", None))  # True is not 1


def test_precedence():
    assert parse_filter("a or b and c") == Or((Truthy("a"), And((Truthy("b"), Truthy("c")))))
    assert parse_filter("a and b or c") == Or((And((Truthy("a"), Truthy("b"))), Truthy("c")))
    assert parse_filter("not a and b") == And((Not(Truthy("a")), Truthy("b")))
    assert parse_filter("not a == 1 or b") == Or((Not(Compare("a", "==", 1)), Truthy("b")))
    assert parse_filter("(a or b) and c") == And((Or((Truthy("a"), Truthy("b"))), Truthy("c")))
    assert parse_filter("a not in [1] and b") == And((In("a", (1,), negated=True), Truthy("b")))


@pytest.mark.parametrize(
    "text, message",
    [
        ("year >= ", "filter 'year >= ': expected a value, got 'end of filter' at column 9"),
        ("(a == 1", "filter '(a == 1': expected ')' for the '(' at column 1, got 'end of filter' at column 8"),
        ("a == 1)", "filter 'a == 1)': unexpected ')' at column 7"),
        ("((a) or b", "expected ')' for the '(' at column 1, got 'end of filter' at column 10"),
        ("a =~ 'x'", "filter 'a =~ 'x'': unknown operator '=~' at column 3"),
        ("a = 1", "unknown operator '=' at column 3"),
        ("a == 1 x", "unexpected 'x' at column 8"),
        ("a == 1 b == 2", "unexpected 'b' at column 8"),
        ("a == 'abc", "unterminated string at column 6"),
        ('a == "ab\\"', "unterminated string at column 6"),
        ("a == null", "null is not supported (a missing or null field never matches a comparison) at column 6"),
        ("a in [1, NULL]", "null is not supported"),
        ("a == b", "expected a value, got 'b' at column 6"),
        ("and a", "expected a field name, '(' or 'not', got 'and' at column 1"),
        ("true", "expected a field name, '(' or 'not', got 'true' at column 1"),
        ("a in 1", "expected '[' at column 6"),
        ("a in []", "expected a value, got ']' at column 7"),
        ("a in [1 2]", "expected ',' or ']' at column 9"),
        ("a in [1, 'x']", "the values of a list must all be of one type at column 7"),
        ("a == 'x\\q'", "unknown escape '\\q' at column 8"),
        ("a == 99999999999999999999", "integer 99999999999999999999 out of range at column 6"),
        ("a == 1e999", "number 1e999 out of range at column 6"),
        ("a @ 1", "unexpected '@' at column 3"),
        ("a and", "expected a field name, '(' or 'not', got 'end of filter' at column 6"),
    ],
)
def test_errors(text, message):
    with pytest.raises(FilterError) as caught:
        parse_filter(text)
    text_of = str(caught.value)
    assert message in text_of
    assert "\n" not in text_of and text_of.startswith("filter '")
    assert isinstance(caught.value, EmbedlineError) and caught.value.column is not None


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty(text):
    with pytest.raises(FilterError, match="^empty filter$"):
        parse_filter(text)


def test_limits_are_errors_not_recursion():
    for text in ["(" * 200 + "a" + ")" * 200, "not " * 200 + "a", "!" * 4000 + "a"]:
        with pytest.raises(FilterError, match="nesting deeper than 64 levels"):
            parse_filter(text)
    with pytest.raises(FilterError, match="too long"):
        parse_filter("a == 1 or " * 500 + "a")
    parse_filter("(" * 60 + "not a" + ")" * 60)  # within the limit


def test_long_message_is_cut_to_one_line():
    with pytest.raises(FilterError) as caught:
        parse_filter("a == 1 and\n" * 20 + "?")
    assert "..." in str(caught.value) and "\n" not in str(caught.value)
    assert str(caught.value).endswith("unexpected '?' at column 221")


# ----------------------------------------------------------------------------------------------------------- milvus


@pytest.mark.parametrize(
    "text, expected",
    [
        ('year >= 1960 and lang == "en"', 'metadata["year"] >= 1960 and metadata["lang"] == "en"'),
        (
            "source in ['nasa', \"rae\"] and not draft",
            'metadata["source"] in ["nasa", "rae"] and not (metadata["draft"] == true)',
        ),
        ("(a < 3 or b != 'x') and c == True", '(metadata["a"] < 3 or metadata["b"] != "x") and metadata["c"] == true'),
        ("a or b and c", 'metadata["a"] == true or metadata["b"] == true and metadata["c"] == true'),
        ("x NOT IN [1, 2.5, -1e3]", 'metadata["x"] not in [1, 2.5, -1000.0]'),
        ("s == 'it\\'s \"q\" é'", 'metadata["s"] == "it\'s \\"q\\" é"'),
        ("!(a > 1 || b <= -2)", 'not (metadata["a"] > 1 or metadata["b"] <= -2)'),
    ],
)
def test_to_milvus(text, expected):
    assert to_milvus(parse_filter(text)) == expected


def test_to_milvus_field_and_sql_column_are_checked():
    assert to_milvus(parse_filter("a == false"), field="meta") == 'meta["a"] == false'
    with pytest.raises(ValueError):
        to_milvus(parse_filter("a"), field='m"]; drop')
    with pytest.raises(ValueError):
        to_sql(parse_filter("a"), column="metadata) OR (1")
    sql, params = to_sql(parse_filter("a == 1"), column="d.meta")
    assert "json_extract(d.meta, ?)" in sql and params == ['$."a"', '$."a"', 1]


# ----------------------------------------------------------------------------------------- matches() == SQLite


FILTERS = [
    "a == 1", "a != 1", "a < 2", "a <= 2", "a > -1", "a >= 3", "a == 1.0", "a in [1, 2, 3.0]", "a not in [0, 1]",
    "b == 1", "b > 2", "b <= 1e3", "b < -0.5", "b != 2.5",
    "s == 'en'", 's != "en"', "s < 'n'", "s >= 'x'", "s in ['en', 'fr', 'é']", "s not in ['en', 'fr']",
    "s > 'é'", "s == '日本'", "s == '10'", "s == \"q\\\"uote\"",
    "f", "not f", "f == true", "f != false", "f < true", "f in [false]", "f not in [true]", "!f || a == 1",
    "m == 1", "m == 'x'", "m == true", "m > 0", "m > 'a'", "m != 'x'", "m not in [1, 2.5]", "m <= false",
    "a == '1'", "s > 1", "a > 'a'", "f == 1",
    "not (a > 1)", "not (s != 'en')", "not (a in [1, 2] or b >= 2) && m != 10",
    "a > 1 and s == 'en'", "a > 1 or s == 'en' and f", "(a > 1 or s == 'en') and not f",
    "missing > 0", "not missing", "missing != 'x'", "missing not in [1]", "not (missing == 1)",
]
STRINGS = ["", "en", "fr", "x", "X", "a", "n", "nasa", "é", "日本", "a b", 'q"uote', "10", "1", "true"]
NUMBERS = [-3, -1, 0, 1, 2, 3, 4, 10, -0.5, 0.0, 1.0, 2.5, 3.0, 999.5, 1000, 1e3, 1e6]


def _any_value(rng: random.Random):
    return rng.choice(
        [rng.choice(NUMBERS), rng.choice(STRINGS), rng.choice([True, False]), None, [1, "x"], {"k": 1}]
    )


def _random_metadata(rng: random.Random) -> dict:
    typical = {
        "a": lambda: rng.randint(-3, 5),
        "b": lambda: rng.choice(NUMBERS),
        "s": lambda: rng.choice(STRINGS),
        "f": lambda: rng.choice([True, False]),
        "m": lambda: _any_value(rng),
    }
    metadata = {}
    for key, make in typical.items():
        roll = rng.random()
        if roll < 0.15:
            continue  # missing
        metadata[key] = make() if roll < 0.85 else _any_value(rng)
    if rng.random() < 0.3:
        metadata["other.key"] = rng.choice(STRINGS)
    return metadata


@pytest.fixture(scope="module")
def docs():
    rng = random.Random(20240611)
    corpus = [_random_metadata(rng) for _ in range(200)] + [{}, {"a": None, "s": None, "f": None, "m": None}]
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, metadata TEXT)")
    db.executemany("INSERT INTO docs VALUES (?, ?)", [(i, json.dumps(md)) for i, md in enumerate(corpus)])
    yield db, corpus
    db.close()


def _sql_ids(db, expr) -> set[int]:
    where, params = to_sql(expr)
    return {row[0] for row in db.execute(f"SELECT id FROM docs WHERE {where}", params)}


@pytest.mark.parametrize("text", FILTERS)
def test_matches_agrees_with_sqlite(docs, text):
    db, corpus = docs
    expr = parse_filter(text)
    expected = {i for i, md in enumerate(corpus) if matches(expr, md)}
    assert _sql_ids(db, expr) == expected
    if "missing" not in text and text not in ("f == 1", "a == '1'"):
        assert 0 < len(expected) < len(corpus), "the filter should split the corpus"


def test_semantics_spelled_out():
    def m(text, md):
        return matches(parse_filter(text), md)

    assert not m("a != 1", {}) and not m("a not in [1]", {}) and not m("a != 1", {"a": None})
    assert m("not (a == 1)", {}) and m("not (a != 1)", {})  # `not` negates the two-valued comparison
    assert not m("a != 'x'", {"a": 1}) and not m("a > 'x'", {"a": 1}) and not m("a < 1", {"a": "x"})
    assert m("a == 1", {"a": 1.0}) and m("a == 1.0", {"a": 1}) and not m("a == 1", {"a": True})
    assert m("d", {"d": True}) and not m("d", {"d": 1}) and not m("d", {"d": "true"})


def test_long_filters_stay_within_sqlite_limits(docs):
    db, corpus = docs
    chain = "||".join(["f"] * 1365)  # a left-deep OR of this length is past SQLite's depth limit of 1000
    listed = "a in [" + ",".join(str(i) for i in range(-800, 2)) + "]"
    for text in (chain, listed, "(" * 60 + "not a == 1" + ")" * 60):
        assert len(text) <= 4096
        expr = parse_filter(text)
        assert _sql_ids(db, expr) == {i for i, md in enumerate(corpus) if matches(expr, md)}
