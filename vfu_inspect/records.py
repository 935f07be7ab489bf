"""What the proxy records: vfio-user messages and the events around them.

Capture files, pcapng files, live streams and every view share these types;
each record kind's number is its first element on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

# Record types: the first element of each record array.
MSG, OPEN, CLOSE, NOTE, IRQ, DOORBELL, FAULT, BURST = 0, 1, 2, 3, 4, 5, 6, 7
EVENT_NAMES = {OPEN: "open", CLOSE: "close", NOTE: "note", IRQ: "irq",
               DOORBELL: "doorbell", FAULT: "fault"}
C2S, S2C = 0, 1
DIRECTIONS = {C2S: "c2s", S2C: "s2c"}
DIRECTION_NUMBERS = {name: number for number, name in DIRECTIONS.items()}
MAIN, TWIN = 0, 1
CHANNELS = {MAIN: "main", TWIN: "twin"}
CHANNEL_NUMBERS = {name: number for number, name in CHANNELS.items()}
FD_KINDS = ("memfd", "file", "eventfd", "socket", "other")


@dataclass(slots=True)
class Message:
    """One vfio-user message as it crossed a socket."""

    ts_ns: int
    conn: int
    channel: int            # MAIN or TWIN
    direction: int          # C2S or S2C
    data: bytes
    fds: list[dict[str, Any]] = field(default_factory=list)   # kind, size, inode
    size: int | None = None   # on-wire size when `data` holds only its start

    @property
    def wire_size(self) -> int:
        return self.size if self.size is not None else len(self.data)

    def to_record(self) -> list[Any]:
        record = [MSG, self.ts_ns, self.conn, self.channel, self.direction,
                  self.data, self.fds]
        if self.size is not None:
            record.append(self.size)
        return record


@dataclass(slots=True)
class Event:
    """A connection opened or closed, a free-text note, an interrupt or
    doorbell signal (proxy --trace-irqs) or an injected fault (proxy --fault)."""

    kind: int               # OPEN, CLOSE, NOTE, IRQ, DOORBELL or FAULT
    ts_ns: int
    conn: int
    info: dict[str, Any]

    def to_record(self) -> list[Any]:
        return [self.kind, self.ts_ns, self.conn, self.info]


@dataclass(slots=True)
class Burst:
    """The messages one read brought, whole and back to back, without fds.

    The relay records them as one record, so that it packs and writes once
    per read however many messages a pipelining peer sends at once; readers
    give them back one by one (`messages`), as if each had its own record.
    """

    ts_ns: int
    conn: int
    channel: int
    direction: int
    data: bytes
    sizes: list[int]            # of each message, in order: they add up to len(data)

    def messages(self, kind: type[Message] = Message) -> Iterator[Message]:
        start = 0
        for size in self.sizes:
            yield kind(self.ts_ns, self.conn, self.channel, self.direction,
                       self.data[start:start + size])
            start += size

    def to_record(self) -> list[Any]:
        return [BURST, self.ts_ns, self.conn, self.channel, self.direction, self.data,
                self.sizes]


Record = Message | Event


def unbundle(record: Record | Burst | None) -> Iterable[Record | None]:
    """A burst as its messages, one by one; any other record (or None) as itself."""
    return record.messages() if record.__class__ is Burst else (record,)
