"""The man-in-the-middle proxy core.

One selector loop relays every connection: each chunk read from one side is
sent on to the other side unchanged, with the fds that came with it, before
anything but the framer's boundary scan looks at it: a chunk with fds is sent
as two writes, split where the message owning the fds begins, so the receiver
gets them with that message.  Then the chunk goes through a `Framer`, and each whole
message is handed to the addons (capture, printing, monitor), as mitmproxy's
core hands flows to its addons.  The only message the relay itself reads is
the VERSION reply: when it hands the client a twin socket, the proxy puts a
socketpair of its own in between so that the twin channel is relayed too.
"""

from __future__ import annotations

import array
import errno
import json
import os
import selectors
import signal
import socket
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from .capture import C2S, CHANNELS, CLOSE, DIRECTIONS, MAIN, NOTE, OPEN, S2C, TWIN, Event, Message
from .dissect import Matcher, expects_reply
from .dissectors import vfio_user as proto
from .framing import Frame, Framer, answered_early
from .sockio import fd_info, recv_chunk


# Addons flush at most this long after a record: a write per message would be
# a syscall on the relay's hot path; a crash loses at most this much capture.
FLUSH_INTERVAL = 0.005


class Addon(Protocol):
    """What the proxy tells its addons; every hook is optional."""

    def record(self, record: Message | Event) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class ProxyError(Exception):
    """The proxy cannot start (socket in use, bad path …)."""


@dataclass(eq=False)
class Side:
    """One socket of a relayed channel: what it sends goes to `peer`."""

    sock: socket.socket
    name: str                                   # "client" or "server"
    conn: Connection
    channel: int
    direction: int                              # of the bytes read from this side
    peer: Side | None = None
    framer: Framer = field(default_factory=Framer)
    queue: list[tuple[memoryview, list[int]]] = field(default_factory=list)
    closing: bool = False                       # close once the queue is sent
    closed: bool = False
    events: int = 0                             # what the selector watches for


@dataclass(eq=False)
class Connection:
    id: int
    sides: list[Side] = field(default_factory=list)
    matcher: Matcher = field(default_factory=Matcher)
    closed: bool = False

    def channel(self, client_sock: socket.socket, server_sock: socket.socket,
                channel: int) -> None:
        """Add a client/server socket pair relayed as `channel`."""
        client = Side(client_sock, "client", self, channel, C2S)
        server = Side(server_sock, "server", self, channel, S2C, peer=client)
        client.peer = server
        self.sides += [client, server]


class Proxy:
    """Listens for clients and relays each to a fresh connection to the server."""

    def __init__(self, listen: str, server: str, addons: list[Any],
                 mode: int = 0o600, log: Callable[[str], None] | None = None) -> None:
        self.listen_path = listen
        self.server_path = server
        self.addons = addons
        self.mode = mode
        self.log = log or (lambda text: None)
        self.selector = selectors.DefaultSelector()
        self.connections: dict[int, Connection] = {}
        self._next_conn = 0
        self._stopping = False
        self._listener: socket.socket | None = None
        self._wakeup_r, self._wakeup_w = socket.socketpair()

    # --- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self._listener = listen_unix(self.listen_path, self.mode)
        self._listener.setblocking(False)
        self.selector.register(self._listener, selectors.EVENT_READ, self._accept)
        self._wakeup_r.setblocking(False)
        self._wakeup_w.setblocking(False)
        self.selector.register(self._wakeup_r, selectors.EVENT_READ, self._wakeup)

    def stop(self) -> None:
        """Ask the loop to end; safe from a signal handler or another thread."""
        self._stopping = True
        try:
            self._wakeup_w.send(b"\0")
        except OSError:
            pass

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop())

    def run(self) -> None:
        """Relay until stop(); then close everything and flush the addons."""
        last_flush, dirty = time.monotonic(), False
        try:
            while not self._stopping:
                ready = self.selector.select(FLUSH_INTERVAL if dirty else None)
                for key, events in ready:
                    if isinstance(key.data, Side):
                        self._ready(key.data, events)
                    else:
                        key.data(key.fileobj, events)
                dirty = dirty or bool(ready)
                if dirty and (not ready or time.monotonic() - last_flush >= FLUSH_INTERVAL):
                    self._emit_flush()
                    last_flush, dirty = time.monotonic(), False
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        for conn in list(self.connections.values()):
            self._close_connection(conn, "proxy", "proxy stopped")
        if self._listener is not None:
            self.selector.unregister(self._listener)
            self._listener.close()
            unlink_socket(self.listen_path)
        self.selector.close()
        self._wakeup_r.close()
        self._wakeup_w.close()
        for addon in self.addons:
            addon.close()

    def _wakeup(self, sock: socket.socket, events: int) -> None:
        try:
            sock.recv(64)
        except BlockingIOError:
            pass

    # --- connections -------------------------------------------------------------

    def _accept(self, listener: socket.socket, events: int) -> None:
        try:
            client_sock, _ = listener.accept()
        except BlockingIOError:
            return
        conn = Connection(self._next_conn)
        self._next_conn += 1
        self._emit(Event(OPEN, time.time_ns(), conn.id, {"server": self.server_path}))
        server_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            server_sock.connect(self.server_path)
        except OSError as exc:
            server_sock.close()
            client_sock.close()
            reason = f"cannot connect to server {self.server_path}: {exc.strerror or exc}"
            self.log(f"conn {conn.id}: {reason}")
            self._emit(Event(CLOSE, time.time_ns(), conn.id,
                             {"by": "proxy", "reason": reason, "unanswered": []}))
            return
        self.connections[conn.id] = conn
        self._add_channel(conn, client_sock, server_sock, MAIN)
        self.log(f"conn {conn.id}: client connected, relaying to {self.server_path}")

    def _add_channel(self, conn: Connection, client_sock: socket.socket,
                     server_sock: socket.socket, channel: int) -> None:
        conn.channel(client_sock, server_sock, channel)
        for side in conn.sides[-2:]:
            side.sock.setblocking(False)
            self._watch(side)

    def _watch(self, side: Side) -> None:
        """Read from a side unless its peer is backed up; write while it has a queue."""
        if side.closed:
            return
        mask = 0
        if not side.closing and side.peer is not None and not side.peer.queue:
            mask |= selectors.EVENT_READ
        if side.queue:
            mask |= selectors.EVENT_WRITE
        if mask == side.events:
            return                                  # spare the epoll_ctl call
        if mask and side.events:
            self.selector.modify(side.sock, mask, side)
        elif mask:
            self.selector.register(side.sock, mask, side)
        else:
            self.selector.unregister(side.sock)
        side.events = mask

    def _ready(self, side: Side, events: int) -> None:
        if side.closed:
            return
        if events & selectors.EVENT_WRITE:
            self._send_queued(side)
        if events & selectors.EVENT_READ and not side.closed and not side.peer.queue:
            self._relay(side)

    # --- relaying -------------------------------------------------------------------

    def _relay(self, src: Side) -> None:
        conn, dst = src.conn, src.peer
        try:
            data, fds = recv_chunk(src.sock)
        except BlockingIOError:
            return
        except OSError as exc:
            self._close_connection(conn, src.name, f"receive from {src.name} failed: {exc}")
            return
        if not data:
            _close_all(fds)
            self._close_connection(conn, src.name, f"{src.name} closed the connection")
            return
        now = time.time_ns()
        view = memoryview(data)
        if fds:
            # The fds go on the first byte of their own message, which must be
            # the first byte of a sendmsg: see framing.
            owner = src.framer.fd_owner(data)
            frames = src.framer.feed(data, [fd_info(fd) for fd in fds])
            if src.channel == MAIN and src.direction == S2C:
                fds = self._interpose_twin(conn, frames, fds)
            if owner:
                dst.queue.append((view[:owner], []))
            dst.queue.append((view[owner:], fds))
        else:
            frames = src.framer.feed(data)
            dst.queue.append((view, []))
        self._send_queued(dst)
        for frame in frames:
            for early in answered_early(frame, dst.framer, lambda msg_id: conn.matcher.waiting(
                    conn.id, src.channel, dst.direction, msg_id)):
                self._track(dst, early.data, now)
                self._emit_frame(dst, early, now)
            self._track(src, frame.data, now)
            self._emit_frame(src, frame, now)

    def _emit_frame(self, src: Side, frame: Frame, now: int) -> None:
        self._emit(Message(now, src.conn.id, src.channel, src.direction, frame.data,
                           frame.fds, frame.size if frame.truncated else None))
        if frame.error:
            self._emit(Event(NOTE, now, src.conn.id, {
                "text": frame.error, "channel": CHANNELS[src.channel],
                "dir": DIRECTIONS[src.direction]}))

    def _send_queued(self, side: Side) -> None:
        while side.queue:
            data, fds = side.queue[0]
            try:
                sent = side.sock.sendmsg([data], _rights(fds))
            except BlockingIOError:
                break
            except OSError as exc:
                self._close_connection(side.conn, side.name,
                                       f"send to {side.name} failed: {exc.strerror or exc}")
                return
            _close_all(fds)     # the kernel holds its own references now
            if sent < len(data):
                side.queue[0] = (data[sent:], [])
            else:
                side.queue.pop(0)
        if side.closing and not side.queue:
            self._close_side(side)
            return
        self._watch(side)
        if side.peer is not None:
            self._watch(side.peer)

    def _track(self, src: Side, data: bytes, now: int) -> None:
        """Keep the requests still unanswered, for the close record."""
        header = proto.parse_header(data)
        if header is None:
            return
        key = (src.conn.id, src.channel, src.direction, header.msg_id)
        if header.is_reply:
            src.conn.matcher.reply(*key)
        elif expects_reply(header):
            src.conn.matcher.request(*key, now, {
                "msg_id": header.msg_id, "cmd": header.command_name,
                "channel": CHANNELS[src.channel], "dir": DIRECTIONS[src.direction]})

    # --- twin socket -----------------------------------------------------------------

    def _interpose_twin(self, conn: Connection, frames: list, fds: list[int]) -> list[int]:
        """Swap the server's twin socket for one end of our own socketpair."""
        index = _twin_fd_index(frames)
        if index is None:
            return fds
        if not 0 <= index < len(fds):
            self._note(conn, f"VERSION reply names twin fd_index {index} but carries "
                             f"{len(fds)} fds: twin channel not relayed")
            return fds
        server_twin = socket.socket(fileno=os.dup(fds[index]))
        client_end, proxy_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = list(fds)
        os.close(fds[index])
        fds[index] = client_end.detach()
        self._add_channel(conn, proxy_end, server_twin, TWIN)
        self._note(conn, "twin socket negotiated: relayed as channel twin")
        return fds

    def _note(self, conn: Connection, text: str) -> None:
        self.log(f"conn {conn.id}: {text}")
        self._emit(Event(NOTE, time.time_ns(), conn.id, {"text": text}))

    # --- closing -------------------------------------------------------------------

    def _close_connection(self, conn: Connection, by: str, reason: str) -> None:
        """One side went away: the other side sees the close too."""
        if conn.closed:
            return
        conn.closed = True
        now = time.time_ns()
        for side in conn.sides:
            leftover = side.framer.close()
            if leftover is not None:
                self._emit_frame(side, leftover, now)
        for side in conn.sides:
            if side.queue and side.name != by and not side.closed:
                side.closing = True      # deliver what was sent before the close
                self._watch(side)
            else:
                self._close_side(side)
        unanswered = conn.matcher.outstanding()
        self.log(f"conn {conn.id}: {reason}"
                 + (f"; {len(unanswered)} request(s) unanswered" if unanswered else ""))
        self._emit(Event(CLOSE, time.time_ns(), conn.id,
                         {"by": by, "reason": reason, "unanswered": unanswered}))

    def _close_side(self, side: Side) -> None:
        if side.closed:
            return
        if side.events:
            self.selector.unregister(side.sock)
            side.events = 0
        for _, fds in side.queue:
            _close_all(fds)
        side.queue.clear()
        side.sock.close()
        side.closed = True
        conn = side.conn
        if conn.closed and all(s.closed for s in conn.sides):
            self.connections.pop(conn.id, None)

    # --- addons --------------------------------------------------------------------

    def _emit(self, record: Message | Event) -> None:
        for addon in self.addons:
            addon.record(record)

    def _emit_flush(self) -> None:
        for addon in self.addons:
            addon.flush()


def _twin_fd_index(frames: list) -> int | None:
    """fd_index of the twin socket if one of these frames is a VERSION reply offering it."""
    for frame in frames:
        header = proto.parse_header(frame.data)
        if header is None or header.cmd != proto.CMD["VERSION"] or not header.is_reply:
            continue
        text = frame.data[proto.HEADER_SIZE + 4:].rstrip(b"\0")
        try:
            twin = json.loads(text)["capabilities"]["twin_socket"]
        except (ValueError, KeyError, TypeError):
            return None
        if isinstance(twin, dict) and twin.get("supported") and isinstance(
                twin.get("fd_index"), int):
            return twin["fd_index"]
    return None


def _rights(fds: list[int]) -> list[tuple[int, int, bytes]]:
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def _close_all(fds: Any) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# --- the listening socket ---------------------------------------------------------------

def listen_unix(path: str, mode: int = 0o600) -> socket.socket:
    """Listen on `path`, replacing only a stale socket, never another file."""
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ProxyError(f"cannot listen on {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    sock.listen(16)
    return sock


def _clear_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ProxyError(f"{path} exists and is not a socket: refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)         # nobody listens: a leftover from a dead process
        return
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise ProxyError(f"cannot use {path}: {exc.strerror}") from None
        return
    finally:
        probe.close()
    raise ProxyError(f"{path} is in use by another process")


def unlink_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass
