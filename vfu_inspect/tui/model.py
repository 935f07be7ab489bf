"""What the TUI shows, kept small enough for a million messages.

One background pass reads the capture (or the live stream) once: it records
where each message starts in the file, the few header facts the filter fast
path needs, and what the analysis found (worst expert severity, request/reply
links, statistics, session checkpoints).  Messages are read back and dissected
only when they are on screen, from the nearest session checkpoint, so the
detail of any message shows the same stateful expert items as `read`.

Filters take the cheapest exact path: header fields, links and expert ids from
the index alone; fields a message's own bytes give by dissecting, without session
state, only the messages whose command can carry them; anything else (expert
messages, device layers, times) by a full analysis pass.
"""

from __future__ import annotations

import statistics
import threading
from array import array
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..capture import DIRECTIONS, FAULT, CaptureReader, Event, Message, read_record
from ..dfilter import DisplayFilter
from ..dissect import Analyzer, Dissected, expects_reply
from ..dissectors import vfio_user as proto
from ..fields import EXPERTS, SEVERITIES, lookup
from ..session import SessionTracker, Snapshot
from ..tree import bit_values

CHECKPOINT_EVERY = 1024
NO_SEVERITY = len(SEVERITIES)
CACHE_PACKETS = 4096
# Fields the filter can test from the index alone, without dissecting.
HEADER_FIELDS = {"frame.number", "frame.conn", "frame.channel", "frame.dir", "frame.len",
                 "frame.fds", "vfio_user", "vfio_user.msg_id", "vfio_user.cmd",
                 "vfio_user.size", "vfio_user.flags", "vfio_user.flags.type",
                 "vfio_user.flags.no_reply", "vfio_user.flags.error", "vfio_user.error",
                 "vfio_user.reserved", "vfio_user.response_in", "vfio_user.response_to",
                 "vfio_user.time", "expert", "expert.id", "expert.severity"}
LINK_FIELDS = {"vfio_user.response_in", "vfio_user.response_to", "vfio_user.time"}
EXPERT_FIELDS = {"expert", "expert.id", "expert.severity", "expert.message"}
# Fields dissection without session state gives exactly (the fds' items too).
STATELESS_FIELDS = HEADER_FIELDS | {fd.name for fd in proto.protocol_fields()} | {
    "fd", "fd.index", "fd.kind", "fd.size", "fd.inode", "fd.purpose"}
FLAGS_FIELD = lookup("vfio_user.flags")


@dataclass
class Stats:
    """Per command: counts, bytes, error replies by errno, reply latencies."""

    count: Counter[int] = field(default_factory=Counter)
    bytes: Counter[int] = field(default_factory=Counter)
    errors: Counter[tuple[int, int]] = field(default_factory=Counter)
    latencies: dict[int, list[float]] = field(default_factory=dict)
    experts: Counter[tuple[str, str]] = field(default_factory=Counter)
    first_expert: dict[str, int] = field(default_factory=dict)

    def add(self, p: Dissected) -> None:
        h = p.header
        cmd = h.cmd if h else -1
        self.count[cmd] += 1
        self.bytes[cmd] += p.msg.wire_size
        if h is not None and h.kind == "error":
            self.errors[(cmd, h.error)] += 1
        if p.latency is not None:
            self.latencies.setdefault(cmd, []).append(p.latency)
        for e in p.tree.experts:
            self.experts[(e.severity, e.id)] += 1
            self.first_expert.setdefault(e.id, p.number)

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
        self.reader = CaptureReader(path, follow=follow)     # CaptureError: caller reports
        self.live = self.reader.live
        self._file = None if self.live else open(path, "rb")
        self._file_lock = threading.Lock()
        self.offsets = array("q")
        self.kept: list[Message] = []          # live streams have no file to read back
        self.columns = {name: array("q") for name in (
            "ts", "conn", "channel", "dir", "msg_id", "cmd", "flags", "error", "len", "fds")}
        self.severity = bytearray()
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
        self.listeners: list[Callable[[], None]] = []
        self._cache: OrderedDict[int, Dissected] = OrderedDict()
        self._thread = threading.Thread(target=self._index, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.reader.stop()
        self._thread.join(timeout=2)
        self.reader.close()
        if self._file:
            self._file.close()

    @property
    def damage(self) -> str | None:
        return self.reader.damage

    # --- the background pass ---------------------------------------------------------

    def _index(self) -> None:
        try:
            for offset, record in self.reader.indexed():
                if isinstance(record, Message):
                    self._add(offset, record)
                else:
                    self.events.append((self.count, record))
                    list(self._analyzer.run([record]))      # a close ends its session
                self._notify()
        except (OSError, ValueError):
            pass          # a vanished stream ends the pass; what came is kept
        finally:
            self.done = True
            self._notify()

    def _add(self, offset: int, msg: Message) -> None:
        p = self._analyzer.feed(msg)
        h = p.header
        values = (msg.ts_ns, msg.conn, msg.channel, msg.direction, h.msg_id if h else -1,
                  h.cmd if h else -1, h.flags if h else 0, h.error if h else 0,
                  msg.wire_size, len(msg.fds))
        for column, value in zip(self.columns.values(), values):
            column.append(value)
        worst = p.tree.worst_severity
        self.severity.append(SEVERITIES.index(worst) if worst else NO_SEVERITY)
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

    def _notify(self) -> None:
        for listener in self.listeners:
            listener()

    # --- reading back -----------------------------------------------------------------

    def message(self, number: int) -> Message:
        if self.live:
            return self.kept[number - 1]
        with self._file_lock:
            record = read_record(self._file, self.offsets[number - 1])
        assert isinstance(record, Message)     # the index holds message offsets only
        return record

    def messages(self, first: int, last: int) -> Iterator[Message]:
        for number in range(first, last + 1):
            yield self.message(number)

    def packets(self, first: int, last: int) -> list[Dissected]:
        """Messages first..last dissected as a straight read would dissect them."""
        first, last = max(first, 1), min(last, self.count)
        missing = [n for n in range(first, last + 1) if n not in self._cache]
        if missing:
            self._dissect(missing[0], missing[-1])
        out = []
        for n in range(first, last + 1):
            self._cache.move_to_end(n)
            out.append(self._cache[n])
        return out

    def packet(self, number: int) -> Dissected:
        return self.packets(number, number)[0]

    def _dissect(self, first: int, last: int) -> None:
        snapshot = self.tracker.state_at(first - 1, self.messages)
        analyzer = Analyzer(_Links(self.response_of), self.tracker.restored(snapshot.connections))
        ts = self.columns["ts"]
        analyzer.resume_at(first - 1, ts[0], ts[first - 2] if first > 1 else ts[0])
        faults = [(before, e) for before, e in self.events
                  if e.kind == FAULT and first <= before + 1 <= last]
        for msg in self.messages(first, last):
            list(analyzer.run(e for before, e in faults if before == analyzer.number))
            p = analyzer.feed(msg)
            self._cache[p.number] = p
        while len(self._cache) > CACHE_PACKETS:
            self._cache.popitem(last=False)

    def session_at(self, number: int) -> Snapshot:
        return self.tracker.state_at(number, self.messages)

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
                           "vfio_user.cmd": [c["cmd"][i]], "vfio_user.size": [c["len"][i]],
                           "vfio_user.flags": [flags]})
            for sub, value in bit_values(FLAGS_FIELD, flags):
                values[sub.name] = [value]
            error_field = "vfio_user.error" if flags & proto.FLAG_ERROR else "vfio_user.reserved"
            values[error_field] = [c["error"][i]]
        if names & LINK_FIELDS:
            self._link_values(i, values)
        if names & EXPERT_FIELDS:
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

    def matches(self, display: DisplayFilter, progress: Callable[[int], bool]) -> array | None:
        """Numbers of the messages `display` selects, or None when `progress`
        (called with each message number) asks to stop."""
        out, total = array("i"), self.count
        if set(display.fields) <= HEADER_FIELDS:
            candidates = ((n, self.header_values(n, display.fields))
                          for n in range(1, total + 1))
        elif set(display.fields) <= STATELESS_FIELDS:
            candidates = self._stateless_pass(display.fields, total)
        else:
            candidates = ((p.number, p.tree.values()) for p in self._full_pass(total))
        for number, values in candidates:
            if number % 4096 == 0 and not progress(number):
                return None
            if display.matches(values):
                out.append(number)
        return out

    def _full_pass(self, total: int) -> Iterator[Dissected]:
        analyzer = Analyzer(_Links(self.response_of), SessionTracker(checkpoint_every=0))
        if self.live:
            yield from analyzer.run(self.kept[:total])
            return
        with CaptureReader(self.path) as reader:
            for p in analyzer.run(reader):
                if p.number > total:
                    return
                yield p

    def _stateless_pass(self, names: frozenset[str], total: int
                        ) -> Iterator[tuple[int, dict[str, list[Any]]]]:
        """Values of each message, dissecting only those that can carry the
        filter's deeper fields: the others lack them, so their header values
        decide exactly (negations included)."""
        deep = names - HEADER_FIELDS
        wants_fds = any(name.split(".")[0] == "fd" for name in deep)
        commands = [proto.field_commands(name) for name in deep if name.split(".")[0] != "fd"]
        any_command = None in commands
        wanted = frozenset().union(*(c for c in commands if c is not None))
        cmd, fds = self.columns["cmd"], self.columns["fds"]
        uses_header = bool(names & HEADER_FIELDS)
        requests: dict[int, bytes] = {}      # start of each request until its reply
        for number, msg in enumerate(self._messages_in_order(total), 1):
            i = number - 1
            if self.response_of[i]:
                requests[number] = msg.data[:64]
            request = requests.pop(self.request_of[i], None)
            if any_command or cmd[i] in wanted or (wants_fds and fds[i]):
                ctx = proto.Context(DIRECTIONS[msg.direction], msg.fds, request)
                values = proto.dissect_message(msg.data, ctx)[0].values()
                for name in EXPERT_FIELDS:       # the stateful analysis's, from the index
                    values.pop(name, None)
                values.update(self.header_values(number, names))
                yield number, values
            else:     # none of the filter's fields, unless it tests the header
                yield number, self.header_values(number, names) if uses_header else {}

    def _messages_in_order(self, total: int) -> Iterator[Message]:
        if self.live:
            yield from self.kept[:total]
            return
        with CaptureReader(self.path) as reader:
            count = 0
            for record in reader:
                if isinstance(record, Message):
                    count += 1
                    if count > total:
                        return
                    yield record


class _Links:
    """The request -> reply links as the analyzer's `responses` mapping."""

    def __init__(self, response_of: array) -> None:
        self.response_of = response_of

    def get(self, number: int, default: int | None = None) -> int | None:
        if number <= len(self.response_of) and self.response_of[number - 1]:
            return self.response_of[number - 1]
        return default
