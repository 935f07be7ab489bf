"""Records that are not messages but things the proxy saw or did: interrupts
and doorbells (`proxy --trace-irqs`), injected faults (`proxy --fault`).

Their fields are filter fields, so that `read -Y 'irq.vector == 2'` selects
them as it selects messages; `describe` gives their `read --events` line.
"""

from __future__ import annotations

from typing import Any

from .dissectors import vfio_user as proto
from .fields import BOOL, PROTOCOL, STRING, Fields, lookup
from .records import CLOSE, DOORBELL, EVENT_NAMES, FAULT, IRQ, Event

FIELDS = Fields()
FIELDS.field("irq", "Interrupt (the server signalled a SET_IRQS eventfd)", PROTOCOL)
FIELDS.field("irq.index", "IRQ index", values=proto.IRQS)
FIELDS.field("irq.vector", "Vector")
FIELDS.field("irq.count", "Signals (eventfd counter)")
FIELDS.field("irq.masked", "Raised while masked", BOOL)
FIELDS.field("doorbell", "Doorbell (the client signalled a REGION_IO_FDS eventfd)", PROTOCOL)
FIELDS.field("doorbell.region", "Region", values=proto.REGIONS)
FIELDS.field("doorbell.offset", "Offset", base="hex")
FIELDS.field("doorbell.size", "Size")
FIELDS.field("doorbell.datamatch", "Datamatch", base="hex")
FIELDS.field("doorbell.count", "Signals (eventfd counter)")
FIELDS.field("fault", "Fault injected by the proxy", PROTOCOL)
FIELDS.field("fault.action", "Action", STRING)
FIELDS.field("fault.rule", "Rule", STRING)
FIELDS.field("fault.errno", "Errno", values=proto.ERRNO_NAMES)

PREFIXES = {IRQ: "irq", DOORBELL: "doorbell", FAULT: "fault"}


def event_values(event: Event) -> dict[str, list[Any]] | None:
    """The filter values of an interrupt, doorbell or fault; None for other events."""
    prefix = PREFIXES.get(event.kind)
    if prefix is None:
        return None
    values: dict[str, list[Any]] = {prefix: [None], "frame.conn": [event.conn]}
    for key, value in event.info.items():
        name = f"{prefix}.{key}"
        if value is not None and lookup(name) is not None:
            values[name] = [value]
    return values


def names_events(fields: frozenset[str]) -> bool:
    """Whether a filter tests interrupt, doorbell or fault fields."""
    return any(name.split(".")[0] in PREFIXES.values() for name in fields)


def describe_event(event: Event) -> str:
    """The `read --events` line of any event."""
    if event.kind in (IRQ, DOORBELL, FAULT):
        return f"# conn {event.conn} {EVENT_NAMES[event.kind]}: {describe(event)}"
    info = event.info
    text = info.get("text") or info.get("reason") or info.get("server", "")
    line = f"# conn {event.conn} {EVENT_NAMES[event.kind]}: {text}"
    if event.kind == CLOSE and info.get("unanswered"):
        pending = ", ".join(f"{u['cmd']} id {u['msg_id']:#x}" for u in info["unanswered"])
        line += f" (unanswered: {pending})"
    return line


def describe(event: Event) -> str:
    info = event.info
    if event.kind == IRQ:
        return (f"{irq_name(info.get('index'))} vector {info.get('vector')}, count "
                f"{info.get('count')}" + (", while masked" if info.get("masked") else ""))
    if event.kind == DOORBELL:
        match = info.get("datamatch")
        return (f"{proto.region_name(info.get('region', -1))} offset {info.get('offset', 0):#x} "
                f"size {info.get('size')}" + (f" datamatch {match:#x}" if match is not None else "")
                + f", count {info.get('count')}")
    return f"{info.get('effect', info.get('action'))} [{info.get('rule')}]"


def irq_name(index: Any) -> str:
    return proto.IRQS.get(index, f"IRQ index {index}")
