"""pcapng files that Wireshark opens fully decoded, and read back losslessly.

Link type: LINKTYPE_WIRESHARK_UPPER_PDU (Exported PDU).  Each packet starts
with a tag naming the dissector ("vfio_user"), so Wireshark hands the message
to the Lua plugin with no "Decode As" or DLT_USER table to set up, the way
Wireshark's own "Export PDUs" files work.  LINKTYPE_USER0 would need that
setup on every machine.

One interface per (connection, channel); the EPB flags carry the direction,
seen from the server's socket (client to server = inbound); timestamps are in
nanoseconds (if_tsresol 9).  What pcapng has no field for is kept in
vfu-inspect's own custom options and blocks, so that `import` gives back the
capture records exactly:
- a message's fd list, as a custom option of its EPB;
- connection open/close events and notes, as Interface Statistics Blocks
  (with a readable comment) where they happened in the stream.
A packet comment lists the fds and expert items for people and filters
(`frame.comment contains "memfd"`).
"""

from __future__ import annotations

import os
import struct
from typing import Any, BinaryIO, Iterator

import msgpack

from .capture import (
    C2S, CHANNELS, EVENT_NAMES, MAIN, S2C, CaptureError, Event, Message, Record,
    describe_event)

SUFFIX = ".pcapng"

SHB, IDB, ISB, EPB = 0x0A0D0D0A, 0x00000001, 0x00000005, 0x00000006
BYTE_ORDER_MAGIC = 0x1A2B3C4D
LINKTYPE_WIRESHARK_UPPER_PDU = 252
OPT_END, OPT_COMMENT, OPT_CUSTOM_BINARY = 0, 1, 2989
SHB_USERAPPL, IF_NAME, IF_DESCRIPTION, IF_TSRESOL, EPB_FLAGS = 4, 2, 3, 9, 2
FLAG_INBOUND, FLAG_OUTBOUND = 1, 2
EPB_DIRECTION = {C2S: FLAG_INBOUND, S2C: FLAG_OUTBOUND}
# RFC 5612's enterprise number for examples: vfu-inspect has none of its own
# yet; the magic below tells our options and blocks from anyone else's.
PEN = 32473
CUSTOM_MAGIC = b"vfu1"
EXP_PDU_TAG_DISSECTOR_NAME, EXP_PDU_TAG_END = 12, 0
DISSECTOR_NAME = b"vfio_user"

_MAX_BLOCK = 256 << 20        # bounds memory on a corrupt length field


def _padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + _padded(value)


def _options(*options: bytes) -> bytes:
    present = [o for o in options if o]
    return b"".join(present) + _option(OPT_END, b"") if present else b""


def _block(kind: int, body: bytes) -> bytes:
    length = 12 + len(body)
    return struct.pack("<II", kind, length) + body + struct.pack("<I", length)


def _custom(value: Any) -> bytes:
    return struct.pack("<I", PEN) + CUSTOM_MAGIC + msgpack.packb(value, use_bin_type=True)


def _exported_pdu_header() -> bytes:
    name = _padded(DISSECTOR_NAME)
    return (struct.pack(">HH", EXP_PDU_TAG_DISSECTOR_NAME, len(name)) + name
            + struct.pack(">HH", EXP_PDU_TAG_END, 0))


PDU_HEADER = _exported_pdu_header()


def interface_name(conn: int, channel: int) -> str:
    return f"conn{conn}" + ("" if channel == MAIN else f"-{CHANNELS[channel]}")


def interface_description(conn: int, channel: int, source: str) -> str:
    who = ("client commands and server replies" if channel == MAIN
           else "twin socket: server commands and client replies")
    return f"vfio-user connection {conn}, {CHANNELS[channel]} socket ({who}); {source}"


class PcapngWriter:
    """Streams capture records into a pcapng file.

    Interfaces are declared as connections and channels first appear, which
    pcapng allows anywhere before their first packet.
    """

    def __init__(self, file: BinaryIO, source: str = "") -> None:
        from . import __version__
        self._file = file
        self.source = source
        self._interfaces: dict[tuple[int, int], int] = {}
        shb = struct.pack("<IHHq", BYTE_ORDER_MAGIC, 1, 0, -1) + _options(
            _option(SHB_USERAPPL, f"vfu-inspect {__version__}".encode()),
            _option(OPT_COMMENT, source.encode()) if source else b"")
        file.write(_block(SHB, shb))

    def write(self, record: Record, comment: str | None = None) -> None:
        """Write a record; a message's comment defaults to its fd list."""
        if isinstance(record, Message):
            self.message(record, fd_comment(record.fds) if comment is None else comment)
        else:
            self.event(record)

    def message(self, msg: Message, comment: str = "") -> None:
        interface = self._interface(msg.conn, msg.channel)
        packet = PDU_HEADER + msg.data
        options = _options(
            _option(EPB_FLAGS, struct.pack("<I", EPB_DIRECTION[msg.direction])),
            _option(OPT_COMMENT, comment.encode()) if comment else b"",
            _option(OPT_CUSTOM_BINARY, _custom(msg.fds)) if msg.fds else b"")
        body = struct.pack("<IIIII", interface, msg.ts_ns >> 32, msg.ts_ns & 0xFFFFFFFF,
                           len(packet), len(PDU_HEADER) + msg.wire_size)
        self._file.write(_block(EPB, body + _padded(packet) + options))

    def event(self, event: Event) -> None:
        """An Interface Statistics Block on the connection's interface: Wireshark
        keeps it out of the packet list, so frame numbers stay message numbers."""
        interface = self._interface(event.conn, MAIN)
        options = _options(_option(OPT_COMMENT, describe_event(event).encode()),
                           _option(OPT_CUSTOM_BINARY, _custom(event.to_record())))
        body = struct.pack("<III", interface, event.ts_ns >> 32, event.ts_ns & 0xFFFFFFFF)
        self._file.write(_block(ISB, body + options))

    def flush(self) -> None:
        self._file.flush()

    def _interface(self, conn: int, channel: int) -> int:
        key = (conn, channel)
        if key not in self._interfaces:
            self._interfaces[key] = len(self._interfaces)
            idb = struct.pack("<HHI", LINKTYPE_WIRESHARK_UPPER_PDU, 0, 0) + _options(
                _option(IF_NAME, interface_name(conn, channel).encode()),
                _option(IF_DESCRIPTION,
                        interface_description(conn, channel, self.source).encode()),
                _option(IF_TSRESOL, bytes([9])))
            self._file.write(_block(IDB, idb))
        return self._interfaces[key]


def fd_comment(fds: list[dict[str, Any]], purposes: dict[int, str] | None = None,
               experts: list[tuple[str, str, str]] = ()) -> str:
    """The packet comment: one line per fd, then one per expert item."""
    lines = []
    for i, meta in enumerate(fds):
        line = f"fd {i}: {meta.get('kind', '?')}" + "".join(
            f" {key}={meta[key]}" for key in ("size", "inode") if meta.get(key) is not None)
        if purposes and i in purposes:
            line += f" ({purposes[i]})"
        lines.append(line)
    lines.extend(f"expert {severity} {id}: {message}" for severity, id, message in experts)
    return "\n".join(lines)


class PcapngFileWriter(PcapngWriter):
    """A PcapngWriter that owns its file, with CaptureWriter's interface."""

    def __init__(self, path: str | os.PathLike[str], source: str = "") -> None:
        super().__init__(open(path, "wb"), source)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> PcapngFileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_pcapng(path: str | os.PathLike[str]) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and struct.unpack("<I", head)[0] == SHB


def read_pcapng(path: str | os.PathLike[str]) -> tuple[list[Record], list[str]]:
    """The capture records of a pcapng file vfu-inspect wrote, and what was odd.

    Packets of other link types or without our Exported PDU header are skipped
    and reported; a file cut short yields what came before the cut.
    """
    problems: list[str] = []
    try:
        with open(path, "rb") as f:
            records = list(_records(f, problems))
    except OSError as exc:
        raise CaptureError(f"cannot open {path}: {exc.strerror}") from None
    return records, problems


def _records(f: BinaryIO, problems: list[str]) -> Iterator[Record]:
    interfaces: list[tuple[int, int, int, int]] = []   # linktype, conn, channel, tsresol
    first = True
    for kind, body in _blocks(f, problems):
        if first and kind != SHB:
            raise CaptureError("not a pcapng file (no section header block)")
        first = False
        if kind == SHB:
            interfaces = []
        elif kind == IDB:
            interfaces.append(_interface_of(body, len(interfaces)))
        elif kind == EPB:
            msg = _message_of(body, interfaces, problems)
            if msg is not None:
                yield msg
        elif kind == ISB:
            event = _event_of(body)
            if event is not None:
                yield event


def _blocks(f: BinaryIO, problems: list[str]) -> Iterator[tuple[int, bytes]]:
    while True:
        head = f.read(8)
        if not head:
            return
        if len(head) < 8:
            problems.append("file ends inside a block header")
            return
        kind, length = struct.unpack("<II", head)
        if kind == SHB and length != 0:
            magic = f.read(4)
            if magic != struct.pack("<I", BYTE_ORDER_MAGIC):
                raise CaptureError("big-endian or corrupt pcapng section (only little-endian "
                                   "files, as vfu-inspect writes them, are read)")
            f.seek(-4, os.SEEK_CUR)
        if length < 12 or length % 4 or length > _MAX_BLOCK:
            problems.append(f"corrupt block length {length}: rest of the file ignored")
            return
        rest = f.read(length - 8)
        if len(rest) < length - 8:
            problems.append("file ends inside a block: last block ignored")
            return
        yield kind, rest[:-4]


def _parse_options(data: bytes) -> dict[int, list[bytes]]:
    options: dict[int, list[bytes]] = {}
    offset = 0
    while offset + 4 <= len(data):
        code, length = struct.unpack_from("<HH", data, offset)
        if code == OPT_END:
            break
        options.setdefault(code, []).append(data[offset + 4:offset + 4 + length])
        offset += 4 + length + (-length % 4)
    return options


def _interface_of(body: bytes, index: int) -> tuple[int, int, int, int]:
    linktype = struct.unpack_from("<H", body)[0] if len(body) >= 8 else -1
    options = _parse_options(body[8:])
    name = options.get(IF_NAME, [b""])[0].decode("utf-8", "replace")
    conn, channel = _parse_interface_name(name, index)
    tsresol = options.get(IF_TSRESOL, [bytes([6])])[0][:1] or bytes([6])
    return linktype, conn, channel, tsresol[0]


def _parse_interface_name(name: str, index: int) -> tuple[int, int]:
    base, _, channel = name.partition("-")
    if base.startswith("conn") and base[4:].isdigit():
        return int(base[4:]), 1 if channel == CHANNELS[1] else MAIN
    return index, MAIN       # someone else's interface: one connection per interface


def _message_of(body: bytes, interfaces: list[tuple[int, int, int, int]],
                problems: list[str]) -> Message | None:
    if len(body) < 20:
        problems.append("enhanced packet block too short: skipped")
        return None
    interface, ts_high, ts_low, caplen, origlen = struct.unpack_from("<IIIII", body)
    if interface >= len(interfaces) or caplen > len(body) - 20:
        problems.append(f"packet on undeclared interface {interface} or cut short: skipped")
        return None
    linktype, conn, channel, tsresol = interfaces[interface]
    packet = body[20:20 + caplen]
    header_len = _pdu_header_length(packet) if linktype == LINKTYPE_WIRESHARK_UPPER_PDU else None
    if header_len is None:
        problems.append(f"packet on interface {interface} is not an exported vfio_user PDU: skipped")
        return None
    options = _parse_options(body[20 + caplen + (-caplen % 4):])
    flags = options.get(EPB_FLAGS, [b"\0\0\0\0"])[0]
    direction = S2C if len(flags) == 4 and struct.unpack("<I", flags)[0] & 3 == FLAG_OUTBOUND \
        else C2S
    fds = next((v for v in map(_custom_value, options.get(OPT_CUSTOM_BINARY, []))
                if isinstance(v, list)), [])
    data = packet[header_len:]
    wire = origlen - header_len
    return Message(_nanoseconds((ts_high << 32) | ts_low, tsresol), conn, channel, direction,
                   data, fds, wire if wire != len(data) else None)


def _pdu_header_length(packet: bytes) -> int | None:
    """Length of the Exported PDU tags when they name our dissector."""
    offset, ours = 0, False
    while offset + 4 <= len(packet):
        tag, length = struct.unpack_from(">HH", packet, offset)
        offset += 4
        if tag == EXP_PDU_TAG_END:
            return offset if ours else None
        if tag == EXP_PDU_TAG_DISSECTOR_NAME:
            ours = packet[offset:offset + length].rstrip(b"\0") == DISSECTOR_NAME
        offset += length
    return None


def _nanoseconds(ticks: int, tsresol: int) -> int:
    if tsresol & 0x80:
        return ticks * 10**9 >> (tsresol & 0x7F)
    exponent = tsresol - 9
    return ticks // 10**exponent if exponent >= 0 else ticks * 10**-exponent


def _custom_value(option: bytes) -> Any:
    """The value of one of our custom options or blocks; None for others'."""
    if len(option) < 8 or struct.unpack_from("<I", option)[0] != PEN \
            or option[4:8] != CUSTOM_MAGIC:
        return None
    try:
        return msgpack.unpackb(option[8:], raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return None


def _event_of(body: bytes) -> Event | None:
    options = _parse_options(body[12:])
    value = next(filter(None, map(_custom_value, options.get(OPT_CUSTOM_BINARY, []))), None)
    if (isinstance(value, list) and len(value) == 4 and value[0] in EVENT_NAMES
            and isinstance(value[1], int) and isinstance(value[2], int)
            and isinstance(value[3], dict)):
        return Event(*value)
    return None

