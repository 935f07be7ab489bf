"""A dissected message: its fields, expert items and info line.

Dissectors add fields to a `Tree`; every view (detail text, JSON, filters,
hex highlighting) reads the same fields, so a field looks the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .fields import (BOOL, BYTES, EXPERTS, FLOAT, PROTOCOL, SEVERITIES, STRING, Compiled,
                     FieldDef, describe_bits, lookup)


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
        if not self.field.children:         # most fields: no bits to build
            return []
        return [Item(sub, value, self.offset, self.length)
                for sub, value in bit_values(self.field, self.value)]

    @property
    def field_names(self) -> frozenset[str]:
        """The fields this item and the children built from its value may have."""
        return frozenset((self.field.name, *(sub.name for sub in self.field.children)))

    def value_text(self) -> str:
        if self.text is not None:
            return self.text
        return format_value(self.field, self.value)

    def heading(self) -> str:
        """What a protocol node shows in the detail tree."""
        return self.text or self.field.label

    def line(self) -> str:
        """Its line in the detail tree: the TUI's node, a line of -V."""
        if self.field.type == PROTOCOL:
            return self.heading()
        return field_line(self.field, self.value, self.text)

    def child_values(self) -> list[tuple[FieldDef, Any]]:
        """Its children's fields and values: all a view renders of a node
        whose children are plain fields (the frame, `Tree.leading`)."""
        return [(child.field, child.value) for child in self.children]

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


class Packed:
    """A layer's fixed fields, unpacked by one struct call: the row of the
    layer holds them, and they become fields of their own only on demand."""

    __slots__ = ("compiled", "raw", "values")

    def __init__(self, compiled: Compiled, raw: tuple, values: dict[str, Any]) -> None:
        self.compiled = compiled
        self.raw = raw                  # member values, in layout order (maybe fewer)
        self.values = values            # the same, by short name

    def members(self, offset: int) -> Iterator[tuple[FieldDef, Any, int, int]]:
        for (fd, rel, size), value in zip(self.compiled.fields, self.raw):
            yield fd, value, offset + rel, size


class Tree:
    """What the dissectors found in one message.

    Dissectors add fields as flat rows (field, value, offset, length, parent
    row), a layer's fixed part as one row; filters, session tracking and
    summary lines read the values from them.  The `Item` tree a detail view
    walks is built from the rows only when a view asks for it: most messages
    are listed or filtered, never expanded.
    """

    __slots__ = ("rows", "texts", "experts", "info", "leading", "_items")

    def __init__(self) -> None:
        self.rows: list[tuple[FieldDef, Any, int, int, int]] = []
        self.texts: dict[int, str] = {}          # row -> text overriding its value's
        self.experts: list[Expert] = []
        self.info: str = ""
        self.leading: list[Item] = []            # nodes of plain fields shown first (the frame)
        self._items: list[Item] | None = None

    def add(self, name: str | FieldDef, value: Any, offset: int = -1,
            length: int = 0, parent: int = -1, text: str | None = None) -> int:
        """Add a field under row `parent` (-1: at the top); returns its row."""
        fd = name if isinstance(name, FieldDef) else lookup(name)
        if fd is None:
            raise KeyError(f"unregistered field {name}")
        row = len(self.rows)
        self.rows.append((fd, value, offset, length, parent))
        if text is not None:
            self.texts[row] = text
        self._items = None
        return row

    def add_packed(self, packed: Packed, offset: int, length: int, parent: int = -1) -> int:
        """Add a layer's fixed part under row `parent`; returns its row."""
        self.rows.append((packed.compiled.layer, packed, offset, length, parent))
        self._items = None
        return len(self.rows) - 1

    def append_text(self, row: int, text: str) -> None:
        self.texts[row] = self.texts.get(row, "") + text
        self._items = None

    def expert(self, id: str, message: str, offset: int = -1, length: int = 0) -> None:
        """Raise the registered expert info `id`; its severity comes from the registry."""
        self.experts.append(Expert(EXPERTS[id].severity, id, message, offset, length))

    def find(self, name: str) -> tuple[FieldDef, Any, int, int, int] | None:
        """The first row of field `name` (not a member of a layer's fixed part)."""
        for row in self.rows:
            if row[0].name == name:
                return row
        return None

    def first(self, name: str) -> Any:
        """The first value of field `name`, or None."""
        layer, _, member = name.rpartition(".")
        for fd, value, _, _, _ in self.rows:
            if type(value) is Packed:
                if fd.name == layer and member in value.values:
                    return value.values[member]
            elif fd.name == name:
                return value
        found = self.values().get(name)          # a bit of a flags word, a frame field
        return found[0] if found else None

    def children_of(self, name: str) -> list[dict[str, Any]]:
        """For each row of field `name`: its children's values by short name."""
        out: list[dict[str, Any]] = []
        index: dict[int, dict[str, Any]] = {}
        for i, (fd, value, _, _, parent) in enumerate(self.rows):
            if fd.name == name:
                index[i] = dict(value.values) if type(value) is Packed else {}
                out.append(index[i])
            elif parent in index:
                index[parent][fd.name.rsplit(".", 1)[1]] = value
        return out

    def prefixed(self, prefix: str) -> dict[str, Any]:
        """Name below `prefix.` -> value, for the fields under it (first of each)."""
        out: dict[str, Any] = {}
        start = prefix + "."
        cut = len(start)
        for fd, value, _, _, _ in self.rows:
            name = fd.name
            if type(value) is Packed:
                if name == prefix:
                    for key, member in value.values.items():
                        out.setdefault(key, member)
                elif name.startswith(start):
                    for key, member in value.values.items():
                        out.setdefault(f"{name[cut:]}.{key}", member)
            elif name.startswith(start):
                out.setdefault(name[cut:], value)
        return out

    @property
    def items(self) -> list[Item]:
        """The detail tree, built from the rows on first use."""
        if self._items is None:
            items: list[Item] = []
            built: list[Item] = []
            for i, (fd, value, offset, length, parent) in enumerate(self.rows):
                if type(value) is Packed:
                    item = Item(fd, None, offset, length, self.texts.get(i))
                    item._children = [Item(*member) for member in value.members(offset)]
                else:
                    item = Item(fd, value, offset, length, self.texts.get(i))
                built.append(item)
                (built[parent].children if parent >= 0 else items).append(item)
            self._items = items
        return self.leading + self._items

    def walk(self) -> Iterator[Item]:
        for item in self.items:
            yield from item.walk()

    def outline(self) -> tuple[list[int], list[list[int]]]:
        """The top rows and each row's child rows, in the detail tree's order:
        for a view that renders every row (-V) without building Items."""
        top: list[int] = []
        kids: list[list[int]] = [[] for _ in self.rows]
        for i, row in enumerate(self.rows):
            (kids[row[4]] if row[4] >= 0 else top).append(i)
        return top, kids

    def values(self, only: frozenset[str] | None = None) -> dict[str, list[Any]]:
        """Every field's values, keyed by filter name (a field may repeat);
        with `only` (a filter's fields), those fields' values and no others':
        a filter of two fields need not collect forty."""
        if only is not None:
            return self._values_of(only)
        out: dict[str, list[Any]] = {}
        _collect(self.leading, out)
        for fd, value, _, _, _ in self.rows:
            if type(value) is Packed:
                out.setdefault(fd.name, []).append(None)
                for member, member_value in zip(value.compiled.fields, value.raw):
                    _add_value(out, member[0], member_value)
            else:
                _add_value(out, fd, value)
        self._add_experts(out)
        return out

    def _values_of(self, only: frozenset[str]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for item in self.leading:
            if not only.isdisjoint(item.field_names):
                _collect([item], out)
        for fd, value, _, _, _ in self.rows:
            if type(value) is Packed:
                if fd.name in only:
                    out.setdefault(fd.name, []).append(None)
                if only.isdisjoint(value.compiled.member_names):
                    continue
                for member, member_value in zip(value.compiled.fields, value.raw):
                    if _wanted(member[0], only):
                        _add_value(out, member[0], member_value)
            elif _wanted(fd, only):
                _add_value(out, fd, value)
        if not only.isdisjoint(EXPERT_FIELDS.keys()):
            self._add_experts(out)
        return out

    def _add_experts(self, out: dict[str, list[Any]]) -> None:
        if self.experts:
            out["expert"] = [True]
            out["expert.id"] = [e.id for e in self.experts]
            out["expert.severity"] = [e.severity for e in self.experts]
            out["expert.message"] = [e.message for e in self.experts]

    @property
    def worst_severity(self) -> str | None:
        ranks = [SEVERITIES.index(e.severity) for e in self.experts]
        return SEVERITIES[min(ranks)] if ranks else None


# The fields a message's expert items give it, and their kinds (the filter's).
EXPERT_FIELDS = {"expert": PROTOCOL, "expert.id": STRING, "expert.severity": STRING,
                 "expert.message": STRING}


def _wanted(fd: FieldDef, only: frozenset[str]) -> bool:
    """Whether `fd` or one of its bits is in `only`."""
    return fd.name in only or bool(fd.children) and any(sub.name in only for sub in fd.children)


def _add_value(out: dict[str, list[Any]], fd: FieldDef, value: Any) -> None:
    values = out.get(fd.name)
    if values is None:
        out[fd.name] = [value]
    else:
        values.append(value)
    if fd.children:
        for sub, bit in bit_values(fd, value):
            out.setdefault(sub.name, []).append(bit)


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


def field_line(fd: FieldDef, value: Any, text: str | None = None) -> str:
    """A field's line in the detail tree; `text` overrides its value's."""
    return f"{fd.label}: {format_value(fd, value) if text is None else text}"


def format_value(fd: FieldDef, value: Any) -> str:
    if value is None:
        return ""
    kind = fd.type
    if kind == BYTES:
        return _bytes_text(value)
    if kind == BOOL:
        return "True" if value else "False"
    if kind == FLOAT:
        return f"{value:.9f}"
    if not isinstance(value, int) or isinstance(value, bool):
        return str(value)
    if fd.children:
        return _FLAGS_TEXT.get(fd, value)
    number = f"{value:#x}" if fd.base == "hex" else str(value)
    if fd.values is not None:
        return f"{fd.value_name(value) or 'unknown'} ({number})"
    return number


class FlagsMemo:
    """What a view makes of a flags word, by (field, value), made once: a
    capture repeats few flag values (a fuzzed one may not: the table is
    cleared when full)."""

    __slots__ = ("make", "table")
    LIMIT = 4096

    def __init__(self, make: Callable[[FieldDef, int], Any]) -> None:
        self.make = make
        self.table: dict[tuple[str, int], Any] = {}

    def get(self, fd: FieldDef, value: int) -> Any:
        key = (fd.name, value)
        made = self.table.get(key)
        if made is None:
            if len(self.table) >= self.LIMIT:
                self.table.clear()
            made = self.table[key] = self.make(fd, value)
        return made


_FLAGS_TEXT = FlagsMemo(lambda fd, value: describe_bits(
    {c.name.rsplit(".", 1)[1]: (c.mask, c.values) if c.type != BOOL else c.mask
     for c in fd.children}, value))


def _bytes_text(value: bytes, limit: int = 24) -> str:
    shown = value[:limit].hex()
    more = f"… ({len(value)} bytes)" if len(value) > limit else ""
    return shown + more
