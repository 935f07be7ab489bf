"""Framing: cut a vfio-user byte stream into messages.

A stream arrives as chunks, each with the file descriptors (or their
metadata) that came with it in the same recvmsg.  Which message owns them
follows from how Linux reads a stream socket (unix_stream_read_generic): a
sendmsg's fds ride on its first skb, and one recvmsg copies skbs until it has
copied one that carries fds, then stops.  So a chunk's fds belong to the last
write that begins in it.  Peers write one message per sendmsg, so that is the
last message that begins in the chunk, or, when none begins in it, the
message the chunk continues.  `fd_owner` finds it; the proxy splits its
forwarding there, so a receiver reading one message at a time gets each
message's fds with that message.

Memory is bounded: a message larger than `max_message` (a bogus msg_size of
4 GiB, say) keeps only its first `keep` bytes and is reported as truncated.

A request exists once its header has arrived.  A receiver may answer it from
the header alone: libvfio-user rejects a bad msg_size and reads the next
header right after it, the body never read (and maybe never sent).  The
framer, which emits a message once it is whole, would hold such a request
back past its reply, and frame the bytes that follow as its body; so when
the other direction answers a request still being assembled (`answered_early`),
that request is cut at its header, and framing resumes after it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .dissectors import vfio_user as proto

HEADER_SIZE = proto.HEADER_SIZE
_SIZE = struct.Struct("<I")
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024 + 4096   # QEMU's largest max_data_xfer_size + headers
DEFAULT_KEEP = 64 * 1024


@dataclass(slots=True)
class Frame:
    data: bytes                 # the message, or its first bytes when truncated
    size: int                   # bytes the message occupied in the stream
    fds: list[Any] = field(default_factory=list)
    truncated: bool = False     # data holds only the start of the message
    error: str | None = None    # why the stream could not be framed here


class Framer:
    """Incremental framer for one direction of one socket."""

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE,
                 keep: int = DEFAULT_KEEP) -> None:
        self.max_message = max_message
        self.keep = keep
        self._buf = bytearray()
        self._fds: list[Any] = []      # fds of the message being assembled
        self._skip = 0                 # bytes of an oversized message still to drop
        self._oversized: Frame | None = None
        self.lost = False              # framing lost: msg_size < 16 was seen

    def feed(self, data: bytes, fds: Sequence[Any] = ()) -> list[Frame]:
        """Add one received chunk; return the messages it completed."""
        start = self.fd_owner(data) if fds else 0
        if not start:
            return self._feed(data, fds)
        view = memoryview(data)
        return self._feed(view[:start], ()) + self._feed(view[start:], fds)

    def fd_owner(self, data: bytes) -> int:
        """Offset in `data` where the message owning its fds begins (see the
        module docstring): the last message start in it, else 0."""
        if self.lost:
            return 0
        # `start` is where the message being cut begins, relative to data
        # (negative while part of it is buffered or skipped).
        if self._skip:
            end = self._skip
        else:
            start = -len(self._buf)
            end = None
        owner = 0
        while True:
            if end is None:
                size = self._size_at(start, data)
                if size is None or size < HEADER_SIZE:
                    return owner
                end = start + size
            if end >= len(data):
                return owner
            owner = start = end
            end = None

    def _size_at(self, start: int, data: bytes) -> int | None:
        """msg_size of the message beginning at `start` (see fd_owner), if known."""
        if start < 0:
            head = bytes(self._buf[start:start + 8] if start + 8 < 0 else self._buf[start:])
            head += bytes(data[:8 - len(head)])
        else:
            head = bytes(data[start:start + 8])
        return _SIZE.unpack_from(head, 4)[0] if len(head) == 8 else None

    def _feed(self, data: bytes, fds: Sequence[Any]) -> list[Frame]:
        if self.lost:
            return [Frame(bytes(data), len(data), list(fds), error="unframed bytes "
                          "(framing was lost earlier in this stream)")] if data or fds else []
        if self._skip and self._oversized is not None:
            self._oversized.fds.extend(fds)
        else:
            self._fds.extend(fds)
        frames: list[Frame] = []
        if not self._buf and not self._skip:
            # the usual chunk, whole messages from a boundary: cut straight from
            # it, without the buffer's copies (a chunk that is one message is its frame)
            cut = self._cut_whole(data, frames)
            if cut == len(data):
                return frames
            data = data[cut:] if cut else data
        view = memoryview(data)
        while view:
            if self._skip:
                view = self._drop(view, frames)
                continue
            self._buf += view
            view = memoryview(b"")
            self._cut(frames)
        return frames

    def whole(self, data: bytes) -> list[int] | None:
        """The sizes of the messages in `data` when it is whole messages, the
        first at a message boundary: the usual chunk, which the proxy relays
        as a Burst.  None otherwise: then `feed` it.  Changes nothing."""
        if self._buf or self._skip or self._fds or self.lost:
            return None
        sizes = self._sizes(data)
        return sizes if sum(sizes) == len(data) else None

    def _sizes(self, data: bytes | bytearray) -> list[int]:
        """The sizes of the whole messages `data` begins with, up to a message
        still incomplete or one whose size _cut must flag."""
        sizes: list[int] = []
        pos, end, size_at, largest = 0, len(data), _SIZE.unpack_from, self.max_message
        while end - pos >= HEADER_SIZE:
            size = size_at(data, pos + 4)[0]
            if size < HEADER_SIZE or size > largest or end - pos < size:
                break
            sizes.append(size)
            pos += size
        return sizes

    def _cut_whole(self, data: bytes | bytearray, frames: list[Frame]) -> int:
        """Cut the whole messages `data` begins with; returns where the rest starts."""
        pos, end = 0, len(data)
        for size in self._sizes(data):
            frames.append(Frame(bytes(data[pos:pos + size]) if size < end else bytes(data),
                                size, self._take_fds() if self._fds else []))
            pos += size
        return pos

    def close(self) -> Frame | None:
        """End of stream: return what is left of an incomplete message."""
        if self._skip and self._oversized is not None:
            frame, self._oversized, self._skip = self._oversized, None, 0
            frame.error = "stream ended inside an oversized message"
            return frame
        if not self._buf and not self._fds:
            return None
        frame = Frame(bytes(self._buf), len(self._buf), self._fds,
                      error=f"stream ended after {len(self._buf)} bytes of an incomplete message")
        self._buf, self._fds = bytearray(), []
        return frame

    def cut_answered(self, msg_id: int) -> list[Frame]:
        """The message being assembled, cut at its header, if it is a request
        with `msg_id` (see the module docstring); then the messages the bytes
        after its header complete.  [] when no such request is pending."""
        head = self._oversized.data if self._skip and self._oversized else bytes(self._buf)
        header = proto.parse_header(head)
        if self.lost or header is None or header.msg_id != msg_id \
                or header.type != proto.TYPE_COMMAND or header.no_reply:
            return []
        if self._skip and self._oversized:
            received = self._oversized.size - self._skip
            frame, self._oversized, self._skip = self._oversized, None, 0
            # the bytes after the header can be framed again only if none was dropped
            rest = frame.data[HEADER_SIZE:] if received == len(frame.data) else b""
            self.lost = received != len(frame.data)
        else:
            frame = Frame(b"", 0, self._take_fds())
            rest = self._buf[HEADER_SIZE:]
        frame.data, frame.size, frame.truncated = bytes(head[:HEADER_SIZE]), HEADER_SIZE, False
        frame.error = (f"the peer answered msg_id {msg_id:#x} after its header, before the rest "
                       f"of its {header.size} bytes: cut there, the next bytes start a message")
        self._buf = bytearray(rest)
        frames = [frame]
        if not self.lost:
            self._cut(frames)
        return frames

    @property
    def assembling(self) -> bool:
        """Whether a message's header has come and not all of the rest: only
        then can a reply answer it early (cut_answered)."""
        return len(self._buf) >= HEADER_SIZE or bool(self._skip and self._oversized)

    @property
    def pending(self) -> int:
        """Bytes buffered for the message being assembled."""
        return len(self._buf)

    def _cut(self, frames: list[Frame]) -> None:
        del self._buf[:self._cut_whole(self._buf, frames)]
        if len(self._buf) < HEADER_SIZE:
            return
        size = _SIZE.unpack_from(self._buf, 4)[0]
        if size < HEADER_SIZE:
            frames.append(Frame(bytes(self._buf), len(self._buf), self._take_fds(),
                                error=f"msg_size {size} is smaller than the header: "
                                      "framing lost"))
            self._buf = bytearray()
            self.lost = True
        elif size > self.max_message:
            self._start_oversized(size, frames)

    def _start_oversized(self, size: int, frames: list[Frame]) -> None:
        kept = bytes(self._buf[:self.keep])
        self._oversized = Frame(kept, size, self._take_fds(), truncated=True,
                                error=f"msg_size {size} exceeds the {self.max_message}-byte limit")
        consumed = min(len(self._buf), size)
        self._skip = size - consumed
        rest = self._buf[consumed:]
        self._buf = bytearray()
        if not self._skip:
            frames.append(self._finish_oversized())
            self._buf = bytearray(rest)
            self._cut(frames)

    def _drop(self, view: memoryview, frames: list[Frame]) -> memoryview:
        n = min(self._skip, len(view))
        self._skip -= n
        if not self._skip:
            frames.append(self._finish_oversized())
        return view[n:]

    def _finish_oversized(self) -> Frame:
        frame, self._oversized = self._oversized, None
        assert frame is not None
        return frame

    def _take_fds(self) -> list[Any]:
        fds, self._fds = self._fds, []
        return fds


def answered_early(reply: Frame, requests: Framer, waiting: Callable[[int], bool]) -> list[Frame]:
    """The frames to put before `reply` (see the module docstring): when it
    answers a msg_id that no whole request in flight (`waiting`) has, the
    request with that id that `requests` is still assembling, cut at its header."""
    if not requests.assembling:         # the usual case, decided before any parsing
        return []
    header = proto.parse_header(reply.data)
    if header is None or not header.is_reply or waiting(header.msg_id):
        return []
    return requests.cut_answered(header.msg_id)
