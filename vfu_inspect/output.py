"""Text and JSON renderings of dissected messages, shared by every view."""

from __future__ import annotations

import sys
from typing import Any, Iterable, TextIO

from .dissectors.vfio_user import SERVER_COMMANDS
from .events import describe_event, event_values
from .fields import BYTES, PROTOCOL
from .packet import Dissected
from .pcapng import fd_comment
from .records import EVENT_NAMES, TWIN, Event
from .tree import Item

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
    for item in p.tree.items:
        _tree_lines(item, 0, lines)
    for e in p.tree.experts:
        lines.append(f"    [Expert Info ({e.severity.capitalize()}/{e.id}): {e.message}]")
    return "\n".join(lines)


def _tree_lines(item: Item, depth: int, out: list[str]) -> None:
    pad = "    " * depth
    if item.field.type == PROTOCOL:
        out.append(f"{pad}{item.heading()}")
    else:
        out.append(f"{pad}{item.field.label}: {item.value_text()}")
    for child in item.children:
        _tree_lines(child, depth + 1, out)


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
    out: dict[str, Any] = {"frame": p.number, "layers": _json_children(p.tree.items)}
    if p.tree.experts:
        out["expert"] = [{"id": e.id, "severity": e.severity, "message": e.message}
                         for e in p.tree.experts]
    return out


def _json_children(items: list[Item]) -> dict[str, Any]:
    grouped: dict[str, list[Any]] = {}
    for item in items:
        for key, value in _json_entries(item):
            grouped.setdefault(key, []).append(value)
    return {k: v[0] if len(v) == 1 else v for k, v in grouped.items()}


def _json_entries(item: Item) -> list[tuple[str, Any]]:
    name = item.field.name
    if item.field.type == PROTOCOL:
        return [(name, _json_children(item.children))]
    entries = [(name, json_value(item))]
    if item.children:
        entries.append((f"{name}_tree", _json_children(item.children)))
    return entries


def json_value(item: Item) -> Any:
    if item.field.type == BYTES:
        return item.value.hex()
    return item.value


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
