"""pcapng files that Wireshark opens fully decoded, and read back losslessly.

Link type: LINKTYPE_WIRESHARK_UPPER_PDU (Exported PDU).  Each packet starts
with a tag naming the dissector ("vfio_user"), so Wireshark hands the message
to the Lua plugin with no "Decode As" or DLT_USER table to set up, the way
Wireshark's own "Export PDUs" files work.  LINKTYPE_USER0 would need that
setup on every machine.

One interface per (connection, channel); the EPB flags carry the direction,
seen from the server's socket (client to server = inbound); timestamps are in
nanoseconds (if_tsresol 9).  What pcapng has no field for is kept in
vfu-inspect's own custom options, so that `import` gives back the
capture records exactly:
- a message's fd list, as a custom option of its EPB;
- connection open/close events and notes, as Interface Statistics Blocks
  (with a readable comment) where they happened in the stream.
A packet comment lists the fds and expert items for people and filters
(`frame.comment contains "memfd"`).

Wireshark refuses packets over 256 KiB.  A bigger message is written as its
first 256 KiB (the EPB's original length says the whole size, as a snap
length would) followed by the rest in custom options of Interface Statistics
Blocks, which `import` puts back together.
"""

from __future__ import annotations

import os
import struct
from typing import Any, BinaryIO, Iterator

import msgpack

from .errors import CaptureError
from .events import describe_event
from .records import C2S, CHANNELS, EVENT_NAMES, MAIN, S2C, Burst, Event, Message, Record

SUFFIX = ".pcapng"

SHB, IDB, ISB, EPB = 0x0A0D0D0A, 0x00000001, 0x00000005, 0x00000006
BYTE_ORDER_MAGIC = 0x1A2B3C4D
LINKTYPE_WIRESHARK_UPPER_PDU = 252
OPT_END, OPT_COMMENT, OPT_CUSTOM_BINARY = 0, 1, 2989
SHB_USERAPPL, IF_NAME, IF_DESCRIPTION, IF_TSRESOL, EPB_FLAGS = 4, 2, 3, 9, 2
FLAG_INBOUND, FLAG_OUTBOUND = 1, 2
EPB_DIRECTION = {C2S: FLAG_INBOUND, S2C: FLAG_OUTBOUND}
# RFC 5612's enterprise number for examples: vfu-inspect has none of its own
# yet; the magic below tells our options from anyone else's.
PEN = 32473
CUSTOM_MAGIC = b"vfu1"
EXP_PDU_TAG_DISSECTOR_NAME, EXP_PDU_TAG_END = 12, 0
EXP_PDU_TAG_SRC_PORT, EXP_PDU_TAG_DST_PORT = 25, 26
DISSECTOR_NAME = b"vfio_user"

PACKET_LIMIT = 262144         # Wireshark's WTAP_MAX_PACKET_SIZE_STANDARD
OPTION_PIECE = 65000          # an option's length is 16 bits
REST_PER_BLOCK = 1 << 20      # keeps each block of a huge message's rest small
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


def _ticks(ts_ns: int) -> tuple[int, int]:
    ts_ns = min(max(ts_ns, 0), (1 << 64) - 1)      # a record's time, however odd, fits
    return ts_ns >> 32, ts_ns & 0xFFFFFFFF


def _text(text: str) -> bytes:
    """A text option's value: UTF-8, cut to the 16-bit option length."""
    return text.encode()[:0xFFFF].decode("utf-8", "ignore").encode()


def _ours_options(value: dict[str, Any]) -> bytes:
    """vfu-inspect's value as custom options: as many as its size needs, each
    holding the next piece (an option's length is 16 bits)."""
    data = msgpack.packb(value, use_bin_type=True)
    tag = struct.pack("<I", PEN) + CUSTOM_MAGIC
    return b"".join(_option(OPT_CUSTOM_BINARY, tag + data[start:start + OPTION_PIECE])
                    for start in range(0, len(data), OPTION_PIECE))


def pdu_header(conn: int, channel: int) -> bytes:
    """The Exported PDU tags: the dissector's name, and the connection and
    channel as source and destination "ports", which the plugin reads as
    pinfo.src_port / dst_port to keep connections apart when it pairs replies
    (frame fields such as the interface id are not there in tshark's first pass)."""
    name = _padded(DISSECTOR_NAME)
    return (struct.pack(">HH", EXP_PDU_TAG_DISSECTOR_NAME, len(name)) + name
            + struct.pack(">HHI", EXP_PDU_TAG_SRC_PORT, 4, conn & 0xFFFFFFFF)
            + struct.pack(">HHI", EXP_PDU_TAG_DST_PORT, 4, channel)
            + struct.pack(">HH", EXP_PDU_TAG_END, 0))


PDU_HEADER_SIZE = len(pdu_header(0, MAIN))


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
            _option(OPT_COMMENT, _text(source)) if source else b"")
        file.write(_block(SHB, shb))

    def write(self, record: Record | Burst, comment: str | None = None) -> None:
        """Write a record (a burst as its messages); a message's comment
        defaults to its fd list."""
        if isinstance(record, Message):
            self.message(record, fd_comment(record.fds) if comment is None else comment)
        elif isinstance(record, Burst):
            for msg in record.messages():
                self.message(msg)
        else:
            self.event(record)

    def message(self, msg: Message, comment: str = "") -> None:
        interface = self._interface(msg.conn, msg.channel)
        fit = PACKET_LIMIT - PDU_HEADER_SIZE
        packet, rest = pdu_header(msg.conn, msg.channel) + msg.data[:fit], msg.data[fit:]
        ours = {key: value for key, value in (("fds", msg.fds), ("rest", len(rest))) if value}
        options = _options(
            _option(EPB_FLAGS, struct.pack("<I", EPB_DIRECTION[msg.direction])),
            _option(OPT_COMMENT, _text(comment)) if comment else b"",
            _ours_options(ours) if ours else b"")
        body = struct.pack("<IIIII", interface, *_ticks(msg.ts_ns),
                           len(packet), PDU_HEADER_SIZE + msg.wire_size)
        self._file.write(_block(EPB, body + _padded(packet) + options))
        for start in range(0, len(rest), REST_PER_BLOCK):
            self._statistics(interface, msg.ts_ns, {"rest": rest[start:start + REST_PER_BLOCK]})

    def event(self, event: Event) -> None:
        self._statistics(self._interface(event.conn, MAIN), event.ts_ns,
                         {"event": event.to_record()}, describe_event(event))

    def _statistics(self, interface: int, ts_ns: int, ours: dict[str, Any],
                    comment: str = "") -> None:
        """An Interface Statistics Block: Wireshark keeps it out of the packet
        list, so frame numbers stay message numbers."""
        options = _options(_option(OPT_COMMENT, _text(comment)) if comment else b"",
                           _ours_options(ours))
        body = struct.pack("<III", interface, *_ticks(ts_ns))
        self._file.write(_block(ISB, body + options))

    def flush(self) -> None:
        self._file.flush()

    def _interface(self, conn: int, channel: int) -> int:
        key = (conn, channel)
        if key not in self._interfaces:
            self._interfaces[key] = len(self._interfaces)
            idb = struct.pack("<HHI", LINKTYPE_WIRESHARK_UPPER_PDU, 0, 0) + _options(
                _option(IF_NAME, interface_name(conn, channel).encode()),
                _option(IF_DESCRIPTION, _text(interface_description(conn, channel, self.source))),
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
    """Every record of a pcapng file vfu-inspect wrote, and what was odd."""
    problems: list[str] = []
    return list(iter_pcapng(path, problems)), problems


def iter_pcapng(path: str | os.PathLike[str], problems: list[str]) -> Iterator[Record]:
    """The capture records of a pcapng file, one at a time; what was odd is
    appended to `problems`.  Packets of other link types or without our
    Exported PDU header are skipped and reported; a file cut short yields what
    came before the cut."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise CaptureError(f"cannot open {path}: {exc.strerror}") from None
    with f:
        yield from _records(f, problems)


def _records(f: BinaryIO, problems: list[str]) -> Iterator[Record]:
    interfaces: list[tuple[int, int, int, int]] = []   # linktype, conn, channel, tsresol
    split: tuple[Message, int] | None = None          # a message and the bytes still due
    first = True
    for kind, body in _blocks(f, problems):
        if first and kind != SHB:
            raise CaptureError("not a pcapng file (no section header block)")
        first = False
        if kind == ISB and split is not None:
            msg, due = split
            chunk = _ours(body[12:]).get("rest", b"")
            msg.data += chunk if isinstance(chunk, bytes) else b""
            if len(msg.data) >= due:
                yield _whole(msg)
                split = None
            continue
        if split is not None:
            problems.append("a message split over blocks lacks its end: kept truncated")
            yield _whole(split[0])
            split = None
        if kind == SHB:
            interfaces = []
        elif kind == IDB:
            interfaces.append(_interface_of(body, len(interfaces)))
        elif kind == EPB:
            msg, rest = _message_of(body, interfaces, problems)
            if rest:
                split = msg, len(msg.data) + rest
            elif msg is not None:
                yield msg
        elif kind == ISB:
            event = _event_of(_ours(body[12:]).get("event"))
            if event is not None:
                yield event
    if split is not None:
        problems.append("file ends inside a message split over blocks: kept truncated")
        yield _whole(split[0])


def _whole(msg: Message) -> Message:
    """Now that the data is complete (or all there is), size says if it is not."""
    msg.size = msg.size if msg.size != len(msg.data) else None
    return msg


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
                problems: list[str]) -> tuple[Message | None, int]:
    """The message of an EPB, and how many of its bytes follow in other blocks."""
    if len(body) < 20:
        problems.append("enhanced packet block too short: skipped")
        return None, 0
    interface, ts_high, ts_low, caplen, origlen = struct.unpack_from("<IIIII", body)
    if interface >= len(interfaces) or caplen > len(body) - 20:
        problems.append(f"packet on undeclared interface {interface} or cut short: skipped")
        return None, 0
    linktype, conn, channel, tsresol = interfaces[interface]
    packet = body[20:20 + caplen]
    header_len = _pdu_header_length(packet) if linktype == LINKTYPE_WIRESHARK_UPPER_PDU else None
    if header_len is None:
        problems.append(f"packet on interface {interface} is not an exported vfio_user PDU: skipped")
        return None, 0
    options = _parse_options(body[20 + caplen + (-caplen % 4):])
    flags = options.get(EPB_FLAGS, [b"\0\0\0\0"])[0]
    direction = S2C if len(flags) == 4 and struct.unpack("<I", flags)[0] & 3 == FLAG_OUTBOUND \
        else C2S
    ours = _ours_of(options)
    fds, rest = ours.get("fds", []), ours.get("rest", 0)
    if not isinstance(fds, list) or not all(isinstance(fd, dict) for fd in fds):
        problems.append("a packet's fd records are not valid: dropped")
        fds = []
    rest = rest if isinstance(rest, int) and rest > 0 else 0
    msg = Message(_nanoseconds((ts_high << 32) | ts_low, tsresol), conn, channel, direction,
                  packet[header_len:], fds, origlen - header_len)
    return (msg, rest) if rest else (_whole(msg), 0)


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


def _ours(options: bytes) -> dict[str, Any]:
    return _ours_of(_parse_options(options))


def _ours_of(options: dict[int, list[bytes]]) -> dict[str, Any]:
    """What vfu-inspect keeps in its custom options: {} when there is none."""
    tag = struct.pack("<I", PEN) + CUSTOM_MAGIC
    pieces = [o[8:] for o in options.get(OPT_CUSTOM_BINARY, []) if o[:8] == tag]
    try:
        value = msgpack.unpackb(b"".join(pieces), raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return {}             # TypeError: damage made a map key of a list
    return value if isinstance(value, dict) else {}


def _event_of(value: Any) -> Event | None:
    if (isinstance(value, list) and len(value) == 4 and value[0] in EVENT_NAMES
            and isinstance(value[1], int) and isinstance(value[2], int)
            and isinstance(value[3], dict)):
        return Event(*value)
    return None

