"""The typed events the proxy core emits to its addons.

Each event names the addon hook it goes to (`hook`), as mitmproxy names its
hooks by event, and converts to the capture record it is saved as
(`record()`), without loss: a capture holds exactly what the addons were told,
and `from_record` gives the event back (an addon in a process of its own gets
its events as records).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator

from .records import (CHANNEL_NUMBERS, CHANNELS, CLOSE, DIRECTION_NUMBERS, DIRECTIONS, DOORBELL,
                      FAULT, IRQ, NOTE, OPEN, Burst, Event, Message, Record)

if TYPE_CHECKING:
    from .packet import Dissected


class MessageRelayed(Message):
    """A whole message that crossed the proxy: its connection, channel,
    direction, bytes, the fds that came with it (kind, size, inode), time, and
    on-wire size when only its start was kept.  It is the capture record
    itself, so that the relay builds one object per message."""

    __slots__ = ()
    hook: ClassVar[str] = "message"

    def record(self) -> Record:
        return self


class BurstRelayed(Burst):
    """Whole messages without fds that one read brought and the proxy relayed
    as they came: what a pipelining peer sends at once, as one event (and one
    record), so that the relay's work is per read rather than per message.
    An addon with a `message` hook and no `burst` hook gets them one by one."""

    __slots__ = ()
    hook: ClassVar[str] = "burst"

    def record(self) -> Burst:
        return self

    def relayed(self) -> Iterator[MessageRelayed]:
        return self.messages(MessageRelayed)


@dataclass(slots=True)
class ConnectionOpened:
    ts_ns: int
    conn: int
    server: str
    trace_irqs: bool = False              # --trace-irqs: the proxy relays the eventfds
    faults: list[str] | None = None       # --fault: the rules' texts
    hook: ClassVar[str] = "connection_opened"

    def record(self) -> Record:
        info: dict[str, Any] = {"server": self.server}
        if self.trace_irqs:
            info["trace_irqs"] = True
        if self.faults is not None:
            info["faults"] = self.faults
        return Event(OPEN, self.ts_ns, self.conn, info)

    @classmethod
    def from_record(cls, record: Event) -> ConnectionOpened:
        info = record.info
        return cls(record.ts_ns, record.conn, info["server"], info.get("trace_irqs", False),
                   info.get("faults"))


@dataclass(slots=True)
class ConnectionClosed:
    ts_ns: int
    conn: int
    by: str                       # "client", "server" or "proxy"
    reason: str
    unanswered: list[dict[str, Any]] = field(default_factory=list)   # requests, oldest first
    hook: ClassVar[str] = "connection_closed"

    def record(self) -> Record:
        return Event(CLOSE, self.ts_ns, self.conn,
                     {"by": self.by, "reason": self.reason, "unanswered": self.unanswered})

    @classmethod
    def from_record(cls, record: Event) -> ConnectionClosed:
        info = record.info
        return cls(record.ts_ns, record.conn, info["by"], info["reason"], info["unanswered"])


@dataclass(slots=True)
class Note:
    """Something the proxy says about a connection (conn -1: about none), or
    about one stream of it when it has a channel and direction."""

    ts_ns: int
    conn: int
    text: str
    channel: int | None = None
    direction: int | None = None
    hook: ClassVar[str] = "note"

    def record(self) -> Record:
        info: dict[str, Any] = {"text": self.text}
        if self.channel is not None:
            info["channel"] = CHANNELS[self.channel]
            info["dir"] = DIRECTIONS[self.direction]
        return Event(NOTE, self.ts_ns, self.conn, info)

    @classmethod
    def from_record(cls, record: Event) -> Note:
        info = record.info
        if "channel" not in info:
            return cls(record.ts_ns, record.conn, info["text"])
        return cls(record.ts_ns, record.conn, info["text"], CHANNEL_NUMBERS[info["channel"]],
                   DIRECTION_NUMBERS[info["dir"]])


@dataclass(slots=True)
class _Signal:
    """An event whose info map holds the filter fields events.py declares."""

    ts_ns: int
    conn: int
    info: dict[str, Any]
    kind: ClassVar[int]

    def record(self) -> Record:
        return Event(self.kind, self.ts_ns, self.conn, self.info)

    @classmethod
    def from_record(cls, record: Event) -> _Signal:
        return cls(record.ts_ns, record.conn, record.info)


class Interrupt(_Signal):
    """The server signalled an interrupt eventfd (--trace-irqs): irq.* fields."""

    __slots__ = ()
    kind, hook = IRQ, "interrupt"


class Doorbell(_Signal):
    """The client signalled a doorbell eventfd (--trace-irqs): doorbell.* fields."""

    __slots__ = ()
    kind, hook = DOORBELL, "doorbell"


class FaultInjected(_Signal):
    """A --fault rule acted on the message recorded next in its stream: fault.* fields."""

    __slots__ = ()
    kind, hook = FAULT, "fault"


@dataclass(slots=True)
class MessageDissected:
    """A relayed message as the Analyzer decoded it, for the addons that ask
    (`wants_dissection`); they get it instead of MessageRelayed."""

    packet: Dissected
    hook: ClassVar[str] = "message_dissected"

    def record(self) -> Record:
        return self.packet.msg


ProxyEvent = (MessageRelayed | BurstRelayed | ConnectionOpened | ConnectionClosed | Note
              | Interrupt | Doorbell | FaultInjected)
PROXY_EVENTS = (MessageRelayed, BurstRelayed, ConnectionOpened, ConnectionClosed, Note, Interrupt,
                Doorbell, FaultInjected)
_EVENT_KINDS = {OPEN: ConnectionOpened, CLOSE: ConnectionClosed, NOTE: Note, IRQ: Interrupt,
                DOORBELL: Doorbell, FAULT: FaultInjected}


def event_from_record(record: Event) -> ProxyEvent:
    """The event whose `record()` this is."""
    return _EVENT_KINDS[record.kind].from_record(record)


def hooks(addon: Any) -> dict[type, Callable[[Any], None]]:
    """The method of `addon` each event type goes to: the one its `hook`
    names, else the addon's `event` (for every event it has no hook for); a
    burst goes message by message to a `message` hook when there is no `burst`."""
    fallback = getattr(addon, "event", None)
    found = {cls: getattr(addon, cls.hook, fallback)
             for cls in (*PROXY_EVENTS, MessageDissected)}
    message = getattr(addon, MessageRelayed.hook, None)
    if message is not None and not hasattr(addon, BurstRelayed.hook):
        def one_by_one(burst: BurstRelayed) -> None:
            for each in burst.relayed():
                message(each)
        found[BurstRelayed] = one_by_one
    return {cls: hook for cls, hook in found.items() if hook is not None}
