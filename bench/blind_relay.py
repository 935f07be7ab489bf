"""A blind relay: the least a UNIX-socket proxy can do (no framing, no decoding).

The baseline for bench/proxy_bench.py.  By default one thread per direction,
each blocked in recvmsg; with --epoll one thread for both, waiting in epoll
as the proxy does, so that the cost of waiting that way shows apart from the
proxy's work.  Each recvmsg is sent on with its fds.

    python bench/blind_relay.py [--epoll] LISTEN SERVER
"""

import argparse
import os
import selectors
import socket
import threading

from vfu_inspect.sockio import recv_chunk, send_all


def relay(src: socket.socket, dst: socket.socket) -> bool:
    """One recvmsg sent on; False at the end of the stream."""
    data, fds = recv_chunk(src)
    if not data:
        dst.shutdown(socket.SHUT_WR)
        return False
    send_all(dst, data, fds)
    for fd in fds:
        os.close(fd)
    return True


def pump(src: socket.socket, dst: socket.socket) -> None:
    while relay(src, dst):
        pass


def serve_threads(listener: socket.socket, server_path: str) -> None:
    while True:
        client, _ = listener.accept()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.connect(server_path)
        for src, dst in ((client, server), (server, client)):
            threading.Thread(target=pump, args=(src, dst), daemon=True).start()


def serve_epoll(listener: socket.socket, server_path: str) -> None:
    poller = selectors.DefaultSelector()
    poller.register(listener, selectors.EVENT_READ)
    while True:
        for key, _ in poller.select():
            if key.fileobj is listener:
                client, _ = listener.accept()
                server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                server.connect(server_path)
                poller.register(client, selectors.EVENT_READ, server)
                poller.register(server, selectors.EVENT_READ, client)
            elif not relay(key.fileobj, key.data):
                poller.unregister(key.fileobj)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epoll", action="store_true", help="one thread waiting in epoll")
    parser.add_argument("listen")
    parser.add_argument("server")
    args = parser.parse_args()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(args.listen)
    listener.listen(8)
    (serve_epoll if args.epoll else serve_threads)(listener, args.server)


if __name__ == "__main__":
    main()
