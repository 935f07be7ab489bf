"""Import strace logs of a vfio-user client and/or server.

    strace -f -yy -xx -s 1100000 -tt -e trace=sendmsg,recvmsg,sendto,recvfrom -o LOG CMD

`-yy` names each socket by its inode and its peer's (`3<UNIX-STREAM:[20997->20984]>`)
and each passed fd by what it is; `-xx` keeps bytes exact; `-s` must exceed the
largest message.  Both ends of a connection are paired by inode.  The side
that sends VERSION is the client.  Where the sender was traced its sends are
used (exactly what it wrote), otherwise the receiver's recvs.  A socket passed
in a message (the twin socket) becomes that connection's twin channel.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from . import ImportResult
from ..dissect import expects_reply
from ..dissectors import vfio_user as proto
from ..framing import Frame, Framer, answered_early
from ..records import C2S, MAIN, S2C, TWIN, Message

_LINE = re.compile(r"^(?:\[pid\s+)?(?P<pid>\d+)?\]?\s*(?P<ts>\d+(?::\d+:\d+)?\.\d+)?\s*(?P<rest>.*)$")
# "= ?": the process ended inside the call (a thread blocked in recvmsg at exit).
_CALL = re.compile(r"^(?P<name>sendmsg|recvmsg|sendto|recvfrom)\((?P<args>.*)\)\s+=\s+"
                   r"(?P<ret>-?\d+|\?)(?:\s.*)?$")
_UNFINISHED = re.compile(r"^(?P<head>(?:sendmsg|recvmsg|sendto|recvfrom)\(.*?)\s*<unfinished \.\.\.>$")
_RESUMED = re.compile(r"^<\.\.\. (?P<name>\w+) resumed>\s?(?P<tail>.*)$")
_SOCKET = re.compile(r"^\d+<(?:UNIX(?:-STREAM)?):\[(?P<own>\d+)(?:->(?P<peer>\d+))?")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"(\.\.\.)?')
_IOV = re.compile(r'iov_base="((?:[^"\\]|\\.)*)"(\.\.\.)?')
_RIGHTS = "cmsg_type=SCM_RIGHTS, cmsg_data=["
_FD = re.compile(r"(?:, )?\d+<((?:->|[^<>]|<[^<>]*>)*)>")
_ESCAPES = {"n": 10, "t": 9, "r": 13, "v": 11, "f": 12, "a": 7, "b": 8, '"': 34, "\\": 92}


@dataclass
class Chunk:
    """What one syscall moved on one socket."""

    order: tuple[float, int]        # (timestamp, position) for sorting
    ts_ns: int
    data: bytes
    fds: list[dict[str, Any]]


@dataclass
class Endpoint:
    """One socket, by inode: what it sent and received."""

    inode: int
    peer: int | None = None
    sent: list[Chunk] = field(default_factory=list)
    received: list[Chunk] = field(default_factory=list)


def import_strace(paths: list[str]) -> ImportResult:
    result = ImportResult()
    endpoints: dict[int, Endpoint] = {}
    twins: set[frozenset[int]] = set()
    for index, path in enumerate(paths):
        _read_log(path, index, endpoints, twins, result)
    _build(endpoints, twins, result)
    if not result.records and not result.problems:
        result.problems.append("no sendmsg/recvmsg/sendto/recvfrom on a UNIX socket "
                               "was found (was strace run with -yy?)")
    return result


# --- parsing ---------------------------------------------------------------------

def _read_log(path: str, file_index: int, endpoints: dict[int, Endpoint],
              twins: set[frozenset[int]], result: ImportResult) -> None:
    unfinished: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as lines:
        for lineno, line in enumerate(lines, 1):
            m = _LINE.match(line.rstrip("\n"))
            pid, ts, rest = m.group("pid") or "", m.group("ts"), m.group("rest")
            if (u := _UNFINISHED.match(rest)) is not None:
                unfinished[pid] = u.group("head")
                continue
            if (r := _RESUMED.match(rest)) is not None:
                if pid not in unfinished:
                    continue
                rest = unfinished.pop(pid) + r.group("tail")
            call = _CALL.match(rest)
            if call is None:
                if rest.startswith(("sendmsg(", "recvmsg(", "sendto(", "recvfrom(")):
                    result.problems.append(f"{path}:{lineno}: cannot parse this call")
                continue
            where = f"{path}:{lineno}"
            order = (_seconds(ts) if ts else 0.0, file_index * 10**9 + lineno)
            _record_call(call, order, where, endpoints, twins, result)


def _record_call(call: re.Match, order: tuple[float, int], where: str,
                 endpoints: dict[int, Endpoint], twins: set[frozenset[int]],
                 result: ImportResult) -> None:
    ret = int(call.group("ret")) if call.group("ret") != "?" else 0
    if ret <= 0:
        return                                      # an error, EOF, nothing moved or unknown
    args = call.group("args")
    sock = _SOCKET.match(args)
    if sock is None:
        return                                      # not a UNIX socket: not ours
    name = call.group("name")
    if name in ("sendmsg", "recvmsg"):
        strings = _IOV.findall(args)
    else:   # the buffer is the first string after the socket's own description
        strings = _STRING.findall(args, args.find(">, ") + 3)[:1]
    if any(truncated for _, truncated in strings):
        result.problems.append(f"{where}: {name} data was cut by strace -s; "
                               "record again with a larger -s")
        return
    data = b"".join(_unescape(text) for text, _ in strings)[:ret]
    if len(data) < ret:
        result.problems.append(f"{where}: {name} moved {ret} bytes but strace shows {len(data)}")
        return
    fds = [_fd_kind(desc, twins) for desc in _passed_fds(args)]
    own = int(sock.group("own"))
    endpoint = endpoints.setdefault(own, Endpoint(own))
    if sock.group("peer"):
        endpoint.peer = int(sock.group("peer"))
    chunk = Chunk(order, int(order[0] * 1e9), data, fds)
    (endpoint.sent if name.startswith("send") else endpoint.received).append(chunk)


def _passed_fds(args: str) -> list[str]:
    """The -yy descriptions of the fds in SCM_RIGHTS, e.g. "/memfd:dma (deleted)"."""
    found, pos = [], args.find(_RIGHTS)
    if pos < 0:
        return found
    pos += len(_RIGHTS)
    while (m := _FD.match(args, pos)) is not None:
        found.append(_unescape(m.group(1)).decode("utf-8", "replace"))
        pos = m.end()
    return found


def _fd_kind(desc: str, twins: set[frozenset[int]]) -> dict[str, Any]:
    sock = re.match(r"(?:UNIX(?:-STREAM)?|socket):\[(\d+)(?:->(\d+))?", desc)
    if sock:
        if sock.group(2):
            twins.add(frozenset((int(sock.group(1)), int(sock.group(2)))))
        return {"kind": "socket", "inode": int(sock.group(1))}
    if desc.startswith("/memfd:"):
        return {"kind": "memfd"}
    if desc == "anon_inode:[eventfd]":
        return {"kind": "eventfd"}
    if desc.startswith("/"):
        return {"kind": "file"}
    return {"kind": "other"}


def _unescape(text: str) -> bytes:
    out, i = bytearray(), 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out += ch.encode()
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "x":
            out.append(int(text[i + 2:i + 4], 16))
            i += 4
        elif nxt.isdigit():
            digits = re.match(r"[0-7]{1,3}", text[i + 1:]).group()
            out.append(int(digits, 8))
            i += 1 + len(digits)
        else:
            out.append(_ESCAPES.get(nxt, ord(nxt)))
            i += 2
    return bytes(out)


def _seconds(ts: str) -> float:
    if ":" in ts:
        h, m, s = ts.split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)
    return float(ts)


# --- building messages ---------------------------------------------------------------

def _build(endpoints: dict[int, Endpoint], twins: set[frozenset[int]],
           result: ImportResult) -> None:
    pairs = _connections(endpoints, result)
    main_pairs = [p for p in pairs if frozenset(p) not in twins]
    records: list[tuple[tuple, Message]] = []
    for conn_id, (a, b) in enumerate(main_pairs):
        client = _client_of(endpoints, a, b)
        if client is None:
            result.problems.append(f"sockets {a}/{b}: no VERSION command seen, "
                                   "cannot tell the client from the server")
            continue
        server = b if client == a else a
        records += _messages(endpoints, client, server, conn_id, MAIN, result)
        for twin in _twins_of(endpoints, client, server, twins, pairs):
            records += _messages(endpoints, twin[0], twin[1], conn_id, TWIN, result)
    records.sort(key=lambda item: item[0])
    result.records.extend(message for _, message in records)


def _connections(endpoints: dict[int, Endpoint], result: ImportResult) -> list[tuple[int, int]]:
    pairs, seen = [], set()
    for inode, endpoint in sorted(endpoints.items(), key=lambda e: _first(e[1])):
        if endpoint.peer is None:
            result.problems.append(f"socket {inode}: strace did not show its peer (use -yy)")
            continue
        key = frozenset((inode, endpoint.peer))
        if key not in seen:
            seen.add(key)
            pairs.append((inode, endpoint.peer))
    return pairs


def _first(endpoint: Endpoint) -> tuple:
    chunks = endpoint.sent + endpoint.received
    return min(c.order for c in chunks) if chunks else (0.0, 0)


def _stream(endpoints: dict[int, Endpoint], sender: int, receiver: int) -> list[Chunk]:
    """What `sender` sent to `receiver`: its sends if traced, else the receiver's recvs."""
    sent = endpoints.get(sender, Endpoint(sender)).sent
    return sent if sent else endpoints.get(receiver, Endpoint(receiver)).received


def _client_of(endpoints: dict[int, Endpoint], a: int, b: int) -> int | None:
    for sender, receiver in ((a, b), (b, a)):
        stream = _stream(endpoints, sender, receiver)
        header = proto.parse_header(stream[0].data) if stream else None
        if header is not None and header.cmd == proto.CMD["VERSION"] and not header.is_reply:
            return sender
    return None


def _twins_of(endpoints: dict[int, Endpoint], client: int, server: int,
              twins: set[frozenset[int]], pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Twin sockets passed on this connection, as (client end, server end)."""
    passed = {fd["inode"] for side in (client, server)
              for chunk in _stream(endpoints, side, client if side == server else server)
              for fd in chunk.fds if fd["kind"] == "socket" and "inode" in fd}
    found = []
    for a, b in pairs:
        if frozenset((a, b)) in twins and (a in passed or b in passed):
            found.append((a, b) if a in passed else (b, a))
    return found


def _messages(endpoints: dict[int, Endpoint], client: int, server: int, conn_id: int,
              channel: int, result: ImportResult) -> list[tuple[tuple, Message]]:
    """Both directions framed together, in the order the syscalls ran, so that
    a reply can cut a request whose body never came (framing.answered_early);
    each message is ordered by the syscall its first byte came with."""
    sides = {C2S: _Direction(C2S, _stream(endpoints, client, server)),
             S2C: _Direction(S2C, _stream(endpoints, server, client))}
    chunks = sorted(((chunk.order, side.direction, i) for side in sides.values()
                     for i, chunk in enumerate(side.chunks)))
    out: list[tuple[tuple, Message]] = []
    for _, direction, i in chunks:
        side, other = sides[direction], sides[1 - direction]
        for frame in side.feed(i):
            for early in answered_early(frame, other.framer, other.waiting.__getitem__):
                out.append(other.message(early, conn_id, channel, side))
            out.append(side.message(frame, conn_id, channel, other))
    for side in sides.values():
        leftover = side.framer.close()
        if leftover is not None:
            result.problems.append(f"conn {conn_id} {('c2s', 's2c')[side.direction]}: "
                                   f"{leftover.error}")
    return out


class _Direction:
    """One direction of a channel: its chunks, framer, and requests awaiting a reply."""

    def __init__(self, direction: int, chunks: list[Chunk]) -> None:
        self.direction, self.chunks, self.framer = direction, chunks, Framer()
        self.starts: list[int] = []          # stream offset of each chunk fed
        self.fed = self.consumed = 0
        self.waiting: Counter[int] = Counter()   # msg_id -> requests awaiting a reply

    def feed(self, index: int) -> list[Frame]:
        chunk = self.chunks[index]
        self.starts.append(self.fed)
        self.fed += len(chunk.data)
        return self.framer.feed(chunk.data, chunk.fds)

    def message(self, frame: Frame, conn_id: int, channel: int,
                other: _Direction) -> tuple[tuple, Message]:
        chunk = self.chunks[bisect.bisect_right(self.starts, self.consumed) - 1]
        self.consumed += frame.size
        header = proto.parse_header(frame.data)
        if header is not None and expects_reply(header):
            self.waiting[header.msg_id] += 1
        elif header is not None and header.is_reply and other.waiting[header.msg_id]:
            other.waiting[header.msg_id] -= 1
        msg = Message(chunk.ts_ns, conn_id, channel, self.direction, frame.data, frame.fds,
                      frame.size if frame.truncated else None)
        return (chunk.order, self.consumed), msg
