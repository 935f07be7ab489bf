"""What every command family's dissectors share: the Context a dissector
gets, `add_layer` and the byte helpers, the checks many commands make
(argsz, must-be-zero fields, ranges that wrap), where a check's rule comes
from, `Payload` (a request's or reply's layout declared as data, which
`walk` dissects and the Lua plugin interprets), and `Dissectors`, the table
a family files its request and reply dissectors and payloads in.
"""

from __future__ import annotations

import functools
import string
import struct
from dataclasses import dataclass, field as dc_field, replace
from typing import Any, Callable, Iterable

from scapy.packet import Packet

from vfu_inspect.fields import Compiled, FieldDef
from vfu_inspect.tree import Packed, Tree

from .protocol import CMD, irq_name, region_name

# Where a check's rule comes from (the CHECKS rows): "spec" is QEMU's
# docs/interop/vfio-user.rst, by section; a rule that is not the spec's says
# whose it is, and is a note unless the message also breaks the spec.
SPEC, FACTS, LVU = "spec", "facts", "libvfio-user"


@dataclass
class Context:
    """What a dissector may know beyond the message's own bytes."""

    direction: str                       # "c2s" or "s2c"
    fds: list[dict[str, Any]]            # metadata of the passed fds
    request: bytes | None = None         # the matched request, for a reply
    fd_purposes: dict[int, str] = dc_field(default_factory=dict)
    # Why this connection's client is known to use QEMU's DMA layout (what it
    # has shown earlier), or None: decides replies whose bytes fit both.
    qemu_dma: str | None = None
    # The whole message's length when the capture holds only its start.
    size: int | None = None

    def purpose(self, index: int, text: str) -> None:
        if 0 <= index < len(self.fds):
            self.fd_purposes.setdefault(index, text)


def add_layer(tree: Tree, cls: type[Packet], msg: bytes, offset: int,
              parent: int = -1, compiled: Compiled | None = None) -> tuple[int, dict[str, int]]:
    """Add a layer's fixed fields; decode as many as fit and flag the rest."""
    compiled = compiled or cls.vfu_compiled
    available = len(msg) - offset
    if available >= compiled.size:
        raw_values = compiled.struct.unpack_from(msg, offset)
        length = compiled.size
    else:
        raw_values = _unpack_partial(compiled, msg, offset)
        length = sum(size for _, _, size in compiled.fields[:len(raw_values)])
        tree.expert("malformed.short",
                    f"{cls.vfu_name}: {max(available, 0)} bytes, "
                    f"{compiled.size} expected", offset, max(available, 0))
    values = dict(zip(compiled.names, raw_values))
    node = tree.add_packed(Packed(compiled, raw_values, values), offset, length, parent)
    return node, values


def _unpack_partial(compiled: Any, msg: bytes, offset: int) -> tuple:
    values = []
    for fd, rel, size in compiled.fields:
        if offset + rel + size > len(msg):
            break
        fmt = compiled.struct.format[1:]
        values.append(struct.unpack_from(
            "<" + _member_format(fmt, len(values)), msg, offset + rel)[0])
    return tuple(values)


def _member_format(fmt: str, index: int) -> str:
    """The struct code of member `index` in a compiled format like 'IIQ8s'."""
    members, number = [], ""
    for ch in fmt:
        if ch.isdigit():
            number += ch
        else:
            members.append(number + ch)
            number = ""
    return members[index]


def add_bytes(tree: Tree, name: str, msg: bytes, offset: int, end: int,
              parent: int = -1) -> int:
    return tree.add(name, bytes(msg[offset:end]), offset, max(end - offset, 0), parent)


def expect_end(tree: Tree, msg: bytes, end: int, what: str,
               parent: int = -1) -> None:
    """Flag bytes beyond what the layout accounts for."""
    extra = len(msg) - end
    if extra > 0:
        add_bytes(tree, "vfio_user.trailing", msg, end, len(msg), parent)
        tree.expert("malformed.trailing",
                    f"{what}: {extra} unexpected trailing bytes", end, extra)


def check_reply_argsz(tree: Tree, argsz: int, payload_len: int, what: str) -> None:
    """In a reply, argsz is the size the full payload needs."""
    if argsz > payload_len:
        tree.expert("argsz.truncated",
                    f"{what} reply truncated: argsz asks for {argsz} bytes, "
                    f"{payload_len} sent; the client should retry with a larger buffer")
    elif argsz < payload_len:
        tree.expert("argsz.mismatch",
                    f"{what} reply argsz {argsz} is smaller than its payload ({payload_len})")


def check_request_argsz(tree: Tree, argsz: int, minimum: int, what: str) -> None:
    """In most requests argsz is the largest reply the client accepts."""
    if argsz < minimum:
        tree.expert("argsz.small",
                    f"{what} argsz {argsz} is below the {minimum}-byte reply struct")


def check_zero(tree: Tree, values: dict[str, int], names: tuple[str, ...], what: str) -> None:
    """Fields the spec says must be zero."""
    set_ = [f"{name}={values[name]:#x}" for name in names if values.get(name)]
    if set_:
        tree.expert("field.not_zero", f"{what}: {', '.join(set_)}; the spec says must be zero")


def check_range(tree: Tree, start: int, count: int, bits: int, what: str) -> None:
    """start + count must fit a `bits`-wide field: where it does not, the end
    a receiver computes in that width wraps (to 0 for an end of 2^bits)."""
    if start + count >= 1 << bits:
        tree.expert("range.overflow", f"{what} {start:#x}+{count:#x} does not fit in {bits} "
                    "bits: it wraps")


def fd_text(ctx: Context, index: int = 0) -> str:
    return ctx.fds[index].get("kind", "fd") if index < len(ctx.fds) else "none"



def flag_letters(flags: int, names: dict[str, int]) -> str:
    return "|".join(n.upper() for n, m in names.items() if flags & m) or "0"


def bit_letters(flags: int, letters: str) -> str:
    """One letter per bit from bit 0 up, '-' where it is clear: 'RW-C'."""
    return "".join(c if flags >> bit & 1 else "-" for bit, c in enumerate(letters))


def fitting(tree: Tree, count: int, msg: bytes, offset: int, cls: type[Packet],
            expert_id: str, what: str) -> int:
    """How many of `count` entries of layout `cls` fit from `offset`; the rest
    are flagged with `expert_id`."""
    room = max(len(msg) - offset, 0) // cls.vfu_compiled.size
    if count > room:
        tree.expert(expert_id, f"{what} is {count} but only {room} fit in the message")
    return min(count, room)


# --- the fds a message carries --------------------------------------------------
# What a carrier's fds are for, as its family files it: what a replay makes
# for a recorded request and keeps of a live reply goes by it (replay.py).

DMA_MEMORY = "DMA memory"          # DMA_MAP: the client's memory, or none (messaged DMA)
IRQ_EVENTFDS = "IRQ eventfds"      # interrupts the server signals
TWIN_SOCKET = "twin socket"        # the server's end of the twin socket
REGION_MMAP = "region mmap"        # a region's memory, for the client to map
IOEVENTFDS = "ioeventfds"          # doorbells the client signals

FdRole = str


# --- payloads declared as data -------------------------------------------------------
# What a request or reply carries, declared next to its layer: the Python
# dissector walks it with `walk`, and the generated Lua plugin holds the same
# declarations (MESSAGES, PARTS) for its generic interpreter.  Its checks
# beyond these stay in code, on both sides.

REQUEST, REPLY = "request", "reply"
EXACT = "exact"         # argsz: the layer's size, no more and no less


@dataclass(frozen=True, slots=True)
class Rest:
    """The bytes after the layer, as one BYTES field; `count` names the member
    saying how many there are, and `expert` flags when they differ."""

    field: str
    count: str | None = None
    expert: str = ""


@dataclass(frozen=True, slots=True)
class Array:
    """The layer's `count` member's worth of `layer` entries, as many as fit
    (`expert` flags the rest), under the layer's node or `beside` it."""

    layer: type[Packet]
    count: str
    expert: str
    beside: bool = False


@dataclass(frozen=True, slots=True)
class Payload:
    """A layer and what follows it.  Once the layer is whole: the tail, then
    argsz (REQUEST: at least the layer; REPLY: the payload's size; EXACT),
    the members that must be zero, and the (start, count) members whose end
    must fit in 64 bits.  `ends`: bytes past the tail are trailing."""

    layer: type[Packet] | None          # None: the header alone
    tail: Rest | Array | None = None
    ends: bool = True
    argsz: str | None = None
    zero: tuple[str, ...] = ()
    wraps: tuple[str, str] | None = None
    info: str = ""                      # its summary: a template over the layer's members
    label: str = ""                     # how messages name it; the command's by default
    command: str = ""                   # filed by Dissectors.declare
    kind: str = ""

    def __post_init__(self) -> None:
        """Names the declaration gives must be the layer's members (or the tail's),
        and the summary's formats ones INFO_FORMATS has."""
        parts = info_parts(self.info)
        named = [*self.zero, *(self.wraps or ()), *([self.tail.count] if self.tail else []),
                 *(member for _, member, _ in parts)]
        members = self.layer.vfu_compiled.names if self.layer else ()
        unknown = [name for name in named if name is not None and name not in members]
        if unknown or (self.argsz and "argsz" not in members):
            raise ValueError(f"{self.layer and self.layer.__name__} has no member "
                             f"{', '.join(unknown) or 'argsz'}")
        formats = {form for _, member, form in parts if member is not None} - INFO_FORMATS.keys()
        if formats:
            raise ValueError(f"{self.info!r}: no summary format {', '.join(sorted(formats))}")

    @property
    def what(self) -> str:
        return self.label or f"{self.command} {self.kind}"

    def member(self, name: str) -> FieldDef:
        """The field of the layer's member `name`."""
        compiled = self.layer.vfu_compiled
        return compiled.fields[compiled.names.index(name)][0]


# A summary names a layer member as "{member}" or "{member:format}"; the
# Lua plugin has the same formats (Dissection:info).
INFO_FORMATS: dict[str, Callable[[Any, int], str]] = {
    "": lambda fd, value: str(value),
    "#x": lambda fd, value: f"{value:#x}",
    "region": lambda fd, value: region_name(value),
    "irq": lambda fd, value: irq_name(value),
    "flags": lambda fd, value: flag_letters(value, flag_names(fd)),
}


def flag_names(fd: FieldDef) -> dict[str, int]:
    """A flags word's bits by their short names, as `flag_letters` takes them."""
    return {bit.name.rsplit(".", 1)[1]: bit.mask for bit in fd.children}


@functools.cache
def info_parts(template: str) -> tuple[tuple[str, str | None, str], ...]:
    """A summary template as (text before, member or None, format) parts."""
    return tuple((text, member, form or "")
                 for text, member, form, _ in string.Formatter().parse(template))


def render_info(payload: Payload, values: dict[str, int]) -> str:
    """A whole layer's summary, from its declared template."""
    out = []
    for text, member, form in info_parts(payload.info):
        out.append(text)
        if member is not None:
            out.append(INFO_FORMATS[form](payload.member(member), values[member]))
    return "".join(out)


@dataclass(slots=True)
class Walked:
    """A walked payload: its node, the layer's values, where it ends, whether
    the layer is whole, and each Array entry's values."""

    node: int
    values: dict[str, int]
    end: int
    whole: bool
    entries: list[dict[str, int]]


def walk(tree: Tree, msg: bytes, off: int, payload: Payload, parent: int = -1) -> Walked:
    """Dissect a declared payload at `off`."""
    if payload.layer is None:
        expect_end(tree, msg, off, payload.what, parent)
        return Walked(parent, {}, off, True, [])
    compiled = payload.layer.vfu_compiled
    node, v = add_layer(tree, payload.layer, msg, off, parent)
    out = Walked(node, v, off + compiled.size, len(v) == len(compiled.fields), [])
    if out.whole and isinstance(payload.tail, Rest):
        _walk_rest(tree, msg, out, payload.tail)
    elif out.whole and isinstance(payload.tail, Array):
        _walk_array(tree, msg, out, payload.tail, parent)
    if payload.ends:
        expect_end(tree, msg, out.end, payload.what)
    if out.whole:
        _declared_checks(tree, len(msg) - off, payload, v)
    return out


def _declared_checks(tree: Tree, payload_len: int, payload: Payload, v: dict[str, int]) -> None:
    """A whole layer's argsz, must-be-zero members and start + count."""
    size = payload.layer.vfu_compiled.size
    if payload.argsz == REQUEST:
        check_request_argsz(tree, v["argsz"], size, payload.command)
    elif payload.argsz == REPLY:
        check_reply_argsz(tree, v["argsz"], payload_len, payload.command)
    elif payload.argsz == EXACT and v["argsz"] != size:
        tree.expert("argsz.mismatch", f"{payload.command} argsz {v['argsz']}, the request "
                    f"struct is {size} bytes")
    if payload.zero:
        check_zero(tree, v, payload.zero, payload.what)
    if payload.wraps:
        start, count = payload.wraps
        check_range(tree, v[start], v[count], 64, f"{payload.what} {start}+{count}")


def _walk_rest(tree: Tree, msg: bytes, out: Walked, rest: Rest) -> None:
    add_bytes(tree, rest.field, msg, out.end, len(msg), out.node)
    sent = len(msg) - out.end
    if rest.count is not None and sent != out.values[rest.count]:
        tree.expert(rest.expert, f"count is {out.values[rest.count]} but {sent} data bytes follow")
    out.end = len(msg)


def _walk_array(tree: Tree, msg: bytes, out: Walked, array: Array, parent: int) -> None:
    count = fitting(tree, out.values[array.count], msg, out.end, array.layer, array.expert,
                    array.count)
    for _ in range(count):
        _, entry = add_layer(tree, array.layer, msg, out.end, parent if array.beside else out.node)
        out.entries.append(entry)
        out.end += array.layer.vfu_compiled.size


# --- per-command dissectors ------------------------------------------------------
# Each gets (tree, msg, ctx, off) with off = start of the payload, and returns
# the info string.

Dissector = Callable[[Tree, bytes, Context, int], str]


class Dissectors:
    """One family's request and reply dissectors, by command number, and which
    of its messages may carry fds, as (command, HeaderInfo.kind) -> what the
    fds are for; the package gathers every family's into the tables
    `dissect_message` reads."""

    def __init__(self) -> None:
        self.requests: dict[int, Dissector] = {}
        self.replies: dict[int, Dissector] = {}
        self.fd_carriers: dict[tuple[int, str], FdRole] = {}
        self.payloads: dict[tuple[int, str], Payload] = {}     # by (command, REQUEST or REPLY)
        self.parts: dict[str, Payload] = {}                    # walked inside another, by name

    @classmethod
    def merged(cls, families: Iterable[Dissectors]) -> Dissectors:
        """Every family's dissectors in one table; a command is one family's."""
        out = cls()
        for dissectors in families:
            merge_by_command(out.requests, dissectors.requests)
            merge_by_command(out.replies, dissectors.replies)
            out.fd_carriers |= dissectors.fd_carriers
            merge_by_command(out.payloads, dissectors.payloads)
            out.parts.update(dissectors.parts)
        return out

    def request(self, cmd: str, fds: FdRole | None = None) -> Callable[[Dissector], Dissector]:
        """Files a request dissector; `fds`: what the fds it may carry are for."""
        if fds:
            self.fd_carriers[CMD[cmd], "command"] = fds
        return file_under(self.requests, (cmd,))

    def reply(self, cmd: str, fds: FdRole | None = None) -> Callable[[Dissector], Dissector]:
        """Files a reply dissector; `fds`: what the fds it may carry are for."""
        if fds:
            self.fd_carriers[CMD[cmd], "reply"] = fds
        return file_under(self.replies, (cmd,))

    def declare(self, cmd: str, kind: str, payload: Payload) -> Payload:
        """File what command `cmd`'s request or reply (`kind`) carries, and
        a dissector that walks it and gives its summary, which a request or
        reply dissector filed for the command replaces."""
        filed = replace(payload, command=cmd, kind=kind)
        self.payloads[CMD[cmd], kind] = filed

        def fn(tree: Tree, msg: bytes, ctx: Context, off: int) -> str:
            walked = walk(tree, msg, off, filed)
            return render_info(filed, walked.values) if walked.whole else ""
        (self.requests if kind == REQUEST else self.replies).setdefault(CMD[cmd], fn)
        return filed

    def part(self, name: str, payload: Payload) -> Payload:
        """File a payload that dissectors walk inside another (the Lua plugin's PARTS)."""
        self.parts[name] = payload
        return payload

    def bare(self, cmd: str, kind: str) -> None:
        """A command or reply that has no payload."""
        self.declare(cmd, kind, Payload(None))


def file_under(table: dict[int, Any], names: Iterable[str]) -> Callable[[Any], Any]:
    """A decorator that files a function in `table` under these commands."""
    def wrap(fn: Any) -> Any:
        for name in names:
            table[CMD[name]] = fn
        return fn
    return wrap


def merge_by_command(into: dict[int, Any], table: dict[int, Any]) -> None:
    """Add a family's table to the merged one: a command is one family's."""
    twice = into.keys() & table.keys()
    if twice:
        raise ValueError(f"commands {sorted(twice)} handled by two families")
    into.update(table)
