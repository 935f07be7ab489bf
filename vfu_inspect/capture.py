"""Capture files: a msgpack stream, append-only, readable after a crash.

Layout (format version 2): one msgpack map, the file header, then one msgpack
array per record.  Version 1 is version 2 without burst records: a writer
that does not write bursts says version 1, which older readers read.
Records are independent objects, so a file cut short anywhere still yields
every record before the cut; the damaged tail is reported once.  See
README.md, "Capture files".
"""

from __future__ import annotations

import os
import socket
import stat
import time
from typing import Any, BinaryIO, Iterable, Iterator

import msgpack

from .errors import CaptureError
from .dissectors.vfio_user.protocol import HEADER_SIZE
from .records import (BURST, CHANNELS, DIRECTIONS, EVENT_NAMES, MSG, Burst, Event, Message,
                      Record, unbundle)

FORMAT = "vfu-inspect-capture"
VERSION = 2                     # the newest: bursts
READABLE_VERSIONS = (1, 2)
SUFFIX = ".vfucap"

_READ_CHUNK = 1 << 20
_RANDOM_READ = 1 << 16        # most records fit: random access reads little
_MAX_RECORD = 256 << 20     # bounds memory on a corrupt length field


class CaptureWriter:
    """Appends records; flushes each one unless told to batch.  With
    `bursts`, a burst is one record (format version 2); else its messages."""

    def __init__(self, path: str | os.PathLike[str], source: str = "",
                 autoflush: bool = True, bursts: bool = False) -> None:
        self.path = os.fspath(path)
        self._file: BinaryIO = open(self.path, "wb")
        self._pack = msgpack.Packer(use_bin_type=True).pack
        self.autoflush = autoflush
        self.bursts = bursts
        self._file.write(self._pack(header_record(source, bursts)))
        self._file.flush()

    def write(self, record: Record | Burst) -> None:
        if not self.bursts and isinstance(record, Burst):
            for msg in record.messages():
                self.write(msg)
            return
        self._file.write(self._pack(record.to_record()))
        if self.autoflush:
            self._file.flush()

    def message(self, ts_ns: int, conn: int, channel: int, direction: int,
                data: bytes, fds: list[dict[str, Any]] | None = None,
                size: int | None = None) -> None:
        self.write(Message(ts_ns, conn, channel, direction, data, fds or [], size))

    def event(self, kind: int, ts_ns: int, conn: int, **info: Any) -> None:
        self.write(Event(kind, ts_ns, conn, info))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def header_record(source: str, bursts: bool = False) -> dict[str, Any]:
    """The map that starts every capture file and live stream: the oldest
    format version its records need."""
    from . import __version__
    return {"format": FORMAT, "version": VERSION if bursts else 1,
            "created_ns": time.time_ns(),
            "source": source, "tool": f"vfu-inspect {__version__}"}


class CaptureReader:
    """Iterates the records of a capture file, lazily.

    `damage` is set (once) when the file ends inside a record or holds records
    that are not valid; everything before is still returned.  With
    `follow=True` iteration waits for records still being appended, as
    `tail -f` does, until `stop()` is called.
    """

    def __init__(self, path: str | os.PathLike[str], follow: bool = False,
                 poll: float = 0.1) -> None:
        self.path = os.fspath(path)
        self.follow = follow
        self.poll = poll
        self.damage: str | None = None
        self._stopped = False
        self._consumed = 0      # end of the last whole object (tell() moves on failure)
        self._fed = 0
        self.at_eof = False     # the last read found no more bytes (a follower waits)
        self._file, self._read = _open_source(self.path)
        self._live = isinstance(self._file, socket.socket)   # EOF ends a live stream
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=_MAX_RECORD,
                                          strict_map_key=False)
        self.header = self._read_header()

    def _read_header(self) -> dict[str, Any]:
        obj = self._next_object(wait=self.follow)
        if obj is _END and not self._live and self.damage is None:
            self.close()
            raise CaptureError(f"{self.path} ends inside its header after {self._fed} bytes"
                               if self._fed else
                               f"{self.path} is empty: not a vfu-inspect capture file")
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            self.close()
            from .pcapng import is_pcapng
            if is_pcapng(self.path):
                raise CaptureError(f"{self.path} is a pcapng file: `vfu-inspect import` it "
                                   "to a capture first")
            raise CaptureError(f"{self.path} is not a vfu-inspect capture file")
        if obj.get("version") not in READABLE_VERSIONS:
            self.close()
            raise CaptureError(f"{self.path}: capture format version {obj.get('version')} "
                               f"is not supported (this build reads versions 1 and 2)")
        return obj

    def __iter__(self) -> Iterator[Record]:
        for _, record in self.indexed():
            yield record

    def indexed(self) -> Iterator[tuple[int, Record]]:
        """Each record with the byte offset where it starts (see `records_from`)."""
        bad = 0
        while True:
            start = self._consumed
            obj = self._next_object(wait=self.follow)
            if obj is _END:
                break
            record = parse_record(obj)
            if record is None:
                bad += 1
                continue
            for each in unbundle(record):
                yield start, each
        if bad:
            self._report(f"{bad} malformed record(s) skipped")
        tail = self._unpacker_tail()
        if tail:
            self._report(f"capture ends inside a record: last {tail} bytes ignored "
                         "(was the writer killed?)")

    @property
    def live(self) -> bool:
        """Reading a proxy's monitor socket rather than a file."""
        return self._live

    @property
    def position(self) -> int:
        """Bytes of whole records read so far."""
        return self._consumed

    @property
    def tail(self) -> int:
        """Bytes read past the last whole record (a record still being written, or cut)."""
        return self._unpacker_tail()

    def stop(self) -> None:
        """End a follow-mode iteration at the next poll."""
        self._stopped = True

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> CaptureReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _report(self, text: str) -> None:
        if self.damage is None:
            self.damage = text

    def _next_object(self, wait: bool) -> Any:
        while True:
            try:
                obj = self._unpacker.unpack()
                self._consumed = self._unpacker.tell()
                return obj
            except msgpack.OutOfData:
                pass
            except (msgpack.FormatError, msgpack.StackError, ValueError) as exc:
                self._report(f"capture is corrupt after byte {self._consumed}: {exc}")
                return _END
            chunk = self._read(_READ_CHUNK)
            self.at_eof = not chunk
            if chunk:
                self._unpacker.feed(chunk)
                self._fed += len(chunk)
                continue
            if not wait or self._stopped or self._live:
                return _END
            time.sleep(self.poll)

    def _unpacker_tail(self) -> int:
        return self._fed - self._consumed


_END = object()


def _open_source(path: str) -> tuple[Any, Any]:
    """A capture file, or a proxy's live monitor socket: (closable, read function)."""
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
            except OSError:
                sock.close()
                raise
            return sock, sock.recv
        file = open(path, "rb")
        return file, file.read
    except OSError as exc:
        raise CaptureError(f"cannot open {path}: {exc.strerror}") from None


def parse_record(obj: Any) -> Record | Burst | None:
    """Validate one record array; None when it is not a record."""
    if not isinstance(obj, list) or len(obj) < 4 or not all(
            isinstance(x, int) for x in obj[:3]):
        return None
    kind = obj[0]
    if kind == MSG and len(obj) in (7, 8):
        _, ts, conn, channel, direction, data, fds, *size = obj
        if isinstance(data, bytes) and isinstance(fds, list) and channel in CHANNELS \
                and direction in DIRECTIONS:
            return Message(ts, conn, channel, direction, data, fds, size[0] if size else None)
        return None
    if kind in EVENT_NAMES and len(obj) == 4 and isinstance(obj[3], dict):
        return Event(kind, obj[1], obj[2], obj[3])
    if kind == BURST and len(obj) == 7:
        return _burst(*obj[1:])
    return None


def _burst(ts: int, conn: int, channel: Any, direction: Any, data: Any, sizes: Any
           ) -> Burst | None:
    if isinstance(data, bytes) and isinstance(sizes, list) and channel in CHANNELS \
            and direction in DIRECTIONS and all(
                isinstance(size, int) and size >= HEADER_SIZE for size in sizes) \
            and sum(sizes) == len(data):
        return Burst(ts, conn, channel, direction, data, sizes)
    return None


def records_from(file: Any, offset: int) -> Iterator[Record | None]:
    """The records of an open capture file from `offset` on (None for one
    that is not valid), until the end or the first corrupt byte; a burst's
    messages one by one, each at the burst's offset."""
    file.seek(offset)
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=_MAX_RECORD, strict_map_key=False)
    while chunk := file.read(_RANDOM_READ):
        unpacker.feed(chunk)
        try:
            for obj in unpacker:
                yield from unbundle(parse_record(obj))
        except (msgpack.FormatError, msgpack.StackError, ValueError):
            return


def records_at(file: Any, offsets: Iterable[int]
               ) -> Iterator[tuple[int, Record | Burst | None]]:
    """(offset, record) for each record that starts at one of `offsets`
    (ascending) of an open capture file: one pass from the first, which
    unpacks those records and steps over the others; until the last, the
    end, or the first corrupt byte."""
    wanted = iter(offsets)
    target = next(wanted, None)
    if target is None:
        return
    file.seek(target)
    unpacker = msgpack.Unpacker(file, raw=False, max_buffer_size=_MAX_RECORD,
                                strict_map_key=False, read_size=_RANDOM_READ)
    start = target
    try:
        while target is not None:
            at = start + unpacker.tell()
            if at < target:
                unpacker.skip()
                continue
            if at == target:
                yield at, parse_record(unpacker.unpack())
            target = next(wanted, None)
    except (msgpack.OutOfData, msgpack.FormatError, msgpack.StackError, ValueError):
        return


def read_all(path: str | os.PathLike[str]) -> tuple[list[Record], str | None]:
    """Every record of a file and its damage report (for small files and tests)."""
    with CaptureReader(path) as reader:
        records = list(reader)
        return records, reader.damage
