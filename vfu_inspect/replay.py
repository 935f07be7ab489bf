"""`vfu-inspect replay`: be the client of a recorded connection, against a live server.

The recorded client commands are sent in their recorded order, each after the
replies that the recorded client had received before sending it (so
pipelining and NO_REPLY stay as recorded), with fresh msg_ids and fresh fds
of the recorded kinds: memfds for DMA memory, eventfds for IRQs.  The
server's own DMA_READ/DMA_WRITE are answered from that memory, or with the
recorded answer when the command is the recorded one.  Every reply and
server command is dissected and compared field by field with the recording.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from .capture import C2S, MAIN, S2C, TWIN, CaptureReader, Message
from .dissect import Matcher, expects_reply
from .dissectors import vfio_user as proto
from .endpoints.common import (DmaMemory, Peer, Recorder, message, parse_caps, reply_to,
                               unpack)
from .framing import Frame
from .sockio import MessageSocket, PeerClosed, fd_info

# Fields that differ between any two runs and never count as divergence.
ALWAYS_IGNORED = ("frame.", "vfio_user.msg_id", "vfio_user.response_to",
                  "vfio_user.response_in", "vfio_user.time", "fd.inode")
REPLY_TIMEOUT = 10.0


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


def load_connection(path: str, conn: int | None) -> tuple[list[tuple[int, Message]], int]:
    """(capture frame number, message) of one connection; the first if conn is None."""
    picked: list[tuple[int, Message]] = []
    number = 0
    with CaptureReader(path) as reader:
        for record in reader:
            if not isinstance(record, Message):
                continue
            number += 1
            if conn is None:
                conn = record.conn
            if record.conn == conn:
                picked.append((number, record))
        damage = reader.damage
    if not picked:
        raise ReplayError(f"{path} has no messages on connection {conn}")
    if damage:
        print(f"vfu-inspect: warning: {path}: {damage}", file=sys.stderr)
    return picked, conn


class Replayer:
    def __init__(self, recorded: list[tuple[int, Message]], server: str,
                 ignore: list[str], out: TextIO, recorder: Recorder | None) -> None:
        self.recorded = recorded
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

    def run(self) -> Outcome:
        for index, (number, msg) in enumerate(self.recorded):
            if msg.direction != C2S or msg.channel != MAIN or is_reply(msg):
                continue
            while self.replies_seen < self.replies_before[index]:
                self.receive()
            self.send(index, msg)
        while self.waiting:
            self.receive()
        return self.outcome

    def send(self, index: int, msg: Message) -> None:
        h = proto.parse_header(msg.data)
        msg_id = self.main.new_id()
        data = message(msg_id, h.cmd, msg.data[proto.HEADER_SIZE:], h.flags, h.error)
        fds = self.recreate_fds(msg)
        self.main.send(data, fds)
        for fd in fds:
            os.close(fd)
        self.outcome.sent += 1
        self.progress.tick(f"{self.outcome.sent}/{self.total} requests sent, "
                           f"{len(self.outcome.divergences)} diverged")
        if expects_reply(h):
            self.waiting[msg_id] = (index, data)

    def recreate_fds(self, msg: Message) -> list[int]:
        h = proto.parse_header(msg.data)
        if h.cmd == proto.CMD["DMA_MAP"]:
            return self.dma_memory(msg)
        return [fresh_fd(meta) for meta in msg.fds]

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
        if h.cmd == proto.CMD["VERSION"]:
            self.adopt_twin(frame)
        else:
            for fd in frame.fds:
                os.close(fd)

    def next_frame(self) -> tuple[Peer, Frame]:
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
        for fd in frame.fds:
            os.close(fd)

    def server_command(self, peer: Peer, frame: Frame) -> None:
        """Answer as recorded when it is the recorded command, else from our memory."""
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
        print(f"DIVERGED at recorded frame {number}: {what}", file=self.out)
        width = max((len(name) for name, _, _ in fields), default=0)
        for name, recorded, live in fields:
            print(f"  {name:<{width}}  recorded {show_values(recorded)}  live {show_values(live)}",
                  file=self.out)


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
    matcher, links = Matcher(), {}
    for index, (_, m) in enumerate(recorded):
        h = proto.parse_header(m.data)
        if h is None:
            continue
        if h.is_reply:
            hit = matcher.reply(m.conn, m.channel, m.direction, h.msg_id)
            if hit is not None:
                links[hit[0]] = index
        elif expects_reply(h):
            matcher.request(m.conn, m.channel, m.direction, h.msg_id, index, None)
    return links


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
        return os.eventfd(0)
    if kind == "socket":
        ours, theirs = socket.socketpair()
        ours.close()
        return theirs.detach()
    fd = os.memfd_create("vfu-replay")
    os.ftruncate(fd, meta.get("size") or 4096)
    return fd
