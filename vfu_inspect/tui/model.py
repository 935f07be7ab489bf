"""What the TUI shows, kept small enough for a million messages.

One background pass reads the capture (or the live stream) once: it records
where each message starts in the file, the few header facts the filter fast
path needs, and what the analysis found (expert ids, request/reply links,
statistics, session checkpoints).  Messages are read back and dissected
only when they are on screen, from the nearest session checkpoint, so the
detail of any message shows the same stateful expert items as `read`.

Filters take the cheapest exact path: header fields, links and expert ids from
the index alone; fields a message's own bytes give by dissecting, without session
state, only the messages whose command can carry them; anything else (expert
messages, device layers, times) by a full analysis pass.  A filter is live:
as messages arrive it goes on with them, and re-decides the earlier requests
their replies answer (a reply changes its request's links and expert items).
"""

from __future__ import annotations

import bisect
import os
import statistics
import threading
import time
from array import array
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Callable, Iterator

from ..capture import CaptureReader, records_at, records_from
from ..dfilter import DisplayFilter
from ..dissect import Analyzer, expects_reply, state_at
from ..dissectors import vfio_user as proto
from ..fields import EXPERTS
from ..packet import Dissected
from ..records import DIRECTIONS, OPEN, Event, Message, Record, unbundle
from ..session import SessionTracker, Snapshot
from ..stats import ExpertStats
from ..tree import EXPERT_FIELDS, bit_values

CHECKPOINT_EVERY = 1024
CACHE_PACKETS = 4096
# Fields the filter can test from the index alone, without dissecting.
HEADER_FIELDS = {"frame.number", "frame.conn", "frame.channel", "frame.dir", "frame.len",
                 "frame.fds", "vfio_user", "vfio_user.msg_id", "vfio_user.cmd",
                 "vfio_user.size", "vfio_user.flags", "vfio_user.flags.type",
                 "vfio_user.flags.no_reply", "vfio_user.flags.error", "vfio_user.error",
                 "vfio_user.reserved", "vfio_user.response_in", "vfio_user.response_to",
                 "vfio_user.time", "expert", "expert.id", "expert.severity"}
LINK_FIELDS = {"vfio_user.response_in", "vfio_user.response_to", "vfio_user.time"}
# Fields dissection without session state gives exactly (the fds' items too).
STATELESS_FIELDS = HEADER_FIELDS | {fd.name for fd in proto.protocol_fields()} | {
    "fd", "fd.index", "fd.kind", "fd.size", "fd.inode", "fd.purpose"}
FLAGS_FIELD = proto.FIELDS["vfio_user.flags"]
TRUNCATED_AFTER = 1.0      # seconds a partial record may wait at the end of a file
GROWING_FOR = 5.0          # seconds after the last growth the file counts as followed
FIRST_SCREEN_WAIT = 1.0    # seconds the pass may wait for the first screen to be painted


@dataclass
class Conversation:
    """One connection: what Wireshark's Conversations table shows of it."""

    endpoints: str = ""
    first_ns: int = 0
    last_ns: int = 0
    first: int = 0          # its first message's number
    messages: int = 0
    bytes: int = 0
    errors: int = 0         # error replies
    problems: int = 0       # messages with an error or warning expert item

    def add(self, p: Dissected) -> None:
        if not self.messages:
            self.first_ns, self.first = p.msg.ts_ns, p.number
        self.last_ns = p.msg.ts_ns
        self.messages += 1
        self.bytes += p.msg.wire_size
        self.errors += p.header is not None and p.header.kind == "error"
        self.problems += p.tree.worst_severity in ("error", "warning")


@dataclass
class LiveFilter:
    """A display filter and the messages it selects among 1..`upto`."""

    text: str
    display: DisplayFilter
    matches: array = field(default_factory=lambda: array("i"))
    upto: int = 0


class Cancelled(Exception):
    """The worker running a filter was told to stop."""


@dataclass
class Stats:
    """Per command: counts, bytes, error replies by errno, reply latencies."""

    count: Counter[int] = field(default_factory=Counter)
    bytes: Counter[int] = field(default_factory=Counter)
    errors: Counter[tuple[int, int]] = field(default_factory=Counter)
    latencies: dict[int, list[float]] = field(default_factory=dict)
    experts: ExpertStats = field(default_factory=ExpertStats)
    unanswered: set[int] = field(default_factory=set)     # requests still without a reply
    conversations: dict[int, Conversation] = field(default_factory=dict)

    def add(self, p: Dissected) -> None:
        h = p.header
        cmd = h.cmd if h else -1
        self.count[cmd] += 1
        self.bytes[cmd] += p.msg.wire_size
        if h is not None and h.kind == "error":
            self.errors[(cmd, h.error)] += 1
        if p.latency is not None:
            self.latencies.setdefault(cmd, []).append(p.latency)
        self.experts.packet(p)
        if p.request_in:
            self.unanswered.discard(p.request_in)
        elif h is not None and expects_reply(h):
            self.unanswered.add(p.number)
        self.conversation(p.msg.conn).add(p)

    def conversation(self, conn: int) -> Conversation:
        c = self.conversations.get(conn)
        if c is None:
            c = self.conversations[conn] = Conversation()
        return c

    def expert_rows(self) -> list[tuple[str, str, int, int]]:
        """(severity, id, count, first message), unanswered requests included
        as a two-pass read counts them."""
        rows = [(EXPERTS[eid].severity, eid, n, self.experts.first[eid])
                for eid, n in self.experts.counts.items()]
        if self.unanswered:
            eid = "request.unanswered"
            rows.append((EXPERTS[eid].severity, eid, len(self.unanswered), min(self.unanswered)))
        return rows

    def latency_row(self, cmd: int) -> tuple[float, float, float, float] | None:
        """min, median, p99, max in seconds."""
        values = sorted(self.latencies.get(cmd, ()))
        if not values:
            return None
        p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
        return values[0], statistics.median(values), p99, values[-1]


class CaptureModel:
    """A capture file (possibly still growing) or a proxy's live stream."""

    def __init__(self, path: str, follow: bool = False) -> None:
        self.path = path
        # The header is read without waiting: an empty or cut file is an error now.
        self.reader = CaptureReader(path)     # CaptureError: caller reports
        self.reader.follow = follow
        self.live = self.reader.live
        self._file = None if self.live else open(path, "rb")
        self._file_lock = threading.Lock()
        self.offsets = array("q")
        self.kept: list[Message] = []          # live streams have no file to read back
        self.columns = {name: array("q") for name in (
            "ts", "conn", "channel", "dir", "msg_id", "cmd", "size", "flags", "error", "len",
            "fds")}
        self.expert_codes = array("H")         # every message's expert ids, in order,
        self.expert_end = array("I")           # ... message n's end at expert_end[n - 1]
        self.expert_ids: list[str] = []        # code -> id
        self._expert_code: dict[str, int] = {}
        self.request_of = array("i")           # reply -> request number (0: none)
        self.response_of = array("i")          # request -> reply number (0: none)
        self.events: list[tuple[int, Event]] = []   # (messages before it, event)
        self.stats = Stats()
        self.tracker = SessionTracker(checkpoint_every=CHECKPOINT_EVERY)
        self._analyzer = Analyzer(sessions=self.tracker)
        self.count = 0
        self.done = False
        self._cache: OrderedDict[int, Dissected] = OrderedDict()
        self._thread = threading.Thread(target=self._index, daemon=True)
        self._eof_since: float | None = None      # when the pass last caught up
        self._eof_count = 0
        self._grew_at: float | None = None
        self._first_screen = 0
        self._shown = threading.Event()

    def start(self, first_screen: int = 0) -> None:
        """Begin the background pass.  With `first_screen`, it stops after that
        many messages until `shown()` (at most FIRST_SCREEN_WAIT): the pass
        holds the GIL, and the UI's first paint is thousands of small steps.
        A live stream never waits: its messages come as the proxy relays them."""
        self._first_screen = 0 if self.live else first_screen
        self._thread.start()

    def shown(self) -> None:
        """The first screen is painted: the background pass goes on."""
        self._shown.set()

    def close(self) -> None:
        self.reader.stop()
        self._thread.join(timeout=2)
        self.reader.close()
        if self._file:
            self._file.close()

    # --- what the status line says ----------------------------------------------------

    @property
    def caught_up(self) -> bool:
        """Everything written so far is indexed."""
        return self.done or (self.reader.at_eof and not self.live)

    def status(self) -> tuple[str, str | None]:
        """The state (reading N%, following, live, done) and what is wrong
        with the file (corrupt records, a last record cut short), if anything."""
        if self.live:
            return ("done: the live stream ended" if self.done else "live"), self.reader.damage
        if not self.caught_up:
            self._eof_since = None
            size = max(os.path.getsize(self.path), 1)
            return f"reading {min(self.reader.position * 100 // size, 99)}%", self.reader.damage
        now = time.monotonic()
        if self._eof_since is None:
            self._eof_since, self._eof_count = now, self.count
        elif self.count != self._eof_count:
            self._grew_at, self._eof_count = now, self.count
        growing = self._grew_at is not None and now - self._grew_at < GROWING_FOR
        return ("following" if growing else "done"), self.reader.damage or self._cut(now)

    def _cut(self, now: float) -> str | None:
        tail = self.reader.tail
        if tail and self._eof_since is not None and now - self._eof_since >= TRUNCATED_AFTER:
            return (f"capture ends inside a record: last {tail} bytes ignored "
                    "(was the writer killed?)")
        return None

    # --- the background pass ---------------------------------------------------------

    def _index(self) -> None:
        try:
            for offset, record in self.reader.indexed():
                if isinstance(record, Message):
                    self._add(offset, record)
                    if self.count == self._first_screen:
                        self._shown.wait(FIRST_SCREEN_WAIT)
                else:
                    self._event(record)
        except (OSError, ValueError):
            pass          # a vanished stream ends the pass; what came is kept
        finally:
            self.done = True

    def _event(self, event: Event) -> None:
        self.events.append((self.count, event))
        if event.kind == OPEN:
            info = event.info
            self.stats.conversation(event.conn).endpoints = str(
                info.get("server") or info.get("text") or "")
        self._analyzer.run([event])            # a close ends its session

    def _add(self, offset: int, msg: Message) -> None:
        p = self._analyzer.feed(msg)
        h = p.header
        values = (msg.ts_ns, msg.conn, msg.channel, msg.direction, h.msg_id if h else -1,
                  h.cmd if h else -1, h.size if h else 0, h.flags if h else 0,
                  h.error if h else 0,
                  msg.wire_size, len(msg.fds))
        for column, value in zip(self.columns.values(), values):
            column.append(value)
        for e in p.tree.experts:
            code = self._expert_code.setdefault(e.id, len(self.expert_ids))
            if code == len(self.expert_ids):
                self.expert_ids.append(e.id)
            self.expert_codes.append(code)
        self.expert_end.append(len(self.expert_codes))
        self.request_of.append(p.request_in or 0)
        self.response_of.append(0)
        if p.request_in:
            self.response_of[p.request_in - 1] = p.number
        self.stats.add(p)
        if self.live:
            self.kept.append(msg)
        else:
            self.offsets.append(offset)
        self.count = p.number

    def answered_before(self, first: int, last: int) -> list[int]:
        """Requests before message `first` that replies first..last answer:
        what those replies change (links, the 'no reply' warning)."""
        return [r for r in self.request_of[first - 1:last] if 0 < r < first]

    # --- reading back -----------------------------------------------------------------

    def message(self, number: int) -> Message:
        if self.live:
            return self.kept[number - 1]
        offset, first = self._record_of(number)
        with self._file_lock:
            record = next(islice(records_from(self._file, offset), number - first, None), None)
        assert isinstance(record, Message)     # the index holds message offsets only
        return record

    def _record_of(self, number: int) -> tuple[int, int]:
        """Where message `number`'s record starts, and the first message it
        holds (a burst holds several)."""
        offset = self.offsets[number - 1]
        return offset, bisect.bisect_left(self.offsets, offset) + 1

    def records(self, first: int, last: int) -> Iterator[Record]:
        """Messages first..last in order, with the events among them."""
        if self.live:
            yield from self.kept[first - 1:last]
            return
        with open(self.path, "rb") as file:        # its own: workers read too
            # from the message before, so that the events before `first` (a
            # fault record, which marks the message after it) come too
            offset, number = self._record_of(max(first - 1, 1))
            number -= 1
            for record in records_from(file, offset):
                if isinstance(record, Message):
                    number += 1
                    if number > last:
                        return
                wanted = first if isinstance(record, Message) else first - 1
                if record is not None and number >= wanted:
                    yield record

    def messages(self, first: int, last: int) -> Iterator[Message]:
        if first <= last:
            yield from (r for r in self.records(first, last) if isinstance(r, Message))

    def packets(self, first: int, last: int) -> list[Dissected]:
        """Messages first..last dissected as a straight read would dissect them."""
        first, last = max(first, 1), min(last, self.count)
        missing = [n for n in range(first, last + 1) if n not in self._cache]
        if missing:
            for p in self.analysis(missing[0], missing[-1]):
                self._cache[p.number] = p
            while len(self._cache) > CACHE_PACKETS:
                self._cache.popitem(last=False)
        out = []
        for n in range(first, last + 1):
            self._cache.move_to_end(n)
            out.append(self._cache[n])
        return out

    def packet(self, number: int) -> Dissected:
        return self.packets(number, number)[0]

    def forget(self, numbers: list[int]) -> list[int]:
        """Drop these messages' dissections (a reply changed them); those that were kept."""
        return [n for n in numbers if self._cache.pop(n, None) is not None]

    def analysis(self, first: int, last: int) -> Iterator[Dissected]:
        """Messages first..last dissected with the session state and links of a
        two-pass read, rolled forward from the nearest checkpoint."""
        if first > last:
            return
        snapshot = state_at(self.tracker, first - 1, self.messages)
        analyzer = Analyzer(_Links(self.response_of), self.tracker.restored(snapshot.connections))
        ts = self.columns["ts"]
        analyzer.resume_at(first - 1, ts[0], ts[first - 2] if first > 1 else ts[0])
        for p in analyzer.run(self.records(first, last)):
            yield p

    def save(self, path: str, entries: list[int], writer: Any) -> int:
        """Write these rows (message numbers; an event is -(its index + 1)) with
        `writer`, which it closes; a pcapng gets each message's expert items,
        as `export` writes them.  The number of messages written."""
        from ..save import is_pcapng_name, write_one
        numbers = sorted(e for e in entries if e > 0)
        wanted, events = set(numbers), sorted(-e - 1 for e in entries if e < 0)
        after: dict[int, list[Event]] = {}
        for index in events:
            before, event = self.events[index]
            after.setdefault(before, []).append(event)
        with writer:
            for event in after.pop(0, []):
                write_one(writer, event)
            if numbers:
                first, last = numbers[0], numbers[-1]
                records = (self.analysis(first, last) if is_pcapng_name(path)
                           else self.messages(first, last))
                for number, record in zip(range(first, last + 1), records):
                    if number in wanted:
                        write_one(writer, record)
                    for event in after.pop(number, []):
                        write_one(writer, event)
            for rest in after.values():
                for event in rest:
                    write_one(writer, event)
        return len(numbers)

    def session_at(self, number: int) -> Snapshot:
        return state_at(self.tracker, number, self.messages)

    # --- filtering -----------------------------------------------------------------------

    def header_values(self, number: int, names: frozenset[str] = frozenset()
                      ) -> dict[str, list[Any]]:
        """What an index-only filter may test; links and expert ids only when
        `names` (the filter's fields) asks for them."""
        c, i = self.columns, number - 1
        flags = c["flags"][i]
        values: dict[str, list[Any]] = {
            "frame.number": [number], "frame.conn": [c["conn"][i]],
            "frame.channel": [c["channel"][i]], "frame.dir": [c["dir"][i]],
            "frame.len": [c["len"][i]], "frame.fds": [c["fds"][i]]}
        if c["cmd"][i] >= 0:
            values.update({"vfio_user": [None], "vfio_user.msg_id": [c["msg_id"][i]],
                           "vfio_user.cmd": [c["cmd"][i]], "vfio_user.size": [c["size"][i]],
                           "vfio_user.flags": [flags]})
            for sub, value in bit_values(FLAGS_FIELD, flags):
                values[sub.name] = [value]
            error_field = "vfio_user.error" if flags & proto.FLAG_ERROR else "vfio_user.reserved"
            values[error_field] = [c["error"][i]]
        if names & LINK_FIELDS:
            self._link_values(i, values)
        if not names.isdisjoint(EXPERT_FIELDS):
            self._expert_values(number, values)
        return values

    def _link_values(self, i: int, values: dict[str, list[Any]]) -> None:
        request, response, ts = self.request_of[i], self.response_of[i], self.columns["ts"]
        if request:
            values["vfio_user.response_to"] = [request]
            values["vfio_user.time"] = [(ts[i] - ts[request - 1]) / 1e9]
        if response:
            values["vfio_user.response_in"] = [response]

    def _expert_values(self, number: int, values: dict[str, list[Any]]) -> None:
        i = number - 1
        ids = [self.expert_ids[code] for code in
               self.expert_codes[self.expert_end[i - 1] if i else 0:self.expert_end[i]]]
        header = proto.HeaderInfo(0, 0, 0, self.columns["flags"][i], 0)
        if self.columns["cmd"][i] >= 0 and expects_reply(header) and not self.response_of[i]:
            ids.append("request.unanswered")   # what a two-pass analysis adds
        if ids:
            values["expert"] = [True]
            values["expert.id"] = ids
            values["expert.severity"] = [EXPERTS[id].severity for id in ids]

    def advance(self, live: LiveFilter, progress: Callable[[int], bool]) -> None:
        """Bring `live` up to the messages indexed now: decide the new ones and
        the earlier requests their replies answer.  `progress` gets message
        numbers as it goes; when it returns False, raise Cancelled."""
        last = self.count
        if last == live.upto:
            return
        start = min([live.upto + 1, *self.answered_before(live.upto + 1, last)])
        found = live.matches[:bisect.bisect_left(live.matches, start)]
        for number, values in self._candidates(live.display.fields, start, last):
            if number % 4096 == 0 and not progress(number):
                raise Cancelled
            if live.display.matches(values):
                found.append(number)
        live.matches, live.upto = found, last

    def matches(self, display: DisplayFilter, progress: Callable[[int], bool]) -> array | None:
        """Numbers of the messages `display` selects now, or None when `progress`
        (called with message numbers) asks to stop."""
        live = LiveFilter("", display)
        try:
            self.advance(live, progress)
        except Cancelled:
            return None
        return live.matches

    def _candidates(self, names: frozenset[str], first: int, last: int
                    ) -> Iterator[tuple[int, dict[str, list[Any]]]]:
        """(number, what `names` may test) of messages first..last, by the cheapest path."""
        if set(names) <= HEADER_FIELDS:
            return ((n, self.header_values(n, names)) for n in range(first, last + 1))
        if set(names) <= STATELESS_FIELDS:
            return self._stateless_pass(names, first, last)
        return ((p.number, p.tree.values(names)) for p in self.analysis(first, last))

    def _stateless_pass(self, names: frozenset[str], first: int, last: int
                        ) -> Iterator[tuple[int, dict[str, list[Any]]]]:
        """Values of each message, dissecting only those that can carry the
        filter's deeper fields, read alone: the others lack them, so their
        header values decide exactly (negations included)."""
        deep_names = names - HEADER_FIELDS
        wants_fds = any(name.split(".")[0] == "fd" for name in deep_names)
        commands = [proto.field_commands(name) for name in deep_names
                    if name.split(".")[0] != "fd"]
        any_command = None in commands
        wanted = frozenset().union(*(c for c in commands if c is not None))
        cmd, flags, fds = self.columns["cmd"], self.columns["flags"], self.columns["fds"]
        request_of = self.request_of
        deep = [n for n in range(first, last + 1)
                if any_command or (wants_fds and fds[n - 1]) or cmd[n - 1] in wanted
                and not proto.header_only(cmd[n - 1], flags[n - 1])]
        needed = {request_of[n - 1] for n in deep} - {0}    # their requests: a reply's context
        uses_header = bool(names & HEADER_FIELDS)
        stream = self._messages_numbered(sorted(needed.union(deep)))
        ahead = next(stream, None)
        requests: dict[int, bytes] = {}      # the start of each needed request until its reply
        for number in range(first, last + 1):
            msg = None
            while ahead is not None and ahead[0] <= number:
                if ahead[0] in needed:
                    requests[ahead[0]] = ahead[1].data[:64]
                if ahead[0] == number:
                    msg = ahead[1]
                ahead = next(stream, None)
            if msg is None:     # none of the filter's fields, unless it tests the header
                yield number, self.header_values(number, names) if uses_header else {}
                continue
            ctx = proto.Context(DIRECTIONS[msg.direction], msg.fds,
                                requests.pop(request_of[number - 1], None), size=msg.size)
            values = proto.dissect_message(msg.data, ctx)[0].values(names)
            for name in EXPERT_FIELDS:       # the stateful analysis's, from the index
                values.pop(name, None)
            values.update(self.header_values(number, names))
            yield number, values

    def _messages_numbered(self, numbers: list[int]) -> Iterator[tuple[int, Message]]:
        """(number, message) for `numbers` (ascending), from one pass over the
        file that unpacks only the records holding them."""
        if self.live:
            yield from ((n, self.kept[n - 1]) for n in numbers)
            return
        holding: dict[int, tuple[int, list[int]]] = {}    # offset: its first message, wanted
        for n in numbers:
            offset, first = self._record_of(n)
            holding.setdefault(offset, (first, []))[1].append(n)
        with open(self.path, "rb") as file:        # its own: workers read too
            for offset, record in records_at(file, holding):
                first, wanted = holding[offset]
                messages = list(unbundle(record))
                for n in wanted:
                    if n - first < len(messages) and isinstance(messages[n - first], Message):
                        yield n, messages[n - first]


class _Links:
    """The request -> reply links as the analyzer's `responses` mapping."""

    def __init__(self, response_of: array) -> None:
        self.response_of = response_of

    def get(self, number: int, default: int | None = None) -> int | None:
        if number <= len(self.response_of) and self.response_of[number - 1]:
            return self.response_of[number - 1]
        return default
