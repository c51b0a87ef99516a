"""containerd's filter language for List (`pkg/filters`), on snapshot infos.

    filters   := one string per alternative; any may match; none: everything
    selectors := selector ("," selector)*        all must match
    selector  := fieldpath [operator value]      no operator: "field is present"
    fieldpath := field ("." field)*
    field     := [A-Za-z0-9_]+ | quoted
    operator  := "==" | "!=" | "~="             "~=" is a regexp search
    value     := quoted | run of characters other than "," and white space
    quoted    := a Go "double-quoted" string; a "~=" value may also be /.../ or |...|

Fields of a snapshot: `name`, `parent`, `kind` (`active`, `view`,
`committed`) and `labels.<key>`, where the key may be quoted to carry dots
and slashes: `labels."containerd.io/gc.root"==x`. `==` needs the field to be
present; `!=` also matches an absent field; a snapshot without labels has no
`labels.*` field. That is what containerd's storage adaptor does
(`core/snapshots/storage/bolt.go` `adaptSnapshot`).

What containerd sends a proxy: nothing (garbage collection), or, on the
remote-snapshot path, `labels."containerd.io/snapshot.ref"==<chainID>,parent=="<key>"`.
Unlike containerd we refuse unknown field names instead of treating them as
absent: no caller sends them, and a typo should not silently match nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import attrs

from daemon.model import Info
from shim_framework.errors import InvalidArgument

_FIELDS = ("name", "parent", "kind", "labels")
_FIELD_CHARS = re.compile(r"[A-Za-z0-9_]+")
_OPERATORS = ("==", "!=", "~=")
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}

Filter = Callable[[Info], bool]


@attrs.frozen
class Selector:
    """One `fieldpath op value` term."""

    fieldpath: tuple[str, ...]
    operator: str  # "" (present), "==", "!=", "~="
    value: str = ""
    regexp: re.Pattern[str] | None = None

    def match(self, info: Info) -> bool:
        value, present = field_of(info, self.fieldpath)
        if self.operator == "":
            return present
        if self.operator == "==":
            return present and value == self.value
        if self.operator == "!=":
            return value != self.value
        assert self.regexp is not None
        return self.regexp.search(value) is not None


def field_of(info: Info, fieldpath: Sequence[str]) -> tuple[str, bool]:
    """(value, present) of *fieldpath* on *info*."""
    head = fieldpath[0]
    if head == "name":
        return info.name, True
    if head == "parent":
        return info.parent, True
    if head == "kind":
        return str(info.kind), True
    if head == "labels":
        key = ".".join(fieldpath[1:])
        if not info.labels or key not in info.labels:
            return "", False
        return info.labels[key], True
    return "", False


def parse_all(filters: Sequence[str]) -> Filter:
    """One predicate for a List request's filters (OR of the strings). InvalidArgument on errors."""
    alternatives = [parse(f) for f in filters]
    if not alternatives:
        return lambda info: True
    return lambda info: any(alt(info) for alt in alternatives)


def parse(text: str) -> Filter:
    """A predicate for one filter string (AND of its selectors). InvalidArgument on errors."""
    if text == "":
        return lambda info: True
    selectors = _Parser(text).selectors()
    return lambda info: all(s.match(info) for s in selectors)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str) -> InvalidArgument:
        return InvalidArgument(f"filter {self.text!r}: {message} at offset {self.pos}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def selectors(self) -> list[Selector]:
        found = [self.selector()]
        while True:
            self.skip_space()
            c = self.peek()
            if c == "":
                return found
            if c != ",":
                raise self.error(f"unexpected {c!r}; expected ',' or the end")
            self.pos += 1
            found.append(self.selector())

    def selector(self) -> Selector:
        fieldpath = self.fieldpath()
        self.skip_space()
        if self.peek() in ("", ","):
            return Selector(fieldpath, "")
        start = self.pos
        while self.peek() in ("=", "!", "~") and self.peek():
            self.pos += 1
        operator = self.text[start : self.pos]
        if operator not in _OPERATORS:
            self.pos = start
            raise self.error(
                f"expected an operator (==, != or ~=), found {operator or self.peek()!r}"
            )
        value = self.value(regexp=operator == "~=")
        if operator != "~=":
            return Selector(fieldpath, operator, value)
        try:
            return Selector(fieldpath, operator, value, re.compile(value))
        except re.error as exc:
            raise self.error(f"bad regular expression {value!r}: {exc}") from exc

    def fieldpath(self) -> tuple[str, ...]:
        fields = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            fields.append(self.field())
        if fields[0] not in _FIELDS:
            raise InvalidArgument(
                f"filter {self.text!r}: unknown field {fields[0]!r}; snapshots have "
                "name, parent, kind and labels.<key>"
            )
        return tuple(fields)

    def field(self) -> str:
        self.skip_space()
        c = self.peek()
        if c == '"':
            return self.quoted()
        match = _FIELD_CHARS.match(self.text, self.pos)
        if match is None:
            raise self.error(f"expected a field name or a quoted string, found {c or 'the end'!r}")
        self.pos = match.end()
        return match.group()

    def value(self, regexp: bool) -> str:
        self.skip_space()
        c = self.peek()
        if c == '"' or (regexp and c in "/|"):
            return self.quoted()
        if c in ("", ",", "/", "|", "."):
            raise self.error(f"expected a value or a quoted string, found {c or 'the end'!r}")
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] != ",":
            if self.text[self.pos].isspace():
                break
            self.pos += 1
        return self.text[start : self.pos]

    def quoted(self) -> str:
        """A quoted string with Go escapes; the quote character is the current one."""
        quote = self.text[self.pos]
        start = self.pos
        self.pos += 1
        out: list[str] = []
        while True:
            c = self.peek()
            if c in ("", "\n"):
                self.pos = start
                raise self.error("quoted string not terminated")
            self.pos += 1
            if c == quote:
                return "".join(out)
            if c != "\\":
                out.append(c)
                continue
            e = self.peek()
            self.pos += 1
            if e in _ESCAPES:
                out.append(_ESCAPES[e])
            elif e in ("\\", quote):
                out.append(e)
            elif e in _HEX_DIGITS:
                digits = self.text[self.pos : self.pos + _HEX_DIGITS[e]]
                if len(digits) != _HEX_DIGITS[e] or not all(
                    d in "0123456789abcdefABCDEF" for d in digits
                ):
                    raise self.error(f"bad \\{e} escape")
                self.pos += len(digits)
                code = int(digits, 16)
                if code > 0x10FFFF:
                    raise self.error(f"bad \\{e} escape")
                out.append(chr(code))
            elif e in "01234567":
                digits = self.text[self.pos - 1 : self.pos + 2]
                if len(digits) != 3 or not all(d in "01234567" for d in digits):
                    raise self.error("bad octal escape")
                self.pos += 2
                if int(digits, 8) > 255:
                    raise self.error("bad octal escape")
                out.append(chr(int(digits, 8)))
            else:
                raise self.error(f"unknown escape \\{e}")
