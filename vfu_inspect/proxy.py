"""The man-in-the-middle proxy core.

One selector loop relays every connection: each chunk read from one side is
sent on to the other side unchanged, with the fds that came with it, before
anything but the framer's boundary scan looks at it: a chunk with fds is sent
as two writes, split where the message owning the fds begins, so the receiver
gets them with that message.  Then the addons (capture, printing, monitor)
get it as typed events (proxy_events), as mitmproxy's core hands flows to
its addons: the usual chunk, whole messages without fds, as one
MessageRelayed or, when a peer pipelines, one BurstRelayed; any other goes
through a `Framer`, and each message it completes as a MessageRelayed.  The
only message the relay itself reads is the VERSION reply: when it hands the
client a twin socket, the proxy puts a socketpair of its own in between so
that the twin channel is relayed too.

Two options change what is relayed, and only they do.  --trace-irqs
(`irqs.IrqTracer`) puts the proxy's eventfds in place of the interrupt and
doorbell eventfds the peers pass, and records each signal.  --fault
(`faults.Gate`, one per side) lets each message pass at once unless a rule
may match its header; such a message is held until whole, and the fault a
rule decides on is carried out here: an error reply, a delay, a drop, a
close, a rewritten, cut or duplicated message.
"""

from __future__ import annotations

import array
import heapq
import itertools
import json
import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from .dissect import Matcher
from .dissectors import vfio_user as proto
from .faults import FaultInjector, Gate, Verdict
from .framing import Frame, Framer, answered_early
from .irqs import SET_IRQS, IrqTracer
from .offload import Dissection
from .proxy_events import (PROXY_EVENTS, BurstRelayed, ConnectionClosed, ConnectionOpened,
                           FaultInjected, MessageRelayed, Note, ProxyEvent, hooks)
from .records import C2S, CHANNELS, DIRECTIONS, MAIN, S2C, TWIN
from .sockio import fd_info, listen_unix, recv_chunk, unlink_socket


# Addons flush at most this long after a record: a write per message would be
# a syscall on the relay's hot path; a crash loses at most this much capture.
FLUSH_INTERVAL = 0.005
_HEADER = proto.Header.vfu_compiled.struct     # msg_id, cmd, msg_size, flags, error


class Addon(Protocol):
    """What the proxy calls on its addons; every hook is optional.

    An event goes to the method its class names (`message`,
    `connection_opened`, `connection_closed`, `note`, `interrupt`,
    `doorbell`, `fault`), else to `event`.  `flush` comes once per loop turn
    with traffic, `done` when the proxy stops.  An addon with
    `wants_dissection` runs in a child process and gets all of them there
    (offload.Dissection), and each message as MessageDissected
    (`message_dissected`) instead.
    """

    wants_dissection: bool
    def event(self, event: ProxyEvent) -> None: ...
    def flush(self) -> None: ...
    def done(self) -> None: ...


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
    gate: Gate | None = None                    # with --fault: what holds messages back
    wait_until: float = 0.0                     # a delay fault holds the queue (monotonic)


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
                 mode: int = 0o600, log: Callable[[str], None] | None = None,
                 faults: FaultInjector | None = None, trace_irqs: bool = False) -> None:
        self.listen_path = listen
        self.server_path = server
        self.addons = [Dissection(addon) if getattr(addon, "wants_dissection", False)
                       else addon for addon in addons]
        found = [hooks(addon) for addon in self.addons]
        self._hooks = {cls: [h[cls] for h in found if cls in h] for cls in PROXY_EVENTS}
        self._message_hook = self._only_hook(MessageRelayed)
        self._burst_hook = self._only_hook(BurstRelayed)
        self._flushes = [a.flush for a in self.addons if hasattr(a, "flush")]
        self.mode = mode
        self.log = log or (lambda text: None)
        self.selector = selectors.DefaultSelector()
        self.connections: dict[int, Connection] = {}
        self.faults = faults
        self.tracer = IrqTracer(self._watch_fd, self._unwatch_fd, self._emit) \
            if trace_irqs else None
        self._next_conn = 0
        self._stopping = False
        self._listener: socket.socket | None = None
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._timers: list[tuple[float, int, Side]] = []     # delayed queues, soonest first
        self._timer_order = itertools.count()

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
                timeout = FLUSH_INTERVAL if dirty else None
                if self._timers:
                    due = max(self._timers[0][0] - time.monotonic(), 0.0)
                    timeout = due if timeout is None else min(timeout, due)
                ready = self.selector.select(timeout)
                if self._timers:
                    self._fire_timers()
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
        if self.tracer is not None:
            self.tracer.close()
        if self._listener is not None:
            self.selector.unregister(self._listener)
            self._listener.close()
            unlink_socket(self.listen_path)
        self.selector.close()
        self._wakeup_r.close()
        self._wakeup_w.close()
        for addon in self.addons:
            if hasattr(addon, "done"):
                addon.done()
            if isinstance(addon, Dissection) and addon.exit_code:
                self.log(f"{addon.name}: its process ended with status {addon.exit_code}: "
                         "the events after that were not dissected")
            elif isinstance(addon, Dissection) and addon.dropped:
                self.log(f"{addon.name}: {addon.dropped} events not dissected: "
                         "it fell behind the relay")

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
        self._emit(self._opened(conn))
        server_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            server_sock.connect(self.server_path)
        except OSError as exc:
            server_sock.close()
            client_sock.close()
            reason = f"cannot connect to server {self.server_path}: {exc.strerror or exc}"
            self.log(f"conn {conn.id}: {reason}")
            self._emit(ConnectionClosed(time.time_ns(), conn.id, "proxy", reason))
            return
        self.connections[conn.id] = conn
        self._add_channel(conn, client_sock, server_sock, MAIN)
        self.log(f"conn {conn.id}: client connected, relaying to {self.server_path}")

    def _opened(self, conn: Connection) -> ConnectionOpened:
        """The server, and what changes what is relayed."""
        faults = [rule.text for rule in self.faults.rules] if self.faults is not None else None
        return ConnectionOpened(time.time_ns(), conn.id, self.server_path,
                                self.tracer is not None, faults)

    def _add_channel(self, conn: Connection, client_sock: socket.socket,
                     server_sock: socket.socket, channel: int) -> None:
        conn.channel(client_sock, server_sock, channel)
        for side in conn.sides[-2:]:
            side.sock.setblocking(False)
            if self.faults is not None:
                side.gate = Gate(self.faults, conn.id, channel, side.direction)
            self._watch(side)

    def _watch(self, side: Side) -> None:
        """Read from a side unless its peer is backed up; write while it has a queue."""
        if side.closed:
            return
        mask = 0
        if not side.closing and side.peer is not None and not side.peer.queue:
            mask |= selectors.EVENT_READ
        if side.queue and not side.wait_until:
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
        sizes = None if fds or dst.framer.assembling else src.framer.whole(data)
        gate = src.gate
        if sizes is not None and (gate is None or not gate.faults and gate.all_pass(data, 0, 0)):
            self._relay_whole(src, dst, data, sizes, now)
        else:
            self._relay_framed(src, dst, data, fds, now)

    def _relay_whole(self, src: Side, dst: Side, data: bytes, sizes: list[int],
                     now: int) -> None:
        """The usual chunk: whole messages without fds, that no fault rule
        holds; one message, or a burst when the peer pipelines."""
        self._forward(dst, data, [], 0)
        self._record_whole(src, data, sizes, now)

    def _record_whole(self, src: Side, data: bytes, sizes: list[int], now: int) -> None:
        """Pair a relayed chunk of whole messages and hand it to the addons."""
        self._track_messages(src, data, sizes, now)
        conn, channel, direction = src.conn.id, src.channel, src.direction
        if len(sizes) == 1:
            self._message_hook(MessageRelayed(now, conn, channel, direction, data))
        else:
            self._burst_hook(BurstRelayed(now, conn, channel, direction, data, sizes))

    def _relay_framed(self, src: Side, dst: Side, data: bytes, fds: list[int],
                      now: int) -> None:
        """Any other chunk: cut by the framer; its fds go with their message."""
        conn = src.conn
        view = memoryview(data)
        owner = 0
        if fds:
            # The fds go on the first byte of their own message, which must be
            # the first byte of a sendmsg: see framing.
            owner = src.framer.fd_owner(data)
            frames = src.framer.feed(data, [fd_info(fd) for fd in fds])
            if src.channel == MAIN:
                fds = self._interpose(conn, src, frames, fds)
        else:
            frames = src.framer.feed(data)
        closing = None
        if src.gate is None or src.gate.all_pass(view, len(fds), owner):
            self._forward(dst, data, fds, owner)
        else:
            closing = self._gated(src, dst, view, fds, owner)
            self._send_queued(dst)
        if dst.framer.assembling:       # rare: a reply may answer what it assembles
            self._answered_early(src, dst, frames, now)
        if src.gate is not None and src.gate.faults:
            self._emit_faulted(src, frames, now)
        else:
            self._pass_on(src, frames, now)
        if closing:
            self._close_connection(conn, "proxy", f"fault: {closing}")

    def _interpose(self, conn: Connection, src: Side, frames: list[Frame],
                   fds: list[int]) -> list[int]:
        """The fds to pass on: our socketpair for a twin socket, our eventfds
        for interrupts and doorbells (--trace-irqs)."""
        if src.direction == S2C:
            fds = self._interpose_twin(conn, frames, fds)
        if self.tracer is not None and frames and frames[-1].fds:
            fds = self.tracer.interpose(conn.id, src.direction, frames[-1], fds)
        return fds

    def _answered_early(self, src: Side, dst: Side, frames: list[Frame], now: int) -> None:
        """Before a reply, the request `dst` is assembling that it answers (framing)."""
        conn = src.conn
        for frame in frames:
            early = answered_early(frame, dst.framer, lambda msg_id: conn.matcher.waiting(
                conn.id, src.channel, dst.direction, msg_id))
            self._pass_on(dst, early, now)

    def _pass_on(self, src: Side, frames: list[Frame], now: int) -> None:
        """Whole messages: into the matcher, then to the addons."""
        self._track(src, frames, now)
        self._emit_frames(src, frames, now)

    def _emit_frames(self, src: Side, frames: list[Frame], now: int) -> None:
        # the relay's work for each message: kept to this loop and _track's
        conn, channel, direction, to_addons = (src.conn.id, src.channel, src.direction,
                                               self._message_hook)
        for frame in frames:
            to_addons(MessageRelayed(now, conn, channel, direction, frame.data, frame.fds,
                                     frame.size if frame.truncated else None))
            if frame.error:
                self._emit(Note(now, conn, frame.error, channel, direction))

    def _forward(self, dst: Side, data: bytes, fds: list[int], owner: int) -> None:
        """Send a chunk on as it came, its fds with the byte at `owner`."""
        if fds or dst.queue or dst.wait_until or dst.closing:
            view = memoryview(data)
            if owner:
                dst.queue.append((view[:owner], []))
            dst.queue.append((view[owner:], fds))
            self._send_queued(dst)
        else:
            self._send_now(dst, data)

    def _send_now(self, side: Side, data: bytes) -> None:
        """The usual chunk, without fds, with nothing queued before it: one
        send, and the queue's bookkeeping only for what the socket did not take."""
        try:
            sent = side.sock.send(data)
        except OSError:
            sent = 0            # _send_queued retries it, and reports an error
        if sent < len(data):
            side.queue.append((memoryview(data)[sent:], []))
            self._send_queued(side)

    def _send_queued(self, side: Side) -> None:
        if side.wait_until:
            if time.monotonic() < side.wait_until:     # a delay fault: its timer sends
                self._watch(side)
                self._watch(side.peer)
                return
            side.wait_until = 0.0
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

    def _track(self, src: Side, frames: list[Frame], now: int) -> None:
        for frame in frames:
            if len(frame.data) >= proto.HEADER_SIZE:
                self._track_messages(src, frame.data, (len(frame.data),), now, bool(frame.fds))

    def _track_messages(self, src: Side, data: bytes, sizes: Sequence[int], now: int,
                        with_fds: bool = False) -> None:
        """Keep the requests still unanswered, for the close record (and
        answered_early); with --trace-irqs, show the tracer each SET_IRQS."""
        conn, channel, direction, matcher = (src.conn.id, src.channel, src.direction,
                                             src.conn.matcher)
        tracer = self.tracer if channel == MAIN else None
        start = 0
        for size in sizes:
            msg_id, cmd, _, flags, _ = _HEADER.unpack_from(data, start)
            kind = flags & proto.FLAG_TYPE_MASK
            if kind == proto.TYPE_REPLY:
                matcher.reply(conn, channel, direction, msg_id)
            elif kind == proto.TYPE_COMMAND and not flags & proto.FLAG_NO_REPLY:
                matcher.request(conn, channel, direction, msg_id, now,
                                (msg_id, cmd, channel, direction))
            if tracer is not None and cmd == SET_IRQS:
                message = data[start:start + size]
                tracer.message(conn, direction, proto.parse_header(message), message, with_fds)
            start += size

    # --- faults --------------------------------------------------------------------

    def _gated(self, src: Side, dst: Side, view: memoryview, fds: list[int],
               owner: int) -> str | None:
        """Queue what the gate lets through and carry out its faults; why to
        close the connection, when a fault says so."""
        pieces = src.gate.feed(view, fds, owner)
        for n, piece in enumerate(pieces):
            if piece.__class__ is tuple:
                dst.queue.append(piece)
                continue
            reason = self._carry_out(src, dst, piece)
            if reason:
                for rest in pieces[n + 1:]:
                    _close_all(rest.fds if isinstance(rest, Verdict) else rest[1])
                return reason
        return None

    def _carry_out(self, src: Side, dst: Side, verdict: Verdict) -> str | None:
        fault, fds = verdict.fault, verdict.fds
        action = fault.action
        if not fault.delivered:
            _close_all(fds)
            if action.name == "errno":
                self._answer(src, dst, fault.answer)
            return fault.info["effect"] if action.name == "close" else None
        if action.name == "delay":
            self._send_queued(dst)              # what came before it is not delayed
            dst.wait_until = time.monotonic() + action.delay
            heapq.heappush(self._timers, (dst.wait_until, next(self._timer_order), dst))
        dst.queue.append((fault.data, fds))
        if action.name == "duplicate":
            dst.queue.append((fault.data, [os.dup(fd) for fd in fds]))
        return fault.info["effect"] if action.name == "close" else None

    def _answer(self, src: Side, dst: Side, reply: bytes) -> None:
        """Send src a reply the proxy made, between two of the messages going to it."""
        if dst.gate.answer(reply):
            src.queue.append((reply, []))
            self._send_queued(src)

    def _fire_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, side = heapq.heappop(self._timers)
            if side.wait_until and side.wait_until <= now and not side.closed:
                self._send_queued(side)

    def _emit_faulted(self, src: Side, frames: list[Frame], now: int) -> None:
        """The chunk's messages, each a fault acted on preceded by its record and
        recorded as delivered (as received when it was not delivered)."""
        first = src.gate.completed() - len(frames) + 1
        for number, frame in enumerate(frames, first):
            fault = src.gate.faults.pop(number, None)
            # a reply the client never got leaves its request unanswered
            if fault is None or fault.delivered or not _is_reply(frame.data):
                self._track(src, [frame], now)
            if fault is None:
                self._emit_frames(src, [frame], now)
                continue
            conn = src.conn.id
            self._emit(FaultInjected(now, conn, fault.info))
            name = fault.action.name
            data = fault.data if name in ("rewrite", "truncate") else frame.data
            for _ in range(2 if name == "duplicate" else 1):
                self._emit(MessageRelayed(now, conn, src.channel, src.direction, data,
                                          frame.fds))
            if name == "errno":
                self._emit(MessageRelayed(now, conn, src.channel, 1 - src.direction,
                                          fault.answer, []))
                self._track(src.peer, [Frame(fault.answer, len(fault.answer))], now)

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
        self._emit(Note(time.time_ns(), conn.id, text))

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
                self._emit_frames(side, [leftover], now)
            if side.gate is not None:
                _close_all(side.gate.close())
        if self.tracer is not None:
            self.tracer.close_connection(conn.id)
        for side in conn.sides:
            if side.queue and side.name != by and not side.closed:
                side.closing = True      # deliver what was sent before the close
                self._watch(side)
            else:
                self._close_side(side)
        unanswered = [_unanswered(*request) for request in conn.matcher.outstanding()]
        self.log(f"conn {conn.id}: {reason}"
                 + (f"; {len(unanswered)} request(s) unanswered" if unanswered else ""))
        self._emit(ConnectionClosed(time.time_ns(), conn.id, by, reason, unanswered))

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

    # --- our own fds in the loop ----------------------------------------------------

    def _watch_fd(self, fd: int, callback: Callable[[Any, int], None]) -> None:
        self.selector.register(fd, selectors.EVENT_READ, callback)

    def _unwatch_fd(self, fd: int) -> None:
        try:
            self.selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    # --- addons --------------------------------------------------------------------

    def _only_hook(self, cls: type) -> Callable[[Any], None]:
        """Where events of `cls` go: straight to the one addon that takes
        them, when there is one (every message goes there)."""
        found = self._hooks[cls]
        return found[0] if len(found) == 1 else self._emit

    def _emit(self, event: ProxyEvent) -> None:
        for hook in self._hooks[event.__class__]:
            hook(event)

    def _emit_flush(self) -> None:
        for flush in self._flushes:
            flush()


def _unanswered(msg_id: int, cmd: int, channel: int, direction: int) -> dict[str, Any]:
    """A request still unanswered, as the close record lists it."""
    return {"msg_id": msg_id, "cmd": proto.command_name(cmd),
            "channel": CHANNELS[channel], "dir": DIRECTIONS[direction]}


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


def _is_reply(data: bytes) -> bool:
    header = proto.parse_header(data)
    return header is not None and header.is_reply


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
