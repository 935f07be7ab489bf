"""The field registry: every field vfu-inspect can show has one entry here.

A field is declared once, with the filter name that the display filter, the
detail tree, the JSON output and the Wireshark plugin all use.  Each module
declares its fields in a `Fields` collection, as data; `registry.load()`
registers them all, once, so that importing a module registers nothing.
Protocol layers are scapy packets; `Fields.layer()` declares their fields and
compiles their fixed part into one `struct.Struct`, so that dissection does not go through scapy's
per-field machinery (which is ~20x slower) while scapy stays the single
declaration that both builds and decodes messages.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field as dc_field
from typing import Any, Callable, Iterable, Iterator

from scapy.fields import Field
from scapy.packet import Packet

# Field types, as the filter language and the JSON output see them.
UINT, INT, BOOL, BYTES, STRING, FLOAT, FRAME, PROTOCOL = (
    "uint", "int", "bool", "bytes", "string", "float", "frame", "protocol")


@dataclass(slots=True)
class FieldDef:
    """One registered field."""

    name: str                       # filter name, e.g. "dma_map.size"
    label: str                      # what the detail tree shows
    type: str = UINT
    values: dict[int, str] | None = None     # value names (enums)
    mask: int = 0                   # for bit sub-fields: the bits of the parent
    base: str = "dec"               # "hex" for addresses, sizes, flags
    blurb: str = ""
    children: list[FieldDef] = dc_field(default_factory=list)

    def value_name(self, value: Any) -> str | None:
        if self.values is None or not isinstance(value, int):
            return None
        return self.values.get(value)

    def symbol_value(self, symbol: str) -> int | None:
        """The number a symbolic value stands for (`DMA_MAP` -> 2)."""
        if self.values:
            for number, name in self.values.items():
                if name.lower() == symbol.lower():
                    return number
        return None


REGISTRY: dict[str, FieldDef] = {}


def register(declared: Iterable[FieldDef]) -> None:
    """Register declared fields (called by `registry.load()`)."""
    for fd in declared:
        if fd.name in REGISTRY:
            raise ValueError(f"field {fd.name} registered twice")
        REGISTRY[fd.name] = fd


def lookup(name: str) -> FieldDef | None:
    return REGISTRY.get(name)


def all_fields() -> Iterable[FieldDef]:
    return REGISTRY.values()


# --- expert info ---------------------------------------------------------------

SEVERITIES = ("error", "warning", "note", "chat")


@dataclass(frozen=True, slots=True)
class ExpertDef:
    """One check, registered once as Wireshark's expert infos are.

    Its severity lives here and nowhere else; a dissector raising it gives
    only the id and the values involved.
    """

    id: str                 # stable filter value, e.g. "dma.overlap"
    severity: str           # one of SEVERITIES
    summary: str            # what the check means, for the -z expert table
    section: str            # where the rule comes from
    behaviour: str = ""     # interop items: which implementation does what

    @property
    def group(self) -> str:
        return self.id.split(".", 1)[0]


EXPERTS: dict[str, ExpertDef] = {}


def expert_table() -> str:
    """Every check as a Markdown table (README.md holds it; a test keeps it current)."""
    rows = ["| id | severity | what triggers it | rule | implementations |",
            "|---|---|---|---|---|"]
    for d in sorted(EXPERTS.values(), key=lambda d: (d.group, d.id)):
        cells = (f"`{d.id}`", d.severity, d.summary, d.section, d.behaviour)
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


def register_experts(checks: Iterable[tuple[str, ...]]) -> None:
    """Register checks given as (id, severity, summary, section[, behaviour])
    rows (called by `registry.load()`)."""
    for id, severity, summary, section, *behaviour in checks:
        if id in EXPERTS:
            raise ValueError(f"expert info {id} registered twice")
        if severity not in SEVERITIES:
            raise ValueError(f"expert info {id}: bad severity {severity}")
        EXPERTS[id] = ExpertDef(id, severity, summary, section, *behaviour)


# --- scapy fields that carry display metadata -------------------------------

class Plain(Field):
    """A fixed-size scapy field that carries display metadata."""

    __slots__ = ("vfu_meta",)

    def i2repr(self, pkt: Packet | None, x: Any) -> str:
        values = self.vfu_meta.get("values")
        if values is not None and x in values:
            return f"{values[x]} ({x})"
        return super().i2repr(pkt, x)


class Bits(Plain):
    """An integer whose bits are sub-fields: single flags or multi-bit enums.

    `bits` maps a sub-field name to a mask, or to (mask, value names).
    """

    __slots__ = ("bits",)

    def __init__(self, name: str, default: int, fmt: str,
                 bits: dict[str, int | tuple[int, dict[int, str]]]) -> None:
        super().__init__(name, default, fmt)
        self.bits = bits

    def i2repr(self, pkt: Packet | None, x: int) -> str:
        return describe_bits(self.bits, x)


def describe_bits(bits: dict[str, Any], value: int) -> str:
    parts = []
    for name, spec in bits.items():
        mask, names = spec if isinstance(spec, tuple) else (spec, None)
        part = value & mask
        if isinstance(spec, tuple):      # a multi-bit number, named or not
            number = part >> ((mask & -mask).bit_length() - 1)
            parts.append(f"{name}={names.get(number, number) if names else number}")
        elif part:
            parts.append(name.upper())
    unknown = value & ~_all_bits(bits)
    if unknown:
        parts.append(f"unknown bits {unknown:#x}")
    return f"{value:#x} ({', '.join(parts)})" if parts else f"{value:#x}"


def _all_bits(bits: dict[str, Any]) -> int:
    total = 0
    for spec in bits.values():
        total |= spec[0] if isinstance(spec, tuple) else spec
    return total


def u8(name: str, default: int | None = 0, **meta: Any) -> Field:
    return _meta(Plain(name, default, "<B"), meta)


def u16(name: str, default: int | None = 0, **meta: Any) -> Field:
    return _meta(Plain(name, default, "<H"), meta)


def u32(name: str, default: int | None = 0, **meta: Any) -> Field:
    return _meta(Plain(name, default, "<I"), meta)


def u64(name: str, default: int = 0, **meta: Any) -> Field:
    return _meta(Plain(name, default, "<Q"), meta)


def raw(name: str, length: int, **meta: Any) -> Field:
    """Fixed-length bytes."""
    return _meta(Plain(name, b"\0" * length, f"<{length}s"), {"type": BYTES, **meta})


def bits16(name: str, bits: dict[str, Any], default: int = 0, **meta: Any) -> Bits:
    return _meta(Bits(name, default, "<H", bits), {"base": "hex", **meta})


def bits32(name: str, bits: dict[str, Any], default: int = 0, **meta: Any) -> Bits:
    return _meta(Bits(name, default, "<I", bits), {"base": "hex", **meta})


def bits64(name: str, bits: dict[str, Any], default: int = 0, **meta: Any) -> Bits:
    return _meta(Bits(name, default, "<Q", bits), {"base": "hex", **meta})


def _meta(fld: Field, meta: dict[str, Any]) -> Field:
    """Attach display metadata (label, values, base, blurb) to a scapy field."""
    fld.vfu_meta = meta
    return fld


# --- layers -------------------------------------------------------------------

@dataclass(slots=True)
class Compiled:
    """A layer's fixed part: one struct and the FieldDef of each member."""

    layer: FieldDef
    struct: struct.Struct
    fields: list[tuple[FieldDef, int, int]]   # (def, offset in layer, size)
    names: tuple[str, ...] = ()               # members' short names, in order
    member_names: frozenset[str] = frozenset()  # their filter names, bits included

    def __post_init__(self) -> None:
        self.names = tuple(fd.name.rsplit(".", 1)[1] for fd, _, _ in self.fields)
        self.member_names = frozenset(name for fd, _, _ in self.fields
                                      for name in (fd.name, *(sub.name for sub in fd.children)))

    @property
    def size(self) -> int:
        return self.struct.size

    def with_field(self, index: int, fd: FieldDef) -> Compiled:
        """The same layout with member `index` shown as another field."""
        fields = list(self.fields)
        fields[index] = (fd, *fields[index][1:])
        return Compiled(self.layer, self.struct, fields)


class Fields:
    """The fields one module declares, in declaration order (a parent before
    its bit sub-fields): data until `registry.load()` registers them."""

    def __init__(self, *parts: Fields) -> None:
        """Empty, or the fields of `parts` one after the other (a protocol's
        families); a name must be declared once in them all."""
        self._by_name: dict[str, FieldDef] = {}
        for part in parts:
            for fd in part:             # children included: they come after their parent
                self._declare(fd)

    def __getitem__(self, name: str) -> FieldDef:
        return self._by_name[name]

    def __iter__(self) -> Iterator[FieldDef]:
        return iter(self._by_name.values())

    def add(self, fd: FieldDef) -> FieldDef:
        self._declare(fd)
        for child in fd.children:
            self.add(child)
        return fd

    def _declare(self, fd: FieldDef) -> None:
        if fd.name in self._by_name:
            raise ValueError(f"field {fd.name} declared twice")
        self._by_name[fd.name] = fd

    def field(self, name: str, label: str, type: str = UINT, **kw: Any) -> FieldDef:
        """A field that no fixed layer carries (JSON keys, derived values)."""
        return self.add(FieldDef(name, label, type, **kw))

    def layer(self, prefix: str) -> Callable[[type[Packet]], type[Packet]]:
        """Class decorator: declare a scapy layer's fields under `prefix.`."""

        def wrap(cls: type[Packet]) -> type[Packet]:
            cls.vfu_name = cls._name     # scapy keeps a layer's `name` here
            if prefix not in self._by_name:
                self.add(FieldDef(prefix, cls.vfu_name, PROTOCOL))
            cls.vfu_field = self._by_name[prefix]
            cls.vfu_compiled = self._compile(cls, prefix)
            return cls

        return wrap

    def _compile(self, cls: type[Packet], prefix: str) -> Compiled:
        fmt, members, offset = "<", [], 0
        for fld in cls.fields_desc:
            meta = getattr(fld, "vfu_meta", None)
            if meta is None:        # a variable tail: the dissector handles it
                break
            fd = self._field_def(f"{prefix}.{fld.name}", fld, meta)
            members.append((fd, offset, fld.sz))
            fmt += fld.fmt.lstrip("<")
            offset += fld.sz
        return Compiled(self._by_name[prefix], struct.Struct(fmt), members)

    def _field_def(self, name: str, fld: Field, meta: dict[str, Any]) -> FieldDef:
        existing = self._by_name.get(name)
        if existing is not None:    # request and reply layers may share a prefix
            return existing
        fd = FieldDef(name, meta.get("label") or _humanize(fld.name), meta.get("type", UINT),
                      values=meta.get("values"), base=meta.get("base", "dec"),
                      blurb=meta.get("blurb", ""))
        if isinstance(fld, Bits):
            for sub, spec in fld.bits.items():
                mask, names = spec if isinstance(spec, tuple) else (spec, None)
                fd.children.append(FieldDef(
                    f"{name}.{sub}", _humanize(sub), UINT if isinstance(spec, tuple) else BOOL,
                    values=names, mask=mask))
        return self.add(fd)


def _humanize(name: str) -> str:
    return name.replace("_", " ").capitalize()
