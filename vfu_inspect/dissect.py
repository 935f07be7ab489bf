"""From capture records to dissected packets.

Numbers messages as Wireshark numbers frames, computes their times, pairs
each reply with its request, and runs the protocol dissector with that
context.  Every view (read, proxy --print, the TUI) goes through `Analyzer`.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterable, Iterator

from .dissectors import vfio_user as proto
from .fields import FLOAT, FRAME, PROTOCOL, FieldDef, Fields
from .packet import Dissected
from .records import CHANNELS, CLOSE, DIRECTIONS, FAULT, Event, Message, Record
from .session import SessionTracker, Snapshot
from .tree import Item

FIELDS = Fields()
FRAME_FIELD = FIELDS.field("frame", "Frame", PROTOCOL)
FRAME_NUMBER = FIELDS.field("frame.number", "Frame number", FRAME)
FRAME_EPOCH = FIELDS.field("frame.time_epoch", "Epoch time (s)", FLOAT)
FRAME_RELATIVE = FIELDS.field("frame.time_relative", "Time since first message (s)", FLOAT)
FRAME_DELTA = FIELDS.field("frame.time_delta", "Time since previous message (s)", FLOAT)
FRAME_CONN = FIELDS.field("frame.conn", "Connection")
FRAME_CHANNEL = FIELDS.field("frame.channel", "Channel", values=CHANNELS)
FRAME_DIR = FIELDS.field("frame.dir", "Direction", values=DIRECTIONS)
FRAME_LEN = FIELDS.field("frame.len", "Message length")
FRAME_FDS = FIELDS.field("frame.fds", "Passed fds")
FRAME_TRUNCATED = FIELDS.field("frame.truncated", "Bytes captured (message truncated)")

HEADER_ROW = 0         # the header layer is the first thing every dissection adds
# Requests awaiting a reply, per key; beyond this the oldest are dropped so
# that a peer that never answers cannot grow memory without bound.
MAX_PENDING_PER_KEY = 4096


class Matcher:
    """Pairs replies with requests by (connection, channel, direction, msg_id).

    msg_id alone is not enough: both peers send commands, and ids may be reused
    while in flight, so each key holds a FIFO of outstanding requests.  The
    usual key has one: it holds that request itself, and a deque only once a
    second one shares its id (a deque for every request costs the relay).
    """

    def __init__(self) -> None:
        self._pending: dict[tuple[int, int, int, int], tuple[int, Any] | deque] = {}

    def request(self, conn: int, channel: int, direction: int, msg_id: int, number: int,
                payload: Any) -> None:
        """A command sent in `direction` that expects a reply."""
        key = (conn, channel, direction, msg_id)
        held = self._pending.get(key)
        if held is None:
            self._pending[key] = (number, payload)
        elif type(held) is tuple:
            self._pending[key] = deque((held, (number, payload)), maxlen=MAX_PENDING_PER_KEY)
        else:
            held.append((number, payload))

    def reply(self, conn: int, channel: int, direction: int, msg_id: int
              ) -> tuple[int, Any] | None:
        """The oldest request answered by a reply sent in `direction`."""
        key = (conn, channel, 1 - direction, msg_id)
        held = self._pending.get(key)
        if held is None:
            return None
        if type(held) is tuple:
            del self._pending[key]
            return held
        entry = held.popleft()
        if not held:
            del self._pending[key]
        return entry

    def waiting(self, conn: int, channel: int, direction: int, msg_id: int) -> bool:
        """Whether a request sent in `direction` with `msg_id` awaits its reply."""
        return (conn, channel, direction, msg_id) in self._pending

    def outstanding(self) -> list[Any]:
        """Payloads of the requests still unanswered, oldest first."""
        entries = sorted((n, i, payload) for i, held in enumerate(self._pending.values())
                         for n, payload in ([held] if type(held) is tuple else held))
        return [payload for _, _, payload in entries]


def expects_reply(header: proto.HeaderInfo) -> bool:
    return header.type == proto.TYPE_COMMAND and not header.no_reply


def find_responses(records: Iterable[Record]) -> dict[int, int]:
    """First pass: request number -> reply number, from headers only."""
    matcher, links, number = Matcher(), {}, 0
    for record in records:
        if not isinstance(record, Message):
            continue
        number += 1
        header = proto.parse_header(record.data)
        if header is None:
            continue
        if header.is_reply:
            hit = matcher.reply(record.conn, record.channel, record.direction, header.msg_id)
            if hit:
                links[hit[0]] = number
        elif expects_reply(header):
            matcher.request(record.conn, record.channel, record.direction, header.msg_id,
                            number, None)
    return links


class Analyzer:
    """Dissects messages in capture order, carrying what links them."""

    def __init__(self, responses: dict[int, int] | None = None,
                 sessions: SessionTracker | None = None) -> None:
        self.responses = responses
        self.sessions = sessions if sessions is not None else SessionTracker()
        self.number = 0
        self._first_ts: int | None = None
        self._prev_ts: int | None = None
        self._faults: list[Event] = []     # each for the next message of its stream

    def resume_at(self, number: int, first_ts: int, prev_ts: int) -> None:
        """Go on as if messages up to `number` had been fed (times need the
        capture's first timestamp and that of message `number`)."""
        self.number, self._first_ts, self._prev_ts = number, first_ts, prev_ts

    def feed(self, msg: Message) -> Dissected:
        self.number += 1
        if self._first_ts is None:
            self._first_ts = self._prev_ts = msg.ts_ns
        rel = (msg.ts_ns - self._first_ts) / 1e9
        delta = (msg.ts_ns - self._prev_ts) / 1e9
        self._prev_ts = msg.ts_ns
        header = proto.parse_header(msg.data)
        request = self.sessions.pair(self.number, msg, header)
        ctx = proto.Context(DIRECTIONS[msg.direction], msg.fds,
                            request.data if request else None,
                            qemu_dma=self.sessions.qemu_dma(msg.conn), size=msg.size)
        tree, _ = proto.dissect_message(msg.data, ctx, header)
        packet = Dissected(self.number, msg, header, tree, rel, delta)
        if request:
            packet.request_in = request.number
            packet.latency = (msg.ts_ns - request.ts_ns) / 1e9
        elif header is not None and expects_reply(header) and self.responses is not None:
            packet.response_in = self.responses.get(self.number)
            if packet.response_in is None:
                tree.expert("request.unanswered", "no reply in this capture")
        self.sessions.feed(packet, request)
        self._add_frame_items(packet)
        if self._faults:
            self._add_faults(packet)
        return packet

    def run(self, records: Iterable[Record], events: bool = False
            ) -> Iterator[Dissected | Event]:
        """Dissected messages, and with `events` the connection events too."""
        for record in records:
            if isinstance(record, Message):
                yield self.feed(record)
                continue
            self.event(record)
            if events:
                yield record

    def event(self, event: Event) -> None:
        """Take in what an event changes for the messages after it."""
        if event.kind == CLOSE:
            self.sessions.close(event.conn)
        elif event.kind == FAULT:
            self._faults.append(event)

    def _add_faults(self, p: Dissected) -> None:
        """A fault record comes just before the message it acted on."""
        msg = p.msg
        for event in self._faults:
            info = event.info
            if (event.conn, info.get("channel"), info.get("dir")) == (
                    msg.conn, CHANNELS[msg.channel], DIRECTIONS[msg.direction]):
                self._faults.remove(event)
                p.tree.expert("fault.injected", f"{info.get('effect')} [{info.get('rule')}]")
                return

    @staticmethod
    def _add_frame_items(p: Dissected) -> None:
        tree, msg = p.tree, p.msg
        tree.leading.append(FrameItem(p.number, msg, p.time_relative, p.time_delta))
        if msg.size is not None:
            tree.expert("capture.truncated",
                        f"only {len(msg.data)} of {msg.size} bytes were captured")
        links = HEADER_ROW
        if p.request_in is not None:
            tree.add("vfio_user.response_to", p.request_in, parent=links)
            tree.add("vfio_user.time", p.latency, parent=links)
        if p.response_in is not None:
            tree.add("vfio_user.response_in", p.response_in, parent=links)


class FrameItem(Item):
    """The frame node, first as in Wireshark; its text and fields are built
    only when a view asks.  It holds the message, not the packet: a packet
    whose tree held it back would be a cycle, which only the garbage
    collector frees (that cost `read` a third of its time)."""

    __slots__ = ("number", "msg", "relative", "delta")
    field_names = frozenset(fd.name for fd in FIELDS)

    def __init__(self, number: int, msg: Message, relative: float, delta: float) -> None:
        super().__init__(FRAME_FIELD, None)
        self.number, self.msg, self.relative, self.delta = number, msg, relative, delta

    def heading(self) -> str:
        msg = self.msg
        return f"Frame {self.number}: {msg.wire_size} bytes, {len(msg.fds)} fds"

    def child_values(self) -> list[tuple[FieldDef, Any]]:
        msg = self.msg
        values = [(FRAME_NUMBER, self.number), (FRAME_EPOCH, msg.ts_ns / 1e9),
                  (FRAME_RELATIVE, self.relative), (FRAME_DELTA, self.delta),
                  (FRAME_CONN, msg.conn), (FRAME_CHANNEL, msg.channel),
                  (FRAME_DIR, msg.direction), (FRAME_LEN, msg.wire_size),
                  (FRAME_FDS, len(msg.fds))]
        if msg.size is not None:
            values.append((FRAME_TRUNCATED, len(msg.data)))
        return values

    def _build_children(self) -> list[Item]:
        return [Item(fd, value) for fd, value in self.child_values()]


def state_at(sessions: SessionTracker, number: int,
             replay: Callable[[int, int], Iterable[Message]]) -> Snapshot:
    """The session state after message `number`; `replay(first, last)` yields
    the messages numbered first..last, from which the nearest checkpoint rolls forward."""
    start, tracker = sessions.nearest_checkpoint(number)
    analyzer = Analyzer(sessions=tracker)
    analyzer.number = start
    last = None
    for msg in replay(start + 1, number):
        last = analyzer.feed(msg)
    return Snapshot(number, tracker.conns, last.msg.ts_ns if last else None)
