"""`vfu-inspect serve`: be the server of a recorded session.

Each client request is answered with the recorded reply of the first unused
recorded request that has the same command and the same fields (less the
ones that always differ and those named with --ignore), as mitmproxy's
server replay does.  Recorded fds are recreated (memfds of the recorded
sizes, eventfds, a socketpair for the twin socket), and the recorded server
commands that the server sent while a request was in flight are sent again,
on their channel, before its reply.  The n-th client connection is served
recorded connection n, unless --conn picks one for all.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from typing import TextIO

from .capture import CaptureReader
from .dissectors import vfio_user as proto
from .endpoints.common import Peer, error_to, message, parse_caps, reply_to
from .errors import ListenError
from .framing import Frame
from .records import C2S, S2C, TWIN, Message
from .replay import ALWAYS_IGNORED, Progress, ReplayError, fresh_fd, is_reply, recorded_replies, values_without
from .sockio import MessageSocket, PeerClosed, listen_unix, unlink_socket


def load_connections(path: str) -> dict[int, list[Message]]:
    by_conn: dict[int, list[Message]] = {}
    with CaptureReader(path) as reader:
        for record in reader:
            if isinstance(record, Message):
                by_conn.setdefault(record.conn, []).append(record)
    if not by_conn:
        raise ReplayError(f"{path} holds no messages")
    return by_conn


class RecordedServer:
    """Serves one client from one recorded connection."""

    def __init__(self, recorded: list[Message], sock: socket.socket, ignore: list[str],
                 out: TextIO, close_on_unknown: bool) -> None:
        self.recorded = recorded
        self.replies = recorded_replies([(i, m) for i, m in enumerate(recorded)])
        self.used: set[int] = set()
        self.sent_commands: set[int] = set()
        self.ignore = tuple(ALWAYS_IGNORED) + tuple(ignore)
        self.out = out
        self.close_on_unknown = close_on_unknown
        self.main = Peer(MessageSocket(sock), "server")
        self.twin: Peer | None = None
        self.backlog: list[Frame] = []
        self.answered = self.unknown = 0
        self.progress = Progress("serve")

    def run(self) -> None:
        try:
            while True:
                frame = self.backlog.pop(0) if self.backlog else self.main.recv()
                if not self.handle(frame):
                    return
        except PeerClosed:
            pass
        finally:
            self.main.conn.close()

    def handle(self, frame: Frame) -> bool:
        for fd in frame.fds:
            os.close(fd)
        h = proto.parse_header(frame.data)
        if h is None or h.is_reply:
            return True
        index = self.match(frame)
        if index is None:
            self.unknown += 1
            print(f"serve: no recorded answer for {h.command_name} "
                  f"(msg_id {h.msg_id:#x}, {len(frame.data)} bytes)", file=self.out)
            if self.close_on_unknown:
                return False
            if not h.no_reply:
                self.main.send(error_to(frame.data, errno.EINVAL))
            return True
        self.used.add(index)
        self.answered += 1
        self.progress.tick(f"{self.answered} requests answered, {self.unknown} without an answer")
        self.send_server_commands(index)
        reply = self.replies.get(index)
        if reply is not None and not h.no_reply:
            self.send_reply(frame.data, self.recorded[reply])
        return True

    def match(self, frame: Frame) -> int | None:
        live = values_without(frame.data, [], "c2s", None, self.ignore)
        for index, m in enumerate(self.recorded):
            if index in self.used or m.direction != C2S or is_reply(m):
                continue
            if m.data[2:4] == frame.data[2:4] and \
                    values_without(m.data, [], "c2s", None, self.ignore) == live:
                return index
        return None

    def send_reply(self, request: bytes, recorded: Message) -> None:
        fds = [fresh_fd(meta) for meta in recorded.fds]
        h = proto.parse_header(recorded.data)
        payload = recorded.data[proto.HEADER_SIZE:]
        if h.is_error:
            data = message(proto.parse_header(request).msg_id, h.cmd, payload, h.flags, h.error)
        else:
            data = reply_to(request, payload)
        if fds and proto.FD_CARRIERS.get((h.cmd, "reply")) == proto.TWIN_SOCKET:
            fds = self.make_twin(recorded, fds)
        self.main.send(data, fds)
        for fd in fds:
            os.close(fd)

    def make_twin(self, recorded: Message, fds: list[int]) -> list[int]:
        twin = parse_caps(recorded.data[proto.HEADER_SIZE:]).get("twin_socket", {})
        index = twin.get("fd_index") if isinstance(twin, dict) else None
        if isinstance(index, int) and 0 <= index < len(fds):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            os.close(fds[index])
            fds[index] = theirs.detach()
            self.twin = Peer(MessageSocket(ours), "server", TWIN)
        return fds

    def send_server_commands(self, request: int) -> None:
        """Recorded server commands between this request and its reply (or the next request)."""
        end = self.replies.get(request)
        if end is None:
            end = next((i for i in range(request + 1, len(self.recorded))
                        if self.recorded[i].direction == C2S and not is_reply(self.recorded[i])),
                       len(self.recorded))
        for index in range(request + 1, end):
            m = self.recorded[index]
            if m.direction != S2C or is_reply(m) or index in self.sent_commands:
                continue
            self.sent_commands.add(index)
            peer = self.twin if m.channel == TWIN and self.twin else self.main
            h = proto.parse_header(m.data)
            msg_id = peer.new_id()
            peer.send(message(msg_id, h.cmd, m.data[proto.HEADER_SIZE:], h.flags))
            self.await_reply(peer, msg_id)

    def await_reply(self, peer: Peer, msg_id: int) -> None:
        while True:
            frame = peer.recv()
            h = proto.parse_header(frame.data)
            if h is not None and h.is_reply and h.msg_id == msg_id:
                return
            self.backlog.append(frame)


def serve_recording(path: str, listen: str, conn: int | None, ignore: list[str],
                    close_on_unknown: bool, out: TextIO = sys.stdout,
                    max_clients: int | None = None) -> int:
    """Serve clients one after another; returns how many requests had no answer."""
    recorded = load_connections(path)
    conns = sorted(recorded)
    try:
        listener = listen_unix(listen)
    except ListenError as exc:
        raise ReplayError(str(exc)) from None
    served = unknown = 0
    try:
        while max_clients is None or served < max_clients:
            sock, _ = listener.accept()
            pick = conn if conn is not None else conns[min(served, len(conns) - 1)]
            if pick not in recorded:
                raise ReplayError(f"{path} has no connection {pick}")
            server = RecordedServer(recorded[pick], sock, ignore, out, close_on_unknown)
            server.run()
            print(f"serve: client {served} (recorded connection {pick}): {server.answered} "
                  f"requests answered, {server.unknown} without a recorded answer", file=out)
            served += 1
            unknown += server.unknown
    except KeyboardInterrupt:
        pass
    finally:
        listener.close()
        unlink_socket(listen)
    return unknown
