"""Display filters in Wireshark's language, compiled to closures.

    vfio_user.cmd == DMA_MAP && dma_map.size >= 0x1000
    vfio_user.error || expert.severity == "error"
    region_read.region in {CONFIG BAR0} and !(frame.conn == 2)

A filter is compiled once against the field registry (unknown fields,
symbols and type mismatches are errors with their position) and then
evaluated against `Tree.values()`: filter name -> list of values.  As in
Wireshark 4, a comparison holds if any occurrence matches, `!=` if none equals.

`could_match` evaluates it on what is known of a message before it is
dissected (its header, say), in three-valued logic: False only when no
message with those values can match, so that the rest need not be dissected.
"""

from __future__ import annotations

import functools
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable

from .fields import (BOOL, BYTES, FLOAT, FRAME, INT, PROTOCOL, STRING, UINT, FieldDef,
                     lookup)
from .tree import EXPERT_FIELDS

Values = dict[str, list[Any]]
Test = Callable[[Values], bool]

# Fields a Tree adds for its expert items.
_BUILTIN = {name: FieldDef(name, name, kind) for name, kind in EXPERT_FIELDS.items()}

_NUMERIC = {UINT, INT, FRAME, FLOAT, BOOL}
_ORDERED = {UINT, INT, FRAME, FLOAT}
_COMPARE = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
            ">": operator.gt, ">=": operator.ge}
_WORDS = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">=",
          "and": "&&", "or": "||", "not": "!"}

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<op>==|!=|<=|>=|&&|\|\||[<>!&(){},]|\.\.)
  | (?P<word>[A-Za-z0-9_](?:[A-Za-z0-9_:\-]|\.(?!\.))*)
""", re.VERBOSE)


class FilterError(Exception):
    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"{message} at position {position}")
        self.message = message
        self.position = position


@dataclass(frozen=True)
class Token:
    kind: str       # string, op, word, end
    text: str
    pos: int


class PartialValues(dict):
    """Values of the fields `known` says are known (absent from the dict: the
    message lacks them); the others are unknown."""

    def __init__(self, values: Values, known: Callable[[str], bool]) -> None:
        super().__init__(values)
        self.known = known


@dataclass
class DisplayFilter:
    text: str
    fields: frozenset[str]
    test: Test

    def matches(self, values: Values) -> bool:
        return self.test(values)

    def could_match(self, values: PartialValues) -> bool:
        """False when no message with these known values can match."""
        return self._partial_test(values) is not False

    @functools.cached_property
    def _partial_test(self) -> Callable[[PartialValues], bool | None]:
        return _Parser(self.text, partial=True).parse()


def compile_filter(text: str) -> DisplayFilter:
    parser = _Parser(text)
    test = parser.parse()
    return DisplayFilter(text, frozenset(parser.fields), test)


def _tokenize(text: str) -> list[Token]:
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise FilterError(f"unexpected character {text[pos]!r}", pos)
        kind = m.lastgroup
        if kind != "space":
            value = m.group()
            if kind == "word" and value.lower() in _WORDS:
                kind, value = "op", _WORDS[value.lower()]
            tokens.append(Token(kind, value, pos))
        pos = m.end()
    tokens.append(Token("end", "", len(text)))
    return tokens


class _Parser:
    """Recursive descent: or -> and -> not -> primary.

    With `partial`, tests return None when a field they need is unknown, and
    the connectives follow Kleene's three-valued logic."""

    def __init__(self, text: str, partial: bool = False) -> None:
        self.tokens = _tokenize(text)
        self.i = 0
        self.fields: set[str] = set()
        self.partial = partial

    def parse(self) -> Test:
        if self.peek().kind == "end":
            raise FilterError("empty filter", 0)
        test = self.parse_or()
        tok = self.peek()
        if tok.kind != "end":
            raise FilterError(f"unexpected {tok.text!r}", tok.pos)
        return test

    def peek(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def accept(self, text: str) -> bool:
        if self.peek().kind == "op" and self.peek().text == text:
            self.i += 1
            return True
        return False

    def parse_or(self) -> Test:
        tests = [self.parse_and()]
        while self.accept("||"):
            tests.append(self.parse_and())
        if len(tests) == 1:
            return tests[0]
        if self.partial:
            return lambda v: _kleene(True, [t(v) for t in tests])
        return lambda v: any(t(v) for t in tests)

    def parse_and(self) -> Test:
        tests = [self.parse_not()]
        while self.accept("&&"):
            tests.append(self.parse_not())
        if len(tests) == 1:
            return tests[0]
        if self.partial:
            return lambda v: _kleene(False, [t(v) for t in tests])
        return lambda v: all(t(v) for t in tests)

    def parse_not(self) -> Test:
        if self.accept("!"):
            inner = self.parse_not()
            if self.partial:
                return lambda v: None if (r := inner(v)) is None else not r
            return lambda v: not inner(v)
        return self.parse_primary()

    def parse_primary(self) -> Test:
        tok = self.peek()
        if self.accept("("):
            test = self.parse_or()
            if not self.accept(")"):
                raise FilterError("missing ')'", self.peek().pos)
            return test
        if tok.kind != "word":
            raise FilterError(f"expected a field, got {tok.text or 'end of filter'!r}", tok.pos)
        self.take()
        fd = lookup(tok.text) or _BUILTIN.get(tok.text)
        if fd is None:
            raise FilterError(f"unknown field {tok.text!r}", tok.pos)
        self.fields.add(fd.name)
        test = self.parse_relation(fd, tok)
        if self.partial:
            name = fd.name
            return lambda v: test(v) if v.known(name) else None
        return test

    def parse_relation(self, fd: FieldDef, field_tok: Token) -> Test:
        name = fd.name
        op = self.peek()
        if op.kind == "op" and op.text in _COMPARE:
            self.take()
            if op.text in ("<", "<=", ">", ">=") and fd.type not in _ORDERED:
                raise FilterError(f"{name} ({fd.type}) cannot be ordered", op.pos)
            return _compare(name, op.text, self.value(fd))
        if op.kind == "op" and op.text == "&":
            self.take()
            if fd.type not in (UINT, INT):
                raise FilterError(f"{name} ({fd.type}) has no bits to test", op.pos)
            mask = self.value(fd)
            return lambda v: any(x & mask for x in v.get(name, ()))
        if op.kind == "word" and op.text == "contains":
            self.take()
            return self.contains(fd)
        if op.kind == "word" and op.text == "matches":
            self.take()
            return self.matches(fd)
        if op.kind == "word" and op.text == "in":
            self.take()
            return self.member(fd)
        if fd.type == BOOL:   # a bool alone tests its value, as in Wireshark
            return lambda v: any(v.get(name, ()))
        return lambda v: name in v

    def value(self, fd: FieldDef) -> Any:
        tok = self.take()
        if tok.kind == "end":
            raise FilterError(f"{fd.name} needs a value", tok.pos)
        if tok.kind == "op":
            raise FilterError(f"expected a value, got {tok.text!r}", tok.pos)
        if fd.type == PROTOCOL:
            raise FilterError(f"{fd.name} is a protocol: test it alone", tok.pos)
        if fd.type == STRING:   # a bare word is a literal, as in Wireshark
            return _unquote(tok.text) if tok.kind == "string" else tok.text
        if fd.type == BYTES:
            return _bytes_value(tok)
        if tok.kind == "string":
            raise FilterError(f"{fd.name} is a number, not a string", tok.pos)
        return _number(fd, tok)

    def contains(self, fd: FieldDef) -> Test:
        if fd.type not in (STRING, BYTES):
            raise FilterError(f"contains needs a string or bytes field, {fd.name} is "
                              f"{fd.type}", self.tokens[self.i - 1].pos)
        tok = self.peek()
        needle = self.value(fd) if fd.type == BYTES or tok.kind == "string" else None
        if needle is None:
            raise FilterError("contains needs a quoted string", tok.pos)
        name = fd.name
        return lambda v: any(needle in x for x in v.get(name, ()))

    def matches(self, fd: FieldDef) -> Test:
        tok = self.take()
        if fd.type != STRING:
            raise FilterError(f"matches needs a string field, {fd.name} is {fd.type}", tok.pos)
        if tok.kind != "string":
            raise FilterError("matches needs a quoted regular expression", tok.pos)
        try:
            regex = re.compile(_unquote(tok.text), re.IGNORECASE)
        except re.error as exc:
            raise FilterError(f"invalid regular expression: {exc}", tok.pos) from None
        name = fd.name
        return lambda v: any(regex.search(x) for x in v.get(name, ()))

    def member(self, fd: FieldDef) -> Test:
        if not self.accept("{"):
            raise FilterError("expected '{' after in", self.peek().pos)
        exact, ranges = set(), []
        while not self.accept("}"):
            if self.peek().kind == "end":
                raise FilterError("missing '}'", self.peek().pos)
            low = self.value(fd)
            if self.accept(".."):
                ranges.append((low, self.value(fd)))
            else:
                exact.add(low)
            self.accept(",")
        name = fd.name
        return lambda v: any(x in exact or any(lo <= x <= hi for lo, hi in ranges)
                             for x in v.get(name, ()))


def _kleene(decisive: bool, results: list[bool | None]) -> bool | None:
    """|| (decisive True) or && (decisive False) of three-valued results."""
    if decisive in results:
        return decisive
    return None if None in results else not decisive


def _compare(name: str, op: str, wanted: Any) -> Test:
    if op == "!=":
        return lambda v: name in v and all(x != wanted for x in v[name])
    fn = _COMPARE[op]
    return lambda v: any(fn(x, wanted) for x in v.get(name, ()))


def _number(fd: FieldDef, tok: Token) -> Any:
    text = tok.text
    if fd.type == BOOL:
        lowered = text.lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
        raise FilterError(f"{fd.name} is a boolean: use true or false", tok.pos)
    try:
        if fd.type == FLOAT:
            return float(text)
        return int(text, 8) if re.fullmatch(r"0[0-7]+", text) else int(text, 0)
    except ValueError:
        pass
    symbol = fd.symbol_value(text)
    if symbol is not None:
        return symbol
    known = ", ".join(list((fd.values or {}).values())[:6])
    hint = f" (known: {known}, …)" if known else ""
    raise FilterError(f"{text!r} is not a value of {fd.name}{hint}", tok.pos)


def _bytes_value(tok: Token) -> bytes:
    if tok.kind == "string":
        return _unquote(tok.text).encode()
    text = tok.text.lower()
    digits = text[2:] if text.startswith("0x") else re.sub(r"[:\-.]", "", text)
    try:
        return bytes.fromhex(digits)
    except ValueError:
        raise FilterError(f"{tok.text!r} is not bytes (write 41:42:43)", tok.pos) from None


def _unquote(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text[1:-1])
