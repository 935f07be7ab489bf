"""`vfu-inspect replay`: be the client of a recorded connection, against a live server.

The recorded client commands are sent in their recorded order, each after the
replies that the recorded client had received before sending it (so
pipelining and NO_REPLY stay as recorded), with fresh msg_ids and fresh fds
of the recorded kinds: memfds for DMA memory, eventfds for IRQs.  The
server's own DMA_READ/DMA_WRITE are answered from that memory, or with the
recorded answer when the command is the recorded one.  Every reply and
server command is dissected and compared field by field with the recording.

A recording of `proxy --trace-irqs` also says which interrupts the server
raised: the replay keeps the eventfds it hands over, rings each recorded
doorbell where it was rung, and compares the signals of each vector.
`--fault` injects faults into the requests the replay sends and into the
server's commands it answers, as the proxy does.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

from .capture import CaptureReader
from .dissect import expects_reply, find_responses
from .dissectors import vfio_user as proto
from .endpoints.common import (DmaMemory, Peer, Recorder, message, parse_caps, reply_to,
                               unpack)
from .events import irq_name
from .faults import Fault, FaultInjector
from .framing import Frame
from .irqs import doorbells, set_irqs_assignment
from .records import C2S, DOORBELL, FAULT, IRQ, MAIN, OPEN, S2C, TWIN, Event, Message
from .sockio import MessageSocket, PeerClosed, fd_info

# Fields that differ between any two runs and never count as divergence.
ALWAYS_IGNORED = ("frame.", "vfio_user.msg_id", "vfio_user.response_to",
                  "vfio_user.response_in", "vfio_user.time", "fd.inode")
REPLY_TIMEOUT = 10.0
IRQ_WAIT = 2.0          # for interrupts still on their way at the end


class ReplayError(Exception):
    """The replay could not run to the end (exit status 2)."""


@dataclass
class Divergence:
    frame: int                    # the recorded message's number in the capture
    what: str
    fields: list[tuple[str, Any, Any]]     # (field, recorded, live)


@dataclass
class Outcome:
    sent: int = 0
    matched: int = 0
    divergences: list[Divergence] = field(default_factory=list)
    faults: int = 0


@dataclass
class Recording:
    """One recorded connection: its messages, and what --trace-irqs saw."""

    conn: int
    messages: list[tuple[int, Message]]      # (capture frame number, message)
    traced: bool = False                     # recorded by proxy --trace-irqs
    irqs: Counter[tuple[int, int]] = field(default_factory=Counter)   # signals per vector
    doorbells: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    # (messages of the connection before it, the doorbell)


def load_connection(path: str, conn: int | None) -> Recording:
    """One connection of a capture; the first if conn is None."""
    recording: Recording | None = None
    events: list[tuple[int, Event]] = []
    number = 0
    with CaptureReader(path) as reader:
        for record in reader:
            if isinstance(record, Message):
                number += 1
                if conn is None:
                    conn = record.conn
                if record.conn == conn:
                    recording = recording or Recording(conn, [])
                    recording.messages.append((number, record))
            elif conn is None or record.conn == conn:
                events.append((len(recording.messages) if recording else 0, record))
        damage = reader.damage
    if recording is None:
        raise ReplayError(f"{path} has no messages on connection {conn}")
    for position, event in events:
        if event.conn != recording.conn:
            continue
        if event.kind == OPEN:
            recording.traced = bool(event.info.get("trace_irqs"))
        elif event.kind == IRQ:
            recording.irqs[event.info.get("index"), event.info.get("vector")] += \
                event.info.get("count") or 0
        elif event.kind == DOORBELL:
            recording.doorbells.append((position, event.info))
    if damage:
        print(f"vfu-inspect: warning: {path}: {damage}", file=sys.stderr)
    return recording


class Replayer:
    def __init__(self, recording: Recording, server: str, ignore: list[str], out: TextIO,
                 recorder: Recorder | None, faults: FaultInjector | None = None) -> None:
        self.recording = recording
        recorded = self.recorded = recording.messages
        self.ignore = tuple(ALWAYS_IGNORED) + tuple(ignore)
        self.out = out
        self.outcome = Outcome()
        self.memory = DmaMemory()
        self.replies = recorded_replies(recorded)
        self.server_commands = [(n, m) for n, m in recorded
                                if m.direction == S2C and not is_reply(m)]
        self.next_server_command = 0
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(server)
        except OSError as exc:
            sock.close()
            raise ReplayError(f"cannot connect to {server}: {exc.strerror}") from None
        self.main = Peer(MessageSocket(sock), "client", recorder=recorder)
        self.recorder = recorder
        self.twin: Peer | None = None
        self.waiting: dict[int, tuple[int, bytes]] = {}   # live msg_id -> (recorded idx, request)
        self.replies_seen = 0
        self.replies_before = _replies_before(recorded, self.replies)
        self.total = sum(1 for _, m in recorded
                         if m.direction == C2S and m.channel == MAIN and not is_reply(m))
        self.progress = Progress("replay")
        self.faults = faults
        self.injected: list[Frame] = []       # replies a fault made in place of the server's
        self.duplicates: Counter[int] = Counter()   # msg_id -> replies still due to a duplicate
        self.irq_fds: dict[tuple[int, int], int] = {}   # (index, vector) -> our eventfd
        self.live_irqs: Counter[tuple[int, int]] = Counter()
        self.doorbell_fds: dict[tuple[Any, Any], int] = {}   # (region, offset) -> eventfd
        self.rung = 0

    def run(self) -> Outcome:
        try:
            for index, (number, msg) in enumerate(self.recorded):
                if msg.direction != C2S or msg.channel != MAIN or is_reply(msg):
                    continue
                while self.replies_seen < self.replies_before[index]:
                    self.receive()
                self.ring_doorbells(index)
                if not self.send(index, msg):
                    return self.outcome          # a fault closed the connection
            self.ring_doorbells(len(self.recorded))
            while self.waiting:
                self.receive()
            if self.recording.traced:
                self.compare_irqs()
            return self.outcome
        finally:
            for fd in [*self.irq_fds.values(), *self.doorbell_fds.values()]:
                os.close(fd)

    def send(self, index: int, msg: Message) -> bool:
        """Send a recorded request (as a fault changes it); False when that closed
        the connection."""
        h = proto.parse_header(msg.data)
        msg_id = self.main.new_id()
        data = message(msg_id, h.cmd, msg.data[proto.HEADER_SIZE:], h.flags, h.error)
        fds = self.recreate_fds(msg)
        fault = self.fault(data, fds, C2S)
        copies = 1
        if fault is not None:
            data, copies = fault.data, self.before_sending(fault, fds)
        for copy in range(copies):
            self.main.send(data, fds if copy == copies - 1 else [os.dup(fd) for fd in fds])
        for fd in fds:
            os.close(fd)
        self.outcome.sent += 1
        self.progress.tick(f"{self.outcome.sent}/{self.total} requests sent, "
                           f"{len(self.outcome.divergences)} diverged")
        if expects_reply(h) and (copies or fault.action.name == "errno"):
            self.waiting[msg_id] = (index, data)
            self.duplicates[msg_id] += max(copies - 1, 0)
        if fault is not None and fault.action.name == "close":
            print(f"replay: {fault.info['effect']}: the replay ends here", file=self.out)
            return False
        return True

    def before_sending(self, fault: Fault, fds: list[int]) -> int:
        """Do what a fault on a request says before it goes; how often it goes."""
        if not fault.delivered and self.recorder:       # recorded as the proxy records it
            self.recorder.record(0, MAIN, C2S, fault.data, fds)
        if fault.action.name == "errno":                # the answer, in place of the server's
            self.injected.append(Frame(fault.answer, len(fault.answer)))
            if self.recorder:
                self.recorder.record(0, MAIN, S2C, fault.answer, [])
        if fault.action.name == "delay":
            time.sleep(fault.action.delay)
        if not fault.delivered:
            return 0
        return 2 if fault.action.name == "duplicate" else 1

    def fault(self, data: bytes, fds: list[int], direction: int) -> Fault | None:
        """The fault --fault puts on a message the replay sends or answers."""
        if self.faults is None:
            return None
        h = proto.parse_header(data)
        rules = self.faults.candidates(MAIN, direction, h.cmd, h.flags, h.error, len(fds))
        fault = rules and self.faults.decide(rules, self.recording.conn, MAIN, direction, data,
                                             [fd_info(fd) for fd in fds])
        if not fault:
            return None
        self.outcome.faults += 1
        print(f"fault: {fault.info['effect']} [{fault.rule.text}]", file=self.out)
        if self.recorder:
            self.recorder.writer.write(Event(FAULT, time.time_ns(), 0, fault.info))
        return fault

    def recreate_fds(self, msg: Message) -> list[int]:
        """Fresh fds for a recorded request, made as what its family says they are for."""
        h = proto.parse_header(msg.data)
        make = REQUEST_FDS.get(proto.FD_CARRIERS.get((h.cmd, "command")), Replayer.fresh_fds)
        return make(self, msg)

    def fresh_fds(self, msg: Message) -> list[int]:
        return [fresh_fd(meta) for meta in msg.fds]

    def irq_eventfds(self, msg: Message) -> list[int]:
        fds = self.fresh_fds(msg)
        assignment = set_irqs_assignment(msg.data)
        if assignment is not None:                   # keep them, to count the interrupts
            index, start, _ = assignment
            for vector, fd in enumerate(fds, start):
                self.count_irqs((index, vector), self.irq_fds.pop((index, vector), None))
                self.irq_fds[index, vector] = os.dup(fd)
        return fds

    # --- interrupts and doorbells (recordings of proxy --trace-irqs) ----------------

    def ring_doorbells(self, position: int) -> None:
        """Ring the doorbells recorded before the message at `position`."""
        while self.rung < len(self.recording.doorbells) and \
                self.recording.doorbells[self.rung][0] <= position:
            info = self.recording.doorbells[self.rung][1]
            fd = self.doorbell_fds.get((info.get("region"), info.get("offset")))
            if fd is not None:
                os.eventfd_write(fd, info.get("count") or 1)
            else:
                self.diverge(0, f"recorded doorbell {proto.region_name(info.get('region', -1))} "
                                f"offset {info.get('offset', 0):#x}: the server gave no such "
                                "ioeventfd", [])
            self.rung += 1

    def keep_doorbells(self, frame: Frame) -> None:
        if not self.recording.doorbells:
            return                                   # none to ring
        for i, info in doorbells(frame.data, [fd_info(fd) for fd in frame.fds]).items():
            old = self.doorbell_fds.pop((info["region"], info["offset"]), None)
            if old is not None:
                os.close(old)
            self.doorbell_fds[info["region"], info["offset"]] = os.dup(frame.fds[i])

    def count_irqs(self, vector: tuple[int, int], fd: int | None, close: bool = True) -> None:
        if fd is None:
            return
        try:
            self.live_irqs[vector] += os.eventfd_read(fd)
        except BlockingIOError:
            pass
        if close:
            os.close(fd)

    def compare_irqs(self) -> None:
        """Signals of each vector, live against recorded (late ones get IRQ_WAIT)."""
        deadline = time.monotonic() + IRQ_WAIT
        while True:
            for vector, fd in self.irq_fds.items():
                self.count_irqs(vector, fd, close=False)
            missing = any(self.live_irqs[v] < n for v, n in self.recording.irqs.items())
            if not missing or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        for index, vector in sorted(set(self.recording.irqs) | set(self.live_irqs)):
            recorded, live = self.recording.irqs[index, vector], self.live_irqs[index, vector]
            if recorded == live:
                self.outcome.matched += 1
            else:
                self.diverge(0, f"interrupts: {irq_name(index)} vector {vector} raised "
                                f"{recorded} time(s) in the recording, {live} live",
                             [("irq.count", [recorded], [live])])

    def dma_memory(self, msg: Message) -> list[int]:
        _, _, offset, iova, size = unpack(proto.DmaMap, msg.data)
        if not msg.fds:
            self.memory.windows[iova] = mmap.mmap(-1, size)
            return []
        fd = os.memfd_create("vfu-replay-dma")
        os.ftruncate(fd, max(offset + size, msg.fds[0].get("size") or 0))
        self.memory.windows[iova] = mmap.mmap(fd, size, offset=offset)
        return [fd]

    # --- receiving -------------------------------------------------------------

    def receive(self) -> None:
        peer, frame = self.next_frame()
        h = proto.parse_header(frame.data)
        if h is None:
            raise ReplayError("the server sent a message shorter than a header")
        if not h.is_reply:
            self.server_command(peer, frame)
            return
        if self.duplicates[h.msg_id] and h.msg_id not in self.waiting:
            self.duplicates[h.msg_id] -= 1       # the answer to a duplicate: not compared
            print(f"replay: {h.command_name} reply to a duplicated request (not compared)",
                  file=self.out)
            return
        entry = self.waiting.pop(h.msg_id, None)
        if entry is None:
            raise ReplayError(f"the server answered msg_id {h.msg_id:#x}, which is not pending")
        self.replies_seen += 1
        index, request = entry
        reply_index = self.replies.get(index)
        if reply_index is None:
            self.diverge(self.recorded[index][0], "reply to a request the recording left "
                                                  "unanswered", [])
        else:
            number, rec = self.recorded[reply_index]
            self.compare(number, f"{h.command_name} reply", rec.data, rec.fds, frame, request,
                         self.recorded[index][1].data)
        keep = REPLY_FDS.get(proto.FD_CARRIERS.get((h.cmd, "reply")))
        if keep is not None:
            keep(self, frame)
        for fd in frame.fds:
            os.close(fd)

    def next_frame(self) -> tuple[Peer, Frame]:
        if self.injected:
            return self.main, self.injected.pop(0)
        peers = [p for p in (self.main, self.twin) if p is not None]
        for peer in peers:
            if peer.conn.buffered():
                return peer, peer.recv()
        ready, _, _ = select.select([p.conn for p in peers], [], [], REPLY_TIMEOUT)
        if not ready:
            raise ReplayError(f"no answer from the server within {REPLY_TIMEOUT:.0f} s "
                              f"({len(self.waiting)} request(s) pending)")
        peer = next(p for p in peers if p.conn is ready[0])
        try:
            return peer, peer.recv()
        except PeerClosed:
            raise ReplayError("the server closed the connection in the middle of the replay "
                              f"after {self.outcome.sent} requests") from None

    def adopt_twin(self, frame: Frame) -> None:
        twin = parse_caps(frame.data[proto.HEADER_SIZE:]).get("twin_socket", {})
        index = twin.get("fd_index") if isinstance(twin, dict) else None
        if isinstance(index, int) and 0 <= index < len(frame.fds):
            sock = socket.socket(fileno=os.dup(frame.fds[index]))
            self.twin = Peer(MessageSocket(sock), "client", TWIN, self.recorder)

    def server_command(self, peer: Peer, frame: Frame) -> None:
        """Answer as recorded when it is the recorded command, else from our memory
        (or as a --fault says: an error, late, not at all)."""
        fault = self.fault(frame.data, frame.fds, S2C)
        if fault is not None and fault.action.name in ("errno", "drop", "close"):
            for fd in frame.fds:
                os.close(fd)
            if fault.answer is not None:
                peer.send(fault.answer)
            return
        if fault is not None and fault.action.name == "delay":
            time.sleep(fault.action.delay)
        if self.next_server_command >= len(self.server_commands):
            self.diverge(0, f"server command not in the recording: "
                            f"{proto.parse_header(frame.data).command_name}", [])
            self.memory.serve(peer, frame)
            return
        number, rec = self.server_commands[self.next_server_command]
        self.next_server_command += 1
        same = self.compare(number, "server command", rec.data, rec.fds, frame, None, None)
        answer = self.recorded_answer(rec)
        if same and answer is not None and proto.parse_header(rec.data).cmd == proto.CMD["DMA_READ"]:
            peer.send(reply_to(frame.data, answer.data[proto.HEADER_SIZE:]))
        else:
            self.memory.serve(peer, frame)

    def recorded_answer(self, command: Message) -> Message | None:
        index = next(i for i, (_, m) in enumerate(self.recorded) if m is command)
        reply = self.replies.get(index)
        return self.recorded[reply][1] if reply is not None else None

    # --- comparing ------------------------------------------------------------

    def compare(self, number: int, what: str, rec_data: bytes, rec_fds: list,
                frame: Frame, live_request: bytes | None, rec_request: bytes | None) -> bool:
        live_fds = [fd_info(fd) for fd in frame.fds]
        direction = "s2c"
        recorded = values_without(rec_data, rec_fds, direction, rec_request, self.ignore)
        live = values_without(frame.data, live_fds, direction, live_request, self.ignore)
        if recorded == live:
            self.outcome.matched += 1
            return True
        fields = [(name, recorded.get(name), live.get(name))
                  for name in sorted(set(recorded) | set(live))
                  if recorded.get(name) != live.get(name) and not _unrecorded(name, recorded)]
        if not fields:
            self.outcome.matched += 1
            return True
        self.diverge(number, what, fields)
        return False

    def diverge(self, number: int, what: str, fields: list[tuple[str, Any, Any]]) -> None:
        self.outcome.divergences.append(Divergence(number, what, fields))
        where = f" at recorded frame {number}" if number else ""
        print(f"DIVERGED{where}: {what}", file=self.out)
        width = max((len(name) for name, _, _ in fields), default=0)
        for name, recorded, live in fields:
            print(f"  {name:<{width}}  recorded {show_values(recorded)}  live {show_values(live)}",
                  file=self.out)


# What the replay makes for a recorded request's fds, and keeps of a live
# reply's, by what the command's family says they are for; a request's other
# fds are fresh ones of the recorded kinds, a reply's other fds are closed.
REQUEST_FDS = {proto.DMA_MEMORY: Replayer.dma_memory, proto.IRQ_EVENTFDS: Replayer.irq_eventfds}
REPLY_FDS = {proto.TWIN_SOCKET: Replayer.adopt_twin, proto.IOEVENTFDS: Replayer.keep_doorbells}


class Progress:
    """A line on stderr every few seconds, for sessions that take a while."""

    def __init__(self, label: str, every: float = 2.0) -> None:
        self.label, self.every = label, every
        self.next = time.monotonic() + every

    def tick(self, text: str) -> None:
        now = time.monotonic()
        if now >= self.next:
            print(f"{self.label}: {text}", file=sys.stderr, flush=True)
            self.next = now + self.every


def values_without(data: bytes, fds: list, direction: str, request: bytes | None,
            ignore: tuple[str, ...]) -> dict[str, list]:
    tree, _ = proto.dissect_message(data, proto.Context(direction, fds, request))
    return {name: values for name, values in tree.values().items()
            if not any(name == i or (i.endswith(".") and name.startswith(i)) for i in ignore)}


def _unrecorded(name: str, recorded: dict[str, list]) -> bool:
    """fd metadata the recording did not have (traces give only the kind)."""
    return name.startswith("fd.") and name not in recorded


def show_values(values: Any) -> str:
    if values is None:
        return "(absent)"
    parts = [v.hex() if isinstance(v, bytes) else str(v) for v in values]
    text = ",".join(parts)
    return text if len(text) <= 60 else text[:57] + "…"


def is_reply(msg: Message) -> bool:
    h = proto.parse_header(msg.data)
    return h is not None and h.is_reply


def recorded_replies(recorded: list[tuple[int, Message]]) -> dict[int, int]:
    """Index of each recorded request -> index of its recorded reply."""
    links = find_responses(m for _, m in recorded)
    return {request - 1: reply - 1 for request, reply in links.items()}


def _replies_before(recorded: list[tuple[int, Message]], replies: dict[int, int]) -> list[int]:
    """For each index: how many replies to client requests the client had by then."""
    answered = {reply for request, reply in replies.items()
                if recorded[request][1].direction == C2S}
    counts, seen = [], 0
    for index in range(len(recorded)):
        counts.append(seen)
        seen += index in answered
    return counts


def fresh_fd(meta: dict[str, Any]) -> int:
    kind = meta.get("kind")
    if kind == "eventfd":
        return os.eventfd(0, os.EFD_NONBLOCK)
    if kind == "socket":
        ours, theirs = socket.socketpair()
        ours.close()
        return theirs.detach()
    fd = os.memfd_create("vfu-replay")
    os.ftruncate(fd, meta.get("size") or 4096)
    return fd
