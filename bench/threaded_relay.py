"""The proxy's work for `-w`, in a thread per direction: a yardstick for
bench/proxy_bench.py, which shows what a threaded proxy would gain and lose.

Each direction's thread blocks in recvmsg, as the blind relay's do, and
runs the proxy's own code for a plain chunk: it sends the chunk on, then
pairs its requests and replies and records it (Proxy._record_whole, with
the save addon).  One lock, held from before the send, keeps the
capture in the order the peers saw: a reply's thread cannot record it
before its request's thread, which sent that request, has recorded it.
None of the rest of the proxy: no faults, no --trace-irqs, no twin socket
interposition, a chunk's fds sent with its first byte.

    python bench/threaded_relay.py LISTEN SERVER CAPTURE
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import socket
import sys
import threading
import time

from vfu_inspect import registry
from vfu_inspect.addons import SaveAddon
from vfu_inspect.proxy import FLUSH_INTERVAL, Connection, Proxy, Side
from vfu_inspect.records import MAIN
from vfu_inspect.sockio import recv_chunk, send_all


class ThreadedRelay:
    def __init__(self, listen: str, server: str, capture: str) -> None:
        self.server = server
        self.proxy = Proxy(listen, server, [SaveAddon(capture, "threaded relay")])
        self.lock = threading.Lock()

    def pump(self, src: Side, dst: Side) -> None:
        while True:
            data, fds = recv_chunk(src.sock)
            if not data:
                dst.sock.shutdown(socket.SHUT_WR)
                return
            now = time.time_ns()
            with self.lock:
                send_all(dst.sock, data, fds)
                self.record(src, data, now)

    def record(self, src: Side, data: bytes, now: int) -> None:
        sizes = src.framer.whole(data)
        if sizes is None:       # the proxy would frame it: not what this measures
            print("threaded relay: a chunk that is not whole messages", file=sys.stderr)
            os._exit(2)         # from a thread: sys.exit would end only the thread
        self.proxy._record_whole(src, data, sizes, now)

    def flush_often(self) -> None:
        while True:
            time.sleep(FLUSH_INTERVAL)
            with self.lock:
                self.proxy._emit_flush()

    def stop(self, *_: object) -> None:
        with self.lock:
            self.proxy._emit_flush()
            for addon in self.proxy.addons:
                addon.done()
        sys.exit(0)

    def serve(self, listener: socket.socket) -> None:
        threading.Thread(target=self.flush_often, daemon=True).start()
        for number in itertools.count():
            client, _ = listener.accept()
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.connect(self.server)
            conn = Connection(number)
            conn.channel(client, server, MAIN)
            from_client, from_server = conn.sides
            for src, dst in ((from_client, from_server), (from_server, from_client)):
                threading.Thread(target=self.pump, args=(src, dst), daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("listen")
    parser.add_argument("server")
    parser.add_argument("capture")
    args = parser.parse_args()
    registry.load()
    relay = ThreadedRelay(args.listen, args.server, args.capture)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(args.listen)
    listener.listen(8)
    signal.signal(signal.SIGTERM, relay.stop)
    relay.serve(listener)


if __name__ == "__main__":
    main()
