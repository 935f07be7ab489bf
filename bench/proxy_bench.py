"""Round trips per second against the sample server: direct, through a blind
relay, and through `vfu-inspect proxy -w`, lock-step and pipelined.

    python bench/proxy_bench.py [--rounds N] [--depth 16]

Each round trip is a 4-byte REGION_READ of BAR0.  Prints the rates and the
ratios the targets are stated in: proxy time / blind-relay time and
proxy time / direct time.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vfu_inspect.dissectors.vfio_user import CMD, Header, RegionRead, Version
from vfu_inspect.sockio import MessageSocket

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from helpers import wait_for_socket  # noqa: E402


def connect(path: Path) -> MessageSocket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    conn = MessageSocket(sock)
    conn.send(bytes(Header(msg_id=0, cmd=CMD["VERSION"]) /
                    Version(major=0, minor=0, json=b'{"capabilities":{}}\0')))
    conn.recv()
    return conn


def read_request(msg_id: int) -> bytes:
    return bytes(Header(msg_id=msg_id & 0xFFFF, cmd=CMD["REGION_READ"]) /
                 RegionRead(offset=0, region=0, count=4))


def round_trips(path: Path, rounds: int, depth: int) -> float:
    """Round trips per second with `depth` requests kept in flight."""
    conn = connect(path)
    requests = [read_request(i) for i in range(rounds)]
    start = time.perf_counter()
    sent = 0
    for _ in range(min(depth, rounds)):
        conn.send(requests[sent])
        sent += 1
    for _ in range(rounds):
        conn.recv()
        if sent < rounds:
            conn.send(requests[sent])
            sent += 1
    elapsed = time.perf_counter() - start
    conn.close()
    return rounds / elapsed


def start(args: list[str], sock: Path) -> subprocess.Popen:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_socket(sock, proc)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20000)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    server, relay, proxy = tmp / "server.sock", tmp / "relay.sock", tmp / "proxy.sock"
    vfu = [sys.executable, "-m", "vfu_inspect"]
    procs = [start([*vfu, "sample-server", "--listen", str(server)], server)]
    procs.append(start([sys.executable, str(HERE / "blind_relay.py"), str(relay), str(server)],
                       relay))
    procs.append(start([*vfu, "proxy", "--listen", str(proxy), "--server", str(server),
                        "-w", str(tmp / "bench.vfucap")], proxy))
    # The same with every message dissected and analyzed (to /dev/null): the
    # analysis runs off the relay thread, so the rate should not drop.
    printing = tmp / "printing.sock"
    procs.append(start([*vfu, "proxy", "--listen", str(printing), "--server", str(server),
                        "-w", str(tmp / "printing.vfucap"), "--print"], printing))
    try:
        for label, depth in (("lock-step", 1), (f"pipelined ({args.depth} in flight)", args.depth)):
            rates = {name: max(round_trips(path, args.rounds, depth) for _ in range(args.repeat))
                     for name, path in (("direct", server), ("blind relay", relay),
                                        ("proxy -w", proxy),
                                        ("proxy -w --print", printing))}
            print(f"{label}: " + ", ".join(f"{n} {r:,.0f} rt/s" for n, r in rates.items()))
            print(f"  proxy/blind time ratio {rates['blind relay'] / rates['proxy -w']:.2f}x "
                  f"(target <= 1.1), proxy/direct {rates['direct'] / rates['proxy -w']:.2f}x "
                  f"(target <= 2 lock-step), --print/-w {rates['proxy -w --print'] / rates['proxy -w']:.2f}x")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
