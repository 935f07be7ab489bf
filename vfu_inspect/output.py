"""Text and JSON renderings of dissected messages, shared by every view."""

from __future__ import annotations

import sys
from typing import Any, Iterable, TextIO

from .dissectors.vfio_user import SERVER_COMMANDS
from .events import describe_event, event_values
from .fields import BYTES, PROTOCOL, FieldDef
from .packet import Dissected
from .pcapng import fd_comment
from .records import EVENT_NAMES, TWIN, Event
from .tree import FlagsMemo, Packed, Tree, bit_values, field_line, format_value

SUMMARY_HEADER = (f"{'No.':>7} {'Time':>11} {'Delta':>9} {'Conn':>6} {'Dir':3} "
                  f"{'Msg-ID':>6} {'Command':<24} {'Type':<7} {'Len':>6} {'Fds':>3}  Info")
ARROWS = {"c2s": "C→S", "s2c": "C←S"}
COLORS = {"error": "\x1b[31m", "warning": "\x1b[33m", "note": "\x1b[36m",
          "error_reply": "\x1b[31m", "reply": "\x1b[2m", "server": "\x1b[35m"}
RESET = "\x1b[0m"


def use_color(choice: str, out: TextIO = sys.stdout) -> bool:
    """--color always, never or auto (colour when `out` is a terminal)."""
    return choice == "always" or (choice == "auto" and out.isatty())


def summary_line(p: Dissected, color: bool = False) -> str:
    line = f"{p.number:>7} {p.time_relative:>11.6f} {p.time_delta:>9.6f} {summary_columns(p)}"
    kind = row_kind(p)
    return COLORS[kind] + line + RESET if color and kind in COLORS else line


def summary_columns(p: Dissected) -> str:
    """The columns after the number and the time, as `read` and the TUI show them."""
    h = p.header
    conn = f"{p.msg.conn}" + (":twin" if p.msg.channel == TWIN else "")
    msg_id = f"{h.msg_id:#06x}" if h else "-"
    return (f"{conn:>6} {ARROWS[p.direction]:3} {msg_id:>6} "
            f"{h.command_name if h else '?':<24} {h.kind if h else 'short':<7} "
            f"{p.msg.wire_size:>6} {len(p.msg.fds):>3}  {summary_info(p)}")


def summary_info(p: Dissected) -> str:
    """The Info column: what the dissector says, the reply's latency, the expert items."""
    info = p.tree.info
    if p.latency is not None:
        info = f"{info} [{p.latency * 1e6:.0f} µs]".lstrip()
    experts = p.tree.experts
    if experts:
        what = experts[0].message if len(experts) == 1 else f"{len(experts)} items"
        info += f"  [{p.tree.worst_severity}: {what}]"
    return info


def row_kind(p: Dissected) -> str:
    """What a row is shown as: its worst expert item's severity, an error
    reply, a server command, a note, a reply, or normal."""
    h, worst = p.header, p.tree.worst_severity
    if worst in ("error", "warning"):
        return worst
    if h is not None and h.kind == "error":
        return "error_reply"
    if h is not None and not h.is_reply and h.cmd in SERVER_COMMANDS:
        return "server"
    if worst:
        return worst
    return "reply" if h is not None and h.is_reply else "normal"


def detail_text(p: Dissected) -> str:
    """The detail tree, as tshark -V prints it."""
    lines: list[str] = []
    tree = p.tree
    for item in tree.leading:
        lines.append(item.heading())
        for fd, value in item.child_values():
            _field_lines(lines, "    ", fd, value)
    top, kids = tree.outline()
    for row in top:
        _row_lines(lines, tree, kids, row, "")
    for e in tree.experts:
        lines.append(f"    [Expert Info ({e.severity.capitalize()}/{e.id}): {e.message}]")
    return "\n".join(lines)


def _row_lines(lines: list[str], tree: Tree, kids: list[list[int]], row: int, pad: str) -> None:
    """A row's lines and its children's.  A function of its own, not a
    closure: a recursive closure is a cycle, and keeps the tree for the collector."""
    fd, value, _, _, _ = tree.rows[row]
    text = tree.texts.get(row)
    inner = pad + "    "
    if fd.type == PROTOCOL:
        lines.append(f"{pad}{text or fd.label}")
    else:
        _field_lines(lines, pad, fd, value, text)
    if type(value) is Packed:
        for member, member_value in zip(value.compiled.fields, value.raw):
            _field_lines(lines, inner, member[0], member_value)
    for child in kids[row]:
        _row_lines(lines, tree, kids, child, inner)


# A flags word's bits, as -V lines and as JSON.
_BITS = FlagsMemo(lambda fd, value: (
    [f"{sub.label}: {format_value(sub, bit)}" for sub, bit in bit_values(fd, value)],
    {sub.name: bit for sub, bit in bit_values(fd, value)}))


def _field_lines(lines: list[str], pad: str, fd: FieldDef, value: Any,
                 text: str | None = None) -> None:
    """A field's line and, for a flags word, its bits' lines below it."""
    lines.append(pad + field_line(fd, value, text))
    if fd.children:
        lines.extend(f"{pad}    {line}" for line in _BITS.get(fd, value)[0])


HEX_WIDTH = 16


def hex_dump(data: bytes, width: int = HEX_WIDTH) -> str:
    return "\n".join(f"{off:04x}  {' '.join(cells):<{width * 3 - 1}}  {''.join(chars)}"
                     for off, cells, chars in hex_rows(data, width))


def hex_rows(data: bytes, width: int = HEX_WIDTH) -> list[tuple[int, list[str], list[str]]]:
    """(offset, hex cell of each byte, printable char of each byte) per line."""
    return [(off, [f"{b:02x}" for b in data[off:off + width]],
             [chr(b) if 32 <= b < 127 else "." for b in data[off:off + width]])
            for off in range(0, len(data), width)]


def json_packet(p: Dissected) -> dict[str, Any]:
    """Every field, nested as the tree is; repeated fields become lists."""
    out: dict[str, Any] = {"frame": p.number, "layers": _json_layers(p.tree)}
    if p.tree.experts:
        out["expert"] = [{"id": e.id, "severity": e.severity, "message": e.message}
                         for e in p.tree.experts]
    return out


def _json_layers(tree: Tree) -> dict[str, Any]:
    """The fields grouped by name under their parents, from the tree's rows
    (a layer's members, a flags word's bits) without building its Items."""
    top: dict[str, Any] = {}
    repeats: set[tuple[int, str]] = set()       # (group, key) whose value lists the repeats

    def put(group: dict[str, Any], key: str, value: Any) -> None:
        if key not in group:
            group[key] = value
        elif (id(group), key) in repeats:
            group[key].append(value)
        else:
            group[key] = [group[key], value]
            repeats.add((id(group), key))

    for item in tree.leading:
        group = _json_fields(item.child_values())
        put(top, item.field.name, group)
    parents = {row[4] for row in tree.rows}
    under: list[dict[str, Any] | None] = []       # by row: where its children go
    for row, (fd, value, _, _, parent) in enumerate(tree.rows):
        into = top if parent < 0 else under[parent]
        group = None
        if fd.type == PROTOCOL:
            group = _json_fields((m[0], v) for m, v in zip(value.compiled.fields, value.raw)) \
                if type(value) is Packed else {}
            put(into, fd.name, group)
        else:
            put(into, fd.name, value.hex() if fd.type == BYTES else value)
            bits = _json_bits(fd, value)
            if row in parents:
                group = dict(bits)
                put(into, f"{fd.name}_tree", group)
            elif bits:
                put(into, f"{fd.name}_tree", bits)
        under.append(group)
    return top


def _json_fields(values: Iterable[tuple[FieldDef, Any]]) -> dict[str, Any]:
    """A node's fields (names distinct, as a layer's members are) and their bits."""
    out: dict[str, Any] = {}
    for fd, value in values:
        out[fd.name] = value.hex() if fd.type == BYTES else value
        if fd.children:
            bits = _json_bits(fd, value)
            if bits:
                out[f"{fd.name}_tree"] = bits
    return out


def _json_bits(fd: FieldDef, value: Any) -> dict[str, Any]:
    return _BITS.get(fd, value)[1] if fd.children else {}


def json_event(event: Event) -> dict[str, Any]:
    """An event as -T json gives it: its filter fields where it has them
    (interrupts, doorbells, faults), what it records, and its `read --events` line."""
    return {"event": EVENT_NAMES[event.kind], "conn": event.conn, "ts_ns": event.ts_ns,
            "layers": _json_values(event_values(event) or {}),
            "info": {k: v.hex() if isinstance(v, bytes) else v for k, v in event.info.items()},
            "text": describe_event(event)}


def _json_values(values: dict[str, list[Any]]) -> dict[str, Any]:
    """Grouped by protocol as a message's layers are: {"irq": {"irq.vector": 2, …}}."""
    layers: dict[str, dict[str, Any]] = {}
    for name, v in values.items():
        if "." in name:
            layers.setdefault(name.split(".")[0], {})[name] = v[0] if len(v) == 1 else v
    return layers


def filter_values(p: Dissected | Event) -> dict[str, list[Any]]:
    """What a display filter or -T fields sees of a message or an event."""
    return event_values(p) or {} if isinstance(p, Event) else p.tree.values()


def field_values(p: Dissected | Event, names: Iterable[str],
                 values: dict[str, list] | None = None) -> list[str]:
    """The values of the named fields, for -T fields (repeats joined by ',')."""
    values = values if values is not None else filter_values(p)
    return [",".join(_plain(v) for v in values.get(name, [])) for name in names]


def _plain(value: Any) -> str:
    if isinstance(value, bytes):
        return value.hex()
    if value is None:
        return ""
    return str(value)


def packet_comment(p: Dissected) -> str:
    """A pcapng comment: the fds with what the message made of them, and expert items."""
    purposes = {fd["index"]: fd["purpose"] for fd in p.tree.children_of("fd") if "purpose" in fd}
    experts = [(e.severity, e.id, e.message) for e in p.tree.experts]
    return fd_comment(p.msg.fds, purposes, experts)
