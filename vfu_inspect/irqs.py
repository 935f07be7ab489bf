"""`proxy --trace-irqs`: the proxy's own eventfds between the peers' interrupt
and doorbell eventfds, so that every signal is seen, relayed at once and recorded.

Interrupts: with DEVICE_SET_IRQS (DATA_EVENTFD | TRIGGER) the client hands the
server eventfds; the proxy keeps them and passes eventfds of its own.  When
the server signals one, the proxy reads the count, adds it to the client's
eventfd and emits an Interrupt event.  Doorbells: a DEVICE_GET_REGION_IO_FDS reply
hands the client the server's ioeventfds; the proxy passes its own instead,
and relays each signal and emits it as a Doorbell event.

An assignment takes effect with its request (a server may signal before it
replies) and an error reply undoes it; a de-assignment or a disable closes
the proxy's fds when it succeeds; a new IO_FDS reply for a region replaces
that region's doorbells; a disconnect closes them all.  Masks are followed,
so that a signal on a masked vector says so.  What DEVICE_RESET does to the
eventfds is the server's business: the proxy keeps relaying what it holds.
UNMASK eventfds (INTx resampling, signalled by the client) pass untouched.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .dissectors import vfio_user as proto
from .framing import Frame
from .proxy_events import Doorbell, Interrupt
from .records import C2S, S2C

SET_IRQS, IO_FDS = proto.CMD["DEVICE_SET_IRQS"], proto.CMD["DEVICE_GET_REGION_IO_FDS"]
_SET_IRQS = proto.SetIrqs.vfu_compiled.struct
_IO_FDS = proto.RegionIoFds.vfu_compiled.struct
_FLAGS = proto.SET_IRQS_FLAGS
_EVENTFD_TRIGGER = _FLAGS["data_eventfd"] | _FLAGS["trigger"]
_DISABLE = _FLAGS["data_none"] | _FLAGS["trigger"]
_DOORBELL_TYPES = {0, 2}                  # ioeventfd, libvfio-user's shadow ioeventfd
_EVENTFD_MAX = 0xFFFFFFFFFFFFFFFE


@dataclass(eq=False)
class Link:
    """One of our eventfds and the peer's eventfd its signals go to."""

    ours: int                  # what we watch; the signalling peer holds a copy
    theirs: int                # the receiving peer's eventfd, which we signal
    conn: int
    kind: type[Interrupt | Doorbell]    # the event a signal is
    info: dict[str, Any]       # index and vector, or region, offset, size, datamatch


@dataclass
class _Pending:
    """A SET_IRQS request whose reply decides what changes."""

    index: int
    assigned: dict[int, Link] = field(default_factory=dict)     # vector -> new link
    released: list[int] | None = None    # vectors de-assigned; None: the whole index


class IrqTracer:
    """The links of every connection; `watch`/`unwatch` put our eventfds in the
    relay's selector, `emit` records what they carry."""

    def __init__(self, watch: Callable[[int, Callable[[Any, int], None]], None],
                 unwatch: Callable[[int], None],
                 emit: Callable[[Interrupt | Doorbell], None]) -> None:
        self.watch, self.unwatch, self.emit = watch, unwatch, emit
        self.irqs: dict[tuple[int, int, int], Link] = {}        # (conn, index, vector)
        self.doorbells: dict[tuple[int, int], list[Link]] = {}   # (conn, region)
        self.pending: dict[tuple[int, int], _Pending] = {}      # (conn, msg_id)
        self.masked: set[tuple[int, int, int]] = set()

    # --- fds passed with a message ------------------------------------------------------

    def interpose(self, conn: int, direction: int, frame: Frame, fds: list[int]) -> list[int]:
        """The fds to pass on with this whole message: ours where it carries
        interrupt or doorbell eventfds, the peer's own otherwise."""
        header = proto.parse_header(frame.data)
        if header is None:
            return fds
        if direction == C2S and header.cmd == SET_IRQS and not header.is_reply:
            return self._assign(conn, header, frame, fds)
        if direction == S2C and header.cmd == IO_FDS and header.is_reply \
                and not header.is_error:
            return self._doorbells(conn, frame, fds)
        return fds

    def _assign(self, conn: int, header: proto.HeaderInfo, frame: Frame,
                fds: list[int]) -> list[int]:
        assignment = set_irqs_assignment(frame.data)
        if assignment is None:
            return fds
        index, start, _ = assignment
        pending = _Pending(index, released=[])
        fds = list(fds)
        for i, meta in enumerate(frame.fds[:len(fds)]):
            if meta.get("kind") == "eventfd":
                link = self._link(conn, Interrupt, fds[i], {"index": index, "vector": start + i})
                pending.assigned[start + i] = link
                fds[i] = os.dup(link.ours)
        self._expect(conn, header, pending)
        return fds

    def _doorbells(self, conn: int, frame: Frame, fds: list[int]) -> list[int]:
        fds, links = list(fds), {}
        for i, info in doorbells(frame.data, frame.fds).items():
            if i < len(fds):
                links[i] = self._link(conn, Doorbell, fds[i], info)
                fds[i] = os.dup(links[i].ours)
        region = _IO_FDS.unpack_from(frame.data, proto.HEADER_SIZE)[2] \
            if len(frame.data) >= proto.HEADER_SIZE + _IO_FDS.size else None
        for old in self.doorbells.pop((conn, region), []):
            self._close(old)
        if links:
            self.doorbells[(conn, region)] = list(links.values())
        return fds

    def _link(self, conn: int, kind: type[Interrupt | Doorbell], theirs: int,
              info: dict[str, Any]) -> Link:
        link = Link(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC), theirs, conn, kind, info)
        self.watch(link.ours, lambda fileobj, events: self._signal(link))
        return link

    # --- SET_IRQS without fds, and replies ----------------------------------------------

    def message(self, conn: int, direction: int, header: proto.HeaderInfo, data: bytes,
                had_fds: bool) -> None:
        """A SET_IRQS message on the main socket (its fds already interposed)."""
        if header.is_reply != (direction == S2C):
            return
        if header.is_reply:
            pending = self.pending.pop((conn, header.msg_id), None)
            if pending is not None:
                self._settle(conn, pending, ok=not header.is_error)
            return
        values = _set_irqs(data)
        if values is None or had_fds:
            return
        _, flags, index, start, count = values
        vectors = range(start, start + count)
        if flags & proto.SET_IRQS_DATA == _FLAGS["data_bool"]:
            bools = data[proto.HEADER_SIZE + _SET_IRQS.size:]
            vectors = [v for v, b in zip(vectors, bools) if b]
        action = flags & proto.SET_IRQS_ACTION
        if flags & (proto.SET_IRQS_DATA | proto.SET_IRQS_ACTION) == _EVENTFD_TRIGGER:
            self._expect(conn, header, _Pending(index, released=list(vectors)))
        elif flags & (proto.SET_IRQS_DATA | proto.SET_IRQS_ACTION) == _DISABLE and not count:
            self._expect(conn, header, _Pending(index))
        elif action in (_FLAGS["mask"], _FLAGS["unmask"]):
            update = self.masked.add if action == _FLAGS["mask"] else self.masked.discard
            for vector in vectors:
                update((conn, index, vector))

    def _expect(self, conn: int, header: proto.HeaderInfo, pending: _Pending) -> None:
        if header.no_reply:
            self._settle(conn, pending, ok=True)     # no reply will say otherwise
        else:
            self.pending[(conn, header.msg_id)] = pending

    def _settle(self, conn: int, pending: _Pending, ok: bool) -> None:
        if not ok:
            for link in pending.assigned.values():
                self._close(link)
            return
        index = pending.index
        released = pending.released if pending.released is not None else [
            vector for (c, i, vector) in self.irqs if (c, i) == (conn, index)]
        for vector in [*released, *pending.assigned]:
            old = self.irqs.pop((conn, index, vector), None)
            if old is not None:
                self._close(old)
        for vector, link in pending.assigned.items():
            self.irqs[(conn, index, vector)] = link

    # --- signals ---------------------------------------------------------------------

    def _signal(self, link: Link) -> None:
        try:
            count = os.eventfd_read(link.ours)
        except BlockingIOError:
            return
        try:
            os.eventfd_write(link.theirs, min(count, _EVENTFD_MAX))   # relay first
        except OSError:
            pass               # the peer's eventfd is gone or full: still record it
        info = dict(link.info, count=count)
        if link.kind is Interrupt and (link.conn, info["index"], info["vector"]) in self.masked:
            info["masked"] = True
        self.emit(link.kind(time.time_ns(), link.conn, info))

    # --- closing ---------------------------------------------------------------------

    def close_connection(self, conn: int) -> None:
        links = [link for key, link in self.irqs.items() if key[0] == conn]
        links += [link for key, group in self.doorbells.items() if key[0] == conn
                  for link in group]
        links += [link for key, p in self.pending.items() if key[0] == conn
                  for link in p.assigned.values()]
        for link in links:
            self._close(link)
        for table in (self.irqs, self.doorbells, self.pending):
            for key in [key for key in table if key[0] == conn]:
                del table[key]
        self.masked = {key for key in self.masked if key[0] != conn}

    def close(self) -> None:
        for conn in {key[0] for table in (self.irqs, self.doorbells, self.pending)
                     for key in table}:
            self.close_connection(conn)

    def _close(self, link: Link) -> None:
        if link.ours < 0:
            return
        self.unwatch(link.ours)
        os.close(link.ours)
        os.close(link.theirs)
        link.ours = link.theirs = -1


def doorbells(reply: bytes, fds: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The ioeventfds of a REGION_IO_FDS reply: fd index -> the doorbell's
    region, offset, size and datamatch (a shared fd: its first sub-region)."""
    tree, _ = proto.dissect_message(reply, proto.Context("s2c", fds))
    region = tree.first("region_io_fds.index")
    found: dict[int, dict[str, Any]] = {}
    for sub in _entries(tree, "region_io_fds.sub"):
        i = sub.get("fd_index", -1)
        if i in found or not 0 <= i < len(fds) or sub.get("type") not in _DOORBELL_TYPES \
                or fds[i].get("kind") != "eventfd":
            continue
        datamatch = sub.get("datamatch") if sub.get("flags", 0) & \
            proto.IO_FD_FLAGS["datamatch"] else None
        found[i] = {"region": region, "offset": sub.get("offset"), "size": sub.get("size"),
                    "datamatch": datamatch}
    return found


def set_irqs_assignment(data: bytes) -> tuple[int, int, int] | None:
    """(index, start, count) of a SET_IRQS request that assigns trigger eventfds."""
    values = _set_irqs(data)
    if values is None or values[1] & (proto.SET_IRQS_DATA | proto.SET_IRQS_ACTION) \
            != _EVENTFD_TRIGGER:
        return None
    return values[2], values[3], values[4]


def _set_irqs(data: bytes) -> tuple[int, int, int, int, int] | None:
    if len(data) < proto.HEADER_SIZE + _SET_IRQS.size:
        return None
    return _SET_IRQS.unpack_from(data, proto.HEADER_SIZE)


def _entries(tree: Any, prefix: str) -> list[dict[str, Any]]:
    """The fields of each `prefix` layer of a dissected message, by short name."""
    return [{c.field.name.rsplit(".", 1)[1]: c.value for c in item.children}
            for item in tree.walk() if item.field.name == prefix]
