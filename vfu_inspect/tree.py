"""A dissected message: the detail tree, its expert items and its info line.

Dissectors add items to a `Tree`; every view (detail text, JSON, filters,
hex highlighting) reads the same items, so a field looks the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from .fields import BOOL, BYTES, EXPERTS, FLOAT, SEVERITIES, FieldDef, describe_bits, lookup


class Item:
    """One field of the detail tree.

    The bit sub-fields of a flags word are built only when something looks at
    them: most messages are filtered or summarized, never expanded.
    """

    __slots__ = ("field", "value", "offset", "length", "text", "_children")

    def __init__(self, field: FieldDef, value: Any, offset: int = -1, length: int = 0,
                 text: str | None = None) -> None:
        self.field = field
        self.value = value
        self.offset = offset        # byte offset in the message, -1 when not in the bytes
        self.length = length
        self.text = text            # overrides the generated value text
        self._children: list[Item] | None = None

    @property
    def children(self) -> list[Item]:
        if self._children is None:
            self._children = self._build_children()
        return self._children

    def _build_children(self) -> list[Item]:
        """Children known from the value alone: the bits of a flags word."""
        return [Item(sub, value, self.offset, self.length)
                for sub, value in bit_values(self.field, self.value)]

    def value_text(self) -> str:
        if self.text is not None:
            return self.text
        return format_value(self.field, self.value)

    def walk(self) -> Iterator[Item]:
        yield self
        for child in self.children:
            yield from child.walk()

    def __repr__(self) -> str:
        return f"Item({self.field.name}={self.value!r})"


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
        return item

    def expert(self, id: str, message: str, offset: int = -1, length: int = 0) -> None:
        """Raise the registered expert info `id`; its severity comes from the registry."""
        self.experts.append(Expert(EXPERTS[id].severity, id, message, offset, length))

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
        _collect(self.items, out)
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


def _collect(items: list[Item], out: dict[str, list[Any]]) -> None:
    """Field values of `items` and below; bit values without building items."""
    for item in items:
        fd = item.field
        values = out.get(fd.name)
        if values is None:
            out[fd.name] = [item.value]
        else:
            values.append(item.value)
        if item._children is None and type(item) is Item:
            for sub, value in bit_values(fd, item.value):
                out.setdefault(sub.name, []).append(value)
        elif item.children:
            _collect(item.children, out)


def bit_values(fd: FieldDef, value: Any) -> list[tuple[FieldDef, Any]]:
    """The bit sub-fields of a flags word and their values."""
    if not fd.children or not isinstance(value, int):
        return []
    out = []
    for sub in fd.children:
        part = value & sub.mask
        out.append((sub, bool(part) if sub.type == BOOL else part >> _shift(sub.mask)))
    return out


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
            return describe_bits({c.name.rsplit(".", 1)[1]: (c.mask, c.values) if c.type != BOOL else c.mask
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
