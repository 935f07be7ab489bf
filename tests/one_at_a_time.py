"""A raw server for fd-attribution tests: reads one message at a time, as
libvfio-user and QEMU do (the header by recvmsg with room for fds, then the
body by recv), so the fds it gets with a message are the ones the kernel
delivers with that message's first bytes.

    one_at_a_time.py SOCKET COUNT

Accepts one connection, reads COUNT messages and prints one JSON line: for
each message its msg_id and the kinds of the fds that came with it.  Then it
waits for a line on stdin and answers with its own burst, written as fast as
it can: COUNT replies, each echoing a request's msg_id and carrying an
eventfd where the request carried fds (fd-less replies in between), and
prints "sent".
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys

from vfu_inspect.sockio import fd_info, fds_from_ancillary, send_all

HEADER = struct.Struct("<HHIII")


def recv_message(conn: socket.socket) -> tuple[bytes, list[int]]:
    head, ancdata, _, _ = conn.recvmsg(HEADER.size, socket.CMSG_SPACE(64 * 4),
                                       socket.MSG_WAITALL)
    fds = fds_from_ancillary(ancdata)
    if len(head) < HEADER.size:
        raise SystemExit(f"short header {head!r} fds {fds}")
    size = HEADER.unpack(head)[2]
    body = conn.recv(size - HEADER.size, socket.MSG_WAITALL) if size > HEADER.size else b""
    return head + body, fds


def main() -> None:
    path, count = sys.argv[1], int(sys.argv[2])
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    conn, _ = listener.accept()
    seen = []
    for _ in range(count):
        data, fds = recv_message(conn)
        msg_id, cmd = HEADER.unpack_from(data)[:2]
        seen.append({"msg_id": msg_id, "cmd": cmd, "fds": [fd_info(fd)["kind"] for fd in fds]})
        for fd in fds:
            os.close(fd)
    print(json.dumps(seen), flush=True)
    sys.stdin.readline()
    eventfd = os.eventfd(0)
    for entry in seen:
        reply = HEADER.pack(entry["msg_id"], entry["cmd"], HEADER.size, 1, 0)
        send_all(conn, reply, [eventfd] if entry["fds"] else [])
    print("sent", flush=True)
    sys.stdin.readline()


if __name__ == "__main__":
    main()
