"""A blind relay: the least a UNIX-socket proxy can do (no framing, no decoding).

The baseline for bench/proxy_bench.py.  One thread per direction; each recvmsg
is sent on with its fds.   python bench/blind_relay.py LISTEN SERVER
"""

import os
import socket
import sys
import threading

from vfu_inspect.sockio import recv_chunk, send_all


def pump(src: socket.socket, dst: socket.socket) -> None:
    while True:
        data, fds = recv_chunk(src)
        if not data:
            dst.shutdown(socket.SHUT_WR)
            return
        send_all(dst, data, fds)
        for fd in fds:
            os.close(fd)


def main() -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sys.argv[1])
    listener.listen(8)
    while True:
        client, _ = listener.accept()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.connect(sys.argv[2])
        for src, dst in ((client, server), (server, client)):
            threading.Thread(target=pump, args=(src, dst), daemon=True).start()


if __name__ == "__main__":
    main()
