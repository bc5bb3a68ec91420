"""The metadata filter language of embedline's semantic search.

A filter selects documents by their ``metadata`` (a JSON object whose values are strings, numbers, booleans or
null). It is the subset of Milvus boolean expressions that makes sense over metadata fields, so the same text works
against the embedded SQLite store and against a Milvus store::

    year >= 1960 and lang == "en"
    source in ["nasa", "rae"] and not draft
    (a < 3 or b != 'x') and c == true

Grammar, loosest binding first; keywords (and, or, not, in, true, false) are case-insensitive::

    expr    := conj (("or" | "||") conj)*
    conj    := neg (("and" | "&&") neg)*
    neg     := ("not" | "!") neg | primary
    primary := "(" expr ")" | field op value | field ["not"] "in" "[" value ("," value)* "]" | field
    op      := "==" | "!=" | "<" | "<=" | ">" | ">="
    value   := integer | float (-1.5, 1e3) | "string" | 'string' (backslash escapes) | true | false

A field, ``[A-Za-z_][A-Za-z0-9_]*``, names a top-level metadata key; a bare field means ``field == true``.
``null`` is not a value: a missing key and a null value already behave alike (below). The values of a list must
share a type. Filters are limited to 4096 characters and 64 levels of nesting.

Semantics, shared exactly by `matches` and `to_sql` (and by `to_milvus` as far as Milvus agrees):

* A comparison is always true or false, never unknown. It is false when the field is missing or null, and false
  when the field's type differs from the literal's (string, number, boolean; ints and floats are both numbers, so
  ``1 == 1.0``). That holds for ``!=`` and ``not in`` too: ``lang != "en"`` needs a string ``lang``, and
  ``x not in [a, b]`` means ``x != a and x != b``.
* ``not X`` is the plain negation of that two-valued X: ``not (year > 1960)`` is true for a document without a
  year, unlike ``year <= 1960``.
"""

from __future__ import annotations

import json
import math
import operator
import re
from dataclasses import dataclass
from typing import NamedTuple, Union

from embedline.errors import EmbedlineError

MAX_LENGTH = 4096
MAX_DEPTH = 64

Value = Union[str, int, float, bool]
_OPS = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_SQL_OPS = {"==": "=", "!=": "<>", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
_SQL_TYPES = {"bool": "('true', 'false')", "number": "('integer', 'real')", "string": "('text')"}
_KEYWORDS = {"and", "or", "not", "in", "null"}
_ALIASES = {"&&": "and", "||": "or", "!": "not"}
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", '"': '"', "'": "'"}
_TOKEN = re.compile(
    r"""(?P<num>-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)
      | (?P<op>==|!=|<=|>=|<|>|&&|\|\||!)
      | (?P<punct>[()\[\],])
      | (?P<name>[A-Za-z_][A-Za-z0-9_]*)""",
    re.X,
)
_OPERATOR_CHARS = re.compile(r"[=!<>~&|^%*+/-]+")
_COLUMN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?\Z")


class FilterError(EmbedlineError):
    """A filter that does not parse. `column` is the 1-based character offset of the problem (None: the whole)."""

    def __init__(self, message: str, column: int | None = None):
        super().__init__(message)
        self.column = column


@dataclass(frozen=True)
class Compare:
    field: str
    op: str  # one of == != < <= > >=
    value: Value


@dataclass(frozen=True)
class In:
    field: str
    values: tuple  # non-empty, all of one type
    negated: bool = False  # `not in`


@dataclass(frozen=True)
class Truthy:
    """A bare field: the same as ``field == true`` (kept apart so the AST mirrors the text)."""

    field: str


@dataclass(frozen=True)
class Not:
    item: Filter


@dataclass(frozen=True)
class And:
    items: tuple


@dataclass(frozen=True)
class Or:
    items: tuple


Filter = Union[Compare, In, Truthy, Not, And, Or]


class _Token(NamedTuple):
    kind: str  # value | op | punct | name | kw | end
    value: object
    col: int
    raw: str


def _error(text: str, message: str, column: int) -> FilterError:
    """One line naming the filter (whitespace flattened, long ones cut) and the column."""
    shown = re.sub(r"\s", " ", text)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return FilterError(f"filter '{shown}': {message} at column {column}", column)


def _kind(value: object) -> str | None:
    """The type class comparisons respect; bool first, since bool is an int subclass in Python."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return "string" if isinstance(value, str) else None


def _number(text: str, raw: str, col: int) -> int | float:
    """Integers stay ints (exact equality); SQLite binds at most 64-bit integers, and inf has no JSON form."""
    if re.fullmatch(r"-?\d+", raw):
        if abs(int(raw)) >= 2**63:
            raise _error(text, f"integer {raw} out of range", col)
        return int(raw)
    number = float(raw)
    if not math.isfinite(number):
        raise _error(text, f"number {raw} out of range", col)
    return number


def _read_string(text: str, start: int) -> tuple[str, int]:
    """A quoted string from text[start] (the quote); returns the value and the index past the closing quote."""
    quote, out, i = text[start], [], start + 1
    while i < len(text):
        ch, esc = text[i], text[i + 1 : i + 2]
        if ch == quote:
            return "".join(out), i + 1
        if ch != "\\":
            out.append(ch)
            i += 1
        elif esc == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", text[i + 2 : i + 6]):
            code = int(text[i + 2 : i + 6], 16)
            if 0xD800 <= code <= 0xDFFF:  # a lone surrogate cannot be stored as UTF-8
                raise _error(text, f"surrogate escape '{text[i : i + 6]}'", i + 1)
            out.append(chr(code))
            i += 6
        elif esc in _ESCAPES:
            out.append(_ESCAPES[esc])
            i += 2
        elif esc:
            raise _error(text, f"unknown escape '\\{esc}'", i + 1)
        else:
            break
    raise _error(text, "unterminated string", start + 1)


def _tokenize(text: str) -> list[_Token]:
    """Tokens with their columns; `&&`, `||`, `!` become the keywords they alias. Ends with an `end` token."""
    tokens, i = [], 0
    while i < len(text):
        col = i + 1
        if text[i].isspace():
            i += 1
            continue
        if text[i] in "\"'":
            value, end = _read_string(text, i)
            tokens.append(_Token("value", value, col, text[i:end]))
            i = end
            continue
        match = _TOKEN.match(text, i)
        if not match:
            run = _OPERATOR_CHARS.match(text, i)
            raise _error(text, f"unknown operator {run.group()!r}" if run else f"unexpected {text[i]!r}", col)
        kind, raw, i = match.lastgroup, match.group(), match.end()
        lower = raw.lower()
        if kind == "num":
            tokens.append(_Token("value", _number(text, raw, col), col, raw))
        elif raw in _ALIASES:
            tokens.append(_Token("kw", _ALIASES[raw], col, raw))
        elif kind == "name" and lower in ("true", "false"):
            tokens.append(_Token("value", lower == "true", col, raw))
        elif kind == "name" and lower in _KEYWORDS:
            tokens.append(_Token("kw", lower, col, raw))
        else:
            tokens.append(_Token(kind, raw, col, raw))
    tokens.append(_Token("end", None, len(text) + 1, "end of filter"))
    return tokens


class _Parser:
    """Recursive descent, one method per grammar rule; `depth` bounds the recursion with a clear error."""

    def __init__(self, text: str):
        self.text, self.tokens, self.i, self.depth = text, _tokenize(text), 0, 0

    def peek(self, ahead: int = 0) -> _Token:
        return self.tokens[min(self.i + ahead, len(self.tokens) - 1)]

    def take(self) -> _Token:
        token = self.peek()
        self.i = min(self.i + 1, len(self.tokens) - 1)
        return token

    def at(self, kind: str, value: str, ahead: int = 0) -> bool:
        return self.peek(ahead).kind == kind and self.peek(ahead).value == value

    def accept(self, kind: str, value: str) -> bool:
        if self.at(kind, value):
            self.take()
            return True
        return False

    def fail(self, message: str, token: _Token | None = None):
        raise _error(self.text, message, (token or self.peek()).col)

    def nested(self, rule):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.fail(f"nesting deeper than {MAX_DEPTH} levels")
        result = rule()
        self.depth -= 1
        return result

    def parse(self) -> Filter:
        expr = self.expr()
        if self.peek().kind != "end":
            self.fail(f"unexpected {self.peek().raw!r}")
        return expr

    def expr(self) -> Filter:
        items = [self.conj()]
        while self.accept("kw", "or"):
            items.append(self.conj())
        return items[0] if len(items) == 1 else Or(tuple(items))

    def conj(self) -> Filter:
        items = [self.neg()]
        while self.accept("kw", "and"):
            items.append(self.neg())
        return items[0] if len(items) == 1 else And(tuple(items))

    def neg(self) -> Filter:
        if self.accept("kw", "not"):
            return Not(self.nested(self.neg))
        return self.primary()

    def primary(self) -> Filter:
        token = self.take()
        if token.kind == "punct" and token.value == "(":
            inner = self.nested(self.expr)
            if not self.accept("punct", ")"):
                self.fail(f"expected ')' for the '(' at column {token.col}, got {self.peek().raw!r}")
            return inner
        if token.kind != "name":
            self.fail(f"expected a field name, '(' or 'not', got {token.raw!r}", token)
        if self.peek().kind == "op":
            return Compare(token.value, self.take().value, self.value())
        if self.accept("kw", "in"):
            return In(token.value, self.values())
        if self.at("kw", "not") and self.at("kw", "in", ahead=1):
            self.take(), self.take()
            return In(token.value, self.values(), negated=True)
        return Truthy(token.value)

    def value(self) -> Value:
        token = self.take()
        if token.kind == "value":
            return token.value
        if token.kind == "kw" and token.value == "null":
            self.fail("null is not supported (a missing or null field never matches a comparison)", token)
        self.fail(f"expected a value, got {token.raw!r}", token)

    def values(self) -> tuple:
        if not self.accept("punct", "["):
            self.fail("expected '['")
        first = self.peek()
        items = [self.value()]
        while self.accept("punct", ","):
            items.append(self.value())
        if not self.accept("punct", "]"):
            self.fail("expected ',' or ']'")
        if len({_kind(v) for v in items}) > 1:
            self.fail("the values of a list must all be of one type", first)
        return tuple(items)


def parse_filter(text: str) -> Filter:
    """Parse a filter string into its AST; raises FilterError (None means no filter: the caller's business)."""
    if not text or not text.strip():
        raise FilterError("empty filter")
    if len(text) > MAX_LENGTH:
        raise FilterError(f"filter too long ({len(text)} characters; the limit is {MAX_LENGTH})")
    return _Parser(text).parse()


def _compare(value: object, op: str, literal: Value) -> bool:
    kind = _kind(value)
    return kind is not None and kind == _kind(literal) and _OPS[op](value, literal)


def matches(expr: Filter, metadata: dict) -> bool:
    """Evaluate in Python with exactly the semantics of `to_sql` (see the module docstring)."""
    if isinstance(expr, (And, Or)):
        test = all if isinstance(expr, And) else any
        return test(matches(item, metadata) for item in expr.items)
    if isinstance(expr, Not):
        return not matches(expr.item, metadata)
    value = metadata.get(expr.field)
    if isinstance(expr, Truthy):
        return value is True
    if isinstance(expr, Compare):
        return _compare(value, expr.op, expr.value)
    hit = any(_compare(value, "==", v) for v in expr.values)
    return (_kind(value) == _kind(expr.values[0]) and not hit) if expr.negated else hit


def _balanced(parts: list[str], joiner: str) -> str:
    """SQLite caps expression depth at 1000 and `a OR b OR c ...` is as deep as it is long: join as a tree."""
    if len(parts) <= 8:
        return "(" + joiner.join(parts) + ")"
    mid = len(parts) // 2
    return f"({_balanced(parts[:mid], joiner)}{joiner}{_balanced(parts[mid:], joiner)})"


def _sql(expr: Filter, col: str, params: list) -> str:
    """Every atom is COALESCE(type check AND comparison, 0): two-valued, so AND/OR/NOT need no NULL care."""
    if isinstance(expr, (And, Or)):
        joiner = " AND " if isinstance(expr, And) else " OR "
        return _balanced([_sql(item, col, params) for item in expr.items], joiner)
    if isinstance(expr, Not):
        return f"NOT {_sql(expr.item, col, params)}"
    path = f'$."{expr.field}"'
    if isinstance(expr, Truthy):
        params.append(path)
        return f"COALESCE(json_type({col}, ?) = 'true', 0)"
    literals = [expr.value] if isinstance(expr, Compare) else list(expr.values)
    params += [path, path, *(int(v) if isinstance(v, bool) else v for v in literals)]  # JSON true reads as 1
    if isinstance(expr, Compare):
        test = f"{_SQL_OPS[expr.op]} ?"
    else:
        test = f"{'NOT IN' if expr.negated else 'IN'} ({', '.join('?' * len(literals))})"
    types = _SQL_TYPES[_kind(literals[0])]
    return f"COALESCE(json_type({col}, ?) IN {types} AND json_extract({col}, ?) {test}, 0)"


def to_sql(expr: Filter, column: str = "metadata") -> tuple[str, list]:
    """An SQLite WHERE fragment over a TEXT column holding the metadata JSON, and its ? parameters.

    Keys travel as parameters ($."key"), never in the SQL text. The json_type guard keeps SQLite's cross-type
    ordering (any TEXT > any INTEGER) out: a type mismatch is false, as in `matches`.
    """
    if not _COLUMN.match(column):
        raise ValueError(f"not a column name: {column!r}")
    params: list = []
    return _sql(expr, column, params), params


def _milvus_value(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def _milvus(expr: Filter, field: str, outer: int = 0) -> str:
    """`outer` is the enclosing precedence (or 1, and 2): parenthesize only where Milvus would regroup."""
    if isinstance(expr, (And, Or)):
        own, word = (2, " and ") if isinstance(expr, And) else (1, " or ")
        text = word.join(_milvus(item, field, own) for item in expr.items)
        return f"({text})" if own < outer else text
    if isinstance(expr, Not):  # Milvus' `not` binds tighter than comparisons: always parenthesize
        return f"not ({_milvus(expr.item, field)})"
    target = f'{field}["{expr.field}"]'
    if isinstance(expr, Truthy):
        return f"{target} == true"
    if isinstance(expr, Compare):
        return f"{target} {expr.op} {_milvus_value(expr.value)}"
    values = ", ".join(_milvus_value(v) for v in expr.values)
    return f"{target} {'not in' if expr.negated else 'in'} [{values}]"


def to_milvus(expr: Filter, field: str = "metadata") -> str:
    """The filter as a Milvus boolean expression over the JSON field `field`, e.g. metadata["year"] >= 1960."""
    if not _COLUMN.match(field) or "." in field:
        raise ValueError(f"not a field name: {field!r}")
    return _milvus(expr, field)
