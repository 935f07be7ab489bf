"""A dissected message: the detail tree, its expert items and its info line.

Dissectors add items to a `Tree`; every view (detail text, JSON, filters,
hex highlighting) reads the same items, so a field looks the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from typing import Any, Iterator

from .fields import BOOL, BYTES, FLOAT, FieldDef, describe_bits, lookup

SEVERITIES = ("error", "warning", "note", "chat")


@dataclass(slots=True)
class Item:
    field: FieldDef
    value: Any
    offset: int = -1        # byte offset in the message, -1 when not in the bytes
    length: int = 0
    text: str | None = None  # overrides the generated value text
    children: list[Item] = dc_field(default_factory=list)

    def value_text(self) -> str:
        if self.text is not None:
            return self.text
        return format_value(self.field, self.value)

    def walk(self) -> Iterator[Item]:
        yield self
        for child in self.children:
            yield from child.walk()


@dataclass(slots=True)
class Expert:
    severity: str           # one of SEVERITIES
    id: str                 # stable, e.g. "malformed.short"
    message: str
    offset: int = -1
    length: int = 0


class Tree:
    """Items of one message, built by the dissectors."""

    __slots__ = ("items", "experts", "info")

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.experts: list[Expert] = []
        self.info: str = ""

    def add(self, name: str | FieldDef, value: Any, offset: int = -1,
            length: int = 0, parent: Item | None = None,
            text: str | None = None) -> Item:
        fd = name if isinstance(name, FieldDef) else lookup(name)
        if fd is None:
            raise KeyError(f"unregistered field {name}")
        item = Item(fd, value, offset, length, text)
        (parent.children if parent else self.items).append(item)
        if fd.children and isinstance(value, int):
            for sub in fd.children:
                part = value & sub.mask
                sub_value = bool(part) if sub.type == BOOL else part >> _shift(sub.mask)
                item.children.append(Item(sub, sub_value, offset, length))
        return item

    def expert(self, severity: str, id: str, message: str,
               offset: int = -1, length: int = 0) -> None:
        self.experts.append(Expert(severity, id, message, offset, length))

    def walk(self) -> Iterator[Item]:
        for item in self.items:
            yield from item.walk()

    def first(self, name: str) -> Any:
        for item in self.walk():
            if item.field.name == name:
                return item.value
        return None

    def values(self) -> dict[str, list[Any]]:
        """Every field's values, keyed by filter name (a field may repeat)."""
        out: dict[str, list[Any]] = {}
        for item in self.walk():
            out.setdefault(item.field.name, []).append(item.value)
        if self.experts:
            out["expert"] = [True]
            out["expert.id"] = [e.id for e in self.experts]
            out["expert.severity"] = [e.severity for e in self.experts]
            out["expert.message"] = [e.message for e in self.experts]
        return out

    @property
    def worst_severity(self) -> str | None:
        ranks = [SEVERITIES.index(e.severity) for e in self.experts]
        return SEVERITIES[min(ranks)] if ranks else None


def _shift(mask: int) -> int:
    return (mask & -mask).bit_length() - 1


def format_value(fd: FieldDef, value: Any) -> str:
    if value is None:
        return ""
    if fd.type == BYTES:
        return _bytes_text(value)
    if fd.type == BOOL:
        return "True" if value else "False"
    if fd.type == FLOAT:
        return f"{value:.9f}"
    if isinstance(value, int) and not isinstance(value, bool):
        if fd.children:
            return describe_bits({c.name.rsplit(".", 1)[1]: (c.mask, c.values) if c.values else c.mask
                                  for c in fd.children}, value)
        name = fd.value_name(value)
        number = f"{value:#x}" if fd.base == "hex" else str(value)
        if fd.values is not None:
            return f"{name or 'unknown'} ({number})"
        return number
    return str(value)


def _bytes_text(value: bytes, limit: int = 24) -> str:
    shown = value[:limit].hex()
    more = f"… ({len(value)} bytes)" if len(value) > limit else ""
    return shown + more
