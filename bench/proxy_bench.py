"""Round trips per second through `vfu-inspect proxy -w`, against two peers.

* libvfio-user: its gpio-pci-idio-16 sample driven by the C client vfu_rtbench
  (no Python on either end: the yardstick for the proxy's own cost), each
  1-byte REGION_READ of BAR2 one round trip.  Direct, through the blind relay
  (bench/blind_relay.py: a thread per direction blocked in recvmsg; and, for
  comparison, with --epoll, one thread waiting in epoll as the proxy does),
  through the proxy's work for -w done in a thread per direction
  (bench/threaded_relay.py: what a threaded proxy would gain and lose),
  through the proxy, and through the proxy with fault
  rules configured that match none of these messages (decided on the header:
  target <= 1.05x the proxy without them; and rules that hold every
  REGION_READ to dissect it, for comparison), lock-step and pipelined, in
  interleaved passes; prints the median of the passes, and each proxy's CPU
  time per round trip (from /proc, in 10 ms ticks; the least of the passes
  is the least disturbed by what else the shared machine runs).
* sample: the sample server driven by a Python client (4-byte REGION_READs of
  BAR0): direct, blind relay, proxy -w and proxy -w --print, best of --repeat.

    LIBVFIO_USER_BUILD=/opt/vfu-peers/libvfio-user/build \\
        python bench/proxy_bench.py [--peer both|libvfio-user|sample] [--ops N]

VFU_RTBENCH names the C client (default /opt/vfu-peers/vfu_rtbench).  The
targets are proxy / blind-relay time per op: <= 1.1x lock-step, <= 1.2x
pipelined; proxy with non-matching faults / proxy: <= 1.05x in time per round
trip (what the peers see; also the median of each pass's ratio, the two run
back to back, which the machine's drift between runs does not reach), its CPU
time printed beside it.  The only work rules that match nothing add to the
relay is the gate's header check of each chunk (faults.Gate.all_pass): its
CPU time per round trip, measured in-process on the session's own messages,
is printed as a share of the proxy's, a figure the machine's noise hardly
reaches.  Each proxy's capture must hold every message of every run, so a
relay that loses messages fails the bench instead of looking fast.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections import Counter
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

from vfu_inspect import registry
from vfu_inspect.addons import SaveAddon
from vfu_inspect.capture import CaptureReader
from vfu_inspect.dissectors.vfio_user import CMD, Header, RegionRead, Version
from vfu_inspect.faults import FaultInjector, Gate, load_rules
from vfu_inspect.proxy import Connection, Proxy, Side
from vfu_inspect.records import MAIN, Message
from vfu_inspect.sockio import RECV_CHUNK, MessageSocket, recv_chunk

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from helpers import stop, wait_for_socket  # noqa: E402

VFU = [sys.executable, "-m", "vfu_inspect"]
RELAY = [sys.executable, str(HERE / "blind_relay.py")]
THREADED = [sys.executable, str(HERE / "threaded_relay.py")]
DEFAULT_RTBENCH = "/opt/vfu-peers/vfu_rtbench"
# gpio-pci-idio-16's BAR2 (0x100 bytes): offset 1 is the input register of pins 0-7.
REGION, OFFSET, COUNT = 2, 1, 1
TARGET = {"lock-step": 1.1, "pipelined": 1.2}   # proxy / blind-relay time per op
FAULT_TARGET = 1.05                             # proxy --fault (none matching) / proxy
# Rules a REGION_READ session never matches, each ruled out by the header alone
# (another command, or a reply where a request is wanted) ...
NOT_MATCHING = ["vfio_user.cmd == DMA_MAP && dma_map.size > 0x100000: errno ENOMEM",
                "region_write.region == CONFIG: drop",
                "vfio_user.cmd == DEVICE_RESET && frame.dir == s2c: delay 10ms",
                "vfio_user.cmd == REGION_READ && vfio_user.flags.error: duplicate"]
# ... and one that every REGION_READ request may match until it is dissected.
DISSECTED = ["region_read.region == CONFIG && frame.dir == c2s: errno EIO"]


class BenchError(Exception):
    pass


# --- processes and captures ---------------------------------------------------

@contextmanager
def running(args: list[str], sock: Path, log: Path | None = None
            ) -> Iterator[subprocess.Popen]:
    """Run `args` until the block ends; it is ready once `sock` listens."""
    with open(log or os.devnull, "w") as err:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for_socket(sock, proc)
        yield proc
    finally:
        stop(proc)      # SIGTERM: the proxy flushes its capture and exits


def cpu_seconds(pid: int) -> float:
    """User + system time of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def check_capture(path: Path, runs: int, ops: int) -> None:
    """Each of `runs` connections must show VERSION and `ops` round trips."""
    with CaptureReader(path) as reader:
        counts = Counter(r.conn for r in reader if isinstance(r, Message))
        damage = reader.damage
    found = [counts[conn] for conn in sorted(counts)]
    expected = [2 * (ops + 1)] * runs
    if damage or found != expected:
        raise BenchError(f"{path.name}: messages per connection {found}, expected {expected}"
                         + (f" ({damage})" if damage else "") + ": the proxy lost messages")


def gate_cost(capture: Path, depth: int, rounds: int = 100_000) -> dict[str, float]:
    """CPU microseconds the --fault gate (NOT_MATCHING) takes per round trip,
    in-process, least of 5 runs: on the capture's first REGION_READ request
    and reply each read alone (lock-step), and in chunks of `depth` (pipelined).
    The machine's noise reaches this far less than it reaches the relay's time."""
    with CaptureReader(capture) as reader:
        request, reply = [r for r in reader if isinstance(r, Message)][2:4]
    injector = FaultInjector(load_rules(NOT_MATCHING))
    cost = {}
    for mode, window in modes(depth).items():
        total = 0.0
        for msg in (request, reply):
            gate = Gate(injector, msg.conn, msg.channel, msg.direction)
            chunk = memoryview(msg.data * window)
            gate.feed(chunk, [], 0)          # decides the header once, as the first message does
            runs = timeit.repeat(lambda: gate.all_pass(chunk, 0, 0), number=rounds, repeat=5,
                                 timer=time.process_time)
            total += min(runs) / rounds / window * 1e6
        cost[mode] = total
    return cost


def relay_cost(capture: Path, depth: int, tmp: Path, rounds: int = 2000
               ) -> dict[str, tuple[float, float]]:
    """CPU microseconds per round trip, in-process, least of 5 runs, of the
    proxy's relay (recvmsg, send, framing, pairing, the -w record) and of a
    blind one (recvmsg, sendmsg), over socketpairs: the capture's first
    REGION_READ request and reply, `window` of them per chunk.  Both sides'
    syscalls are in both figures; what the peers and the scheduler add is not."""
    with CaptureReader(capture) as reader:
        request, reply = [r.data for r in reader if isinstance(r, Message)][2:4]
    proxy = Proxy(str(tmp / "unused.sock"), str(tmp / "unused.sock"),
                  [SaveAddon(str(tmp / "relay-cost.vfucap"), "bench")])
    conn = proxy.connections[0] = Connection(0)
    client, client_end = socket.socketpair()
    server, server_end = socket.socketpair()
    proxy._add_channel(conn, client_end, server_end, MAIN)
    from_client, from_server = conn.sides

    def blind(src: socket.socket, dst: socket.socket) -> None:
        dst.sendmsg([recv_chunk(src)[0]])

    def through_proxy(side: Side, _: None) -> None:
        proxy._relay(side)

    cost = {}
    for mode, window in modes(depth).items():
        requests, replies = request * window, reply * window

        def rounds_through(relay: Callable, there: tuple, back: tuple) -> float:
            start = time.process_time()
            for _ in range(rounds):
                client.send(requests)
                relay(*there)
                server.recv(RECV_CHUNK)
                server.send(replies)
                relay(*back)
                client.recv(RECV_CHUNK)
            return (time.process_time() - start) / rounds / window * 1e6

        runs = [(rounds_through(through_proxy, (from_client, None), (from_server, None)),
                 rounds_through(blind, (client_end, server_end), (server_end, client_end)))
                for _ in range(5)]
        proxy._emit_flush()
        cost[mode] = (min(r[0] for r in runs), min(r[1] for r in runs))
    return cost


def modes(depth: int) -> dict[str, int]:
    return {"lock-step": 1, "pipelined": depth}


def label(mode: str, depth: int) -> str:
    return mode if mode == "lock-step" else f"{depth} in flight"


# --- libvfio-user + vfu_rtbench ---------------------------------------------

def find_peers() -> tuple[Path, Path]:
    """gpio-pci-idio-16 and vfu_rtbench, or exit saying what is missing."""
    build = os.environ.get("LIBVFIO_USER_BUILD", "")
    server = Path(build, "samples", "gpio-pci-idio-16")
    client = Path(os.environ.get("VFU_RTBENCH", DEFAULT_RTBENCH))
    missing = []
    if not build:
        missing.append("LIBVFIO_USER_BUILD is not set (libvfio-user's build directory, "
                       "e.g. /opt/vfu-peers/libvfio-user/build)")
    elif not os.access(server, os.X_OK):
        missing.append(f"{server} not found (LIBVFIO_USER_BUILD={build})")
    if not os.access(client, os.X_OK):
        missing.append(f"{client} not found (set VFU_RTBENCH to the vfu_rtbench binary)")
    if missing:
        sys.exit("proxy_bench: " + "\n  ".join(["cannot run the libvfio-user bench:", *missing,
                 "build them with the peers' build-libvfio-user.sh, or use --peer sample"]))
    return server, client


def rtbench(client: Path, sock: Path, ops: int, window: int) -> float:
    """Microseconds per round trip, from vfu_rtbench's last line ('... X us/op')."""
    argv = [str(a) for a in (client, sock, ops, REGION, OFFSET, COUNT, window)]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    last = (run.stdout.strip().splitlines() or [""])[-1]
    if run.returncode or not last.endswith("us/op"):
        raise BenchError(f"vfu_rtbench via {sock.name} exited {run.returncode}: "
                         f"{(run.stderr or run.stdout).strip()}")
    return float(last.split()[-2])


def bench_libvfio_user(args: argparse.Namespace, tmp: Path, peers: tuple[Path, Path]) -> None:
    server_bin, client = peers
    server = tmp / "gpio.sock"
    # the threaded relay does the proxy's work for -w, in threads: it writes a capture
    threaded_capture = tmp / "threaded.vfucap"
    relays = {"blind relay": RELAY, "blind epoll": [*RELAY, "--epoll"], "threaded -w": THREADED}
    after = {"threaded -w": [str(threaded_capture)]}
    proxies = {"proxy -w": [], "proxy --fault": NOT_MATCHING, "proxy --fault*": DISSECTED}
    socks = {"direct": server,
             **{name: tmp / f"gpio-relay{i}.sock" for i, name in enumerate(relays)},
             **{name: tmp / f"gpio-proxy{i}.sock" for i, name in enumerate(proxies)}}
    us: dict[tuple[str, str], list[float]] = {(m, s): [] for m in modes(1) for s in socks}
    cpu: dict[tuple[str, str], list[float]] = {(m, s): [] for m in modes(1)
                                               for s in (*relays, *proxies)}
    pids: dict[str, int] = {}
    with ExitStack() as stack:
        stack.enter_context(running([str(server_bin), str(server)], server))
        rtbench(client, server, 10, 1)      # the server takes our REGION_READ, or fail now
        for name, argv in relays.items():
            pids[name] = stack.enter_context(running(
                [*argv, str(socks[name]), str(server), *after.get(name, [])], socks[name])).pid
        for i, (name, rules) in enumerate(proxies.items()):
            faults = [arg for rule in rules for arg in ("--fault", rule)]
            pids[name] = stack.enter_context(running(
                [*VFU, "proxy", "--listen", str(socks[name]), "--server", str(server), "-w",
                 str(tmp / f"gpio{i}.vfucap"), *faults], socks[name],
                log=tmp / f"gpio-proxy{i}.log")).pid
        for n in range(args.passes):
            order = list(socks)[n % len(socks):] + list(socks)[:n % len(socks)]  # none always first
            if order.index("proxy --fault") < order.index("proxy -w"):   # the pair compared
                order.remove("proxy -w")                                 # runs back to back
                order.insert(order.index("proxy --fault"), "proxy -w")
            else:
                order.remove("proxy --fault")
                order.insert(order.index("proxy -w") + 1, "proxy --fault")
            for mode, window in modes(args.depth).items():
                for name in order:
                    before = cpu_seconds(pids[name]) if name in pids else 0.0
                    us[mode, name].append(rtbench(client, socks[name], args.ops, window))
                    if name in pids:     # microseconds per round trip
                        cpu[mode, name].append((cpu_seconds(pids[name]) - before) / args.ops
                                               * 1e6)
    for i in range(len(proxies)):
        check_capture(tmp / f"gpio{i}.vfucap", runs=args.passes * 2, ops=args.ops)
    check_capture(threaded_capture, runs=args.passes * 2, ops=args.ops)
    gate = gate_cost(tmp / "gpio0.vfucap", args.depth)
    relay = relay_cost(tmp / "gpio0.vfucap", args.depth, tmp)
    print(f"libvfio-user gpio-pci-idio-16 + vfu_rtbench: {args.ops:,} REGION_READs per run, "
          f"median of {args.passes} interleaved passes (min-max us/op); proxy --fault: "
          f"{len(NOT_MATCHING)} rules no message matches by its header; proxy --fault*: a "
          "rule each REGION_READ request is dissected for")
    med = {key: statistics.median(v) for key, v in us.items()}
    for (mode, name), times in us.items():
        print(f"  {label(mode, args.depth):<12} {name:<14} {1e6 / med[mode, name]:>9,.0f} ops/s "
              f"{med[mode, name]:7.2f} us/op  ({min(times):.2f}-{max(times):.2f})")
    for mode in modes(1):
        proxy_us, blind_us, direct_us = (med[mode, s] for s in ("proxy -w", "blind relay",
                                                                 "direct"))
        print(f"  {label(mode, args.depth)}: proxy/blind relay {proxy_us / blind_us:.2f}x "
              f"(target <= {TARGET[mode]}), proxy/direct {proxy_us / direct_us:.2f}x; the proxy "
              f"adds {proxy_us - blind_us:+.2f} us/op to the blind relay's; proxy/blind epoll "
              f"relay (one thread, as the proxy) {proxy_us / med[mode, 'blind epoll']:.2f}x; the proxy's "
              f"-w work in a thread per direction (threaded_relay.py)/blind relay "
              f"{med[mode, 'threaded -w'] / blind_us:.2f}x")
        least = {name: min(times) for (m, name), times in cpu.items() if m == mode}
        print(f"  {label(mode, args.depth)}: relay CPU per round trip, least (median) of the "
              "passes: " + ", ".join(f"{name} {least[name]:.2f} "
                                    f"({statistics.median(cpu[mode, name]):.2f}) us"
                                    for name in least))
        paired = sorted(f / p for f, p in zip(us[mode, "proxy --fault"], us[mode, "proxy -w"]))
        print(f"  {label(mode, args.depth)}: proxy --fault (none matching)/proxy: time "
              f"{med[mode, 'proxy --fault'] / proxy_us:.3f}x (target <= {FAULT_TARGET}); "
              f"pass by pass {statistics.median(paired):.3f}x ({paired[0]:.3f}-{paired[-1]:.3f}); CPU "
              f"{least['proxy --fault'] / least['proxy -w']:.3f}x; with a rule that dissects "
              f"each request: time {med[mode, 'proxy --fault*'] / proxy_us:.3f}x, CPU "
              f"{least['proxy --fault*'] / least['proxy -w']:.3f}x")
        print(f"  {label(mode, args.depth)}: the --fault gate itself, in-process: "
              f"{gate[mode]:.2f} us of CPU per round trip = "
              f"{gate[mode] / least['proxy -w'] * 100:.1f}% of the proxy's least")
        proxy_cpu, blind_cpu = relay[mode]
        print(f"  {label(mode, args.depth)}: the relay itself, in-process over socketpairs: "
              f"proxy -w {proxy_cpu:.2f} us, blind {blind_cpu:.2f} us of CPU per round trip "
              f"= {proxy_cpu / blind_cpu:.2f}x")


# --- sample server + Python client --------------------------------------------

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


def bench_sample(args: argparse.Namespace, tmp: Path) -> None:
    server, relay, proxy = tmp / "server.sock", tmp / "relay.sock", tmp / "proxy.sock"
    # The same with every message dissected and analyzed (to /dev/null): the
    # analysis runs in a child process that drops rather than waits; the
    # relay packs each record for it and shares the machine's cores with it.
    printing = tmp / "printing.sock"
    captures = [tmp / "bench.vfucap", tmp / "printing.vfucap"]
    proxy_to: Callable[..., list[str]] = lambda listen, cap, *more: [
        *VFU, "proxy", "--listen", str(listen), "--server", str(server), "-w", str(cap), *more]
    print(f"sample server + Python client: {args.rounds:,} REGION_READs per run, "
          f"best of {args.repeat}")
    with ExitStack() as stack:
        stack.enter_context(running([*VFU, "sample-server", "--listen", str(server)], server))
        stack.enter_context(running([*RELAY, str(relay), str(server)], relay))
        stack.enter_context(running(proxy_to(proxy, captures[0]), proxy))
        stack.enter_context(running(proxy_to(printing, captures[1], "--print"), printing))
        for mode, depth in modes(args.depth).items():
            rates = {name: max(round_trips(path, args.rounds, depth) for _ in range(args.repeat))
                     for name, path in (("direct", server), ("blind relay", relay),
                                        ("proxy -w", proxy), ("proxy -w --print", printing))}
            print(f"  {label(mode, depth)}: "
                  + ", ".join(f"{n} {r:,.0f} rt/s" for n, r in rates.items()))
            print(f"    proxy/blind time ratio {rates['blind relay'] / rates['proxy -w']:.2f}x "
                  f"(target <= {TARGET[mode]}), proxy/direct "
                  f"{rates['direct'] / rates['proxy -w']:.2f}x, --print/-w time "
                  f"{rates['proxy -w'] / rates['proxy -w --print']:.2f}x")
    for capture in captures:
        check_capture(capture, runs=2 * args.repeat, ops=args.rounds)


def main() -> None:
    registry.load()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", choices=("both", "libvfio-user", "sample"), default="both")
    parser.add_argument("--depth", type=int, default=16, help="requests in flight when pipelined")
    parser.add_argument("--ops", type=int, default=50000, help="vfu_rtbench round trips per run")
    parser.add_argument("--passes", type=int, default=3, help="vfu_rtbench passes (median)")
    parser.add_argument("--rounds", type=int, default=20000,
                        help="Python client round trips per run")
    parser.add_argument("--repeat", type=int, default=3, help="Python client: best of N runs")
    args = parser.parse_args()
    peers = find_peers() if args.peer != "sample" else None
    tmp = Path(tempfile.mkdtemp(prefix="proxy_bench."))
    try:
        if peers:
            bench_libvfio_user(args, tmp, peers)
        if args.peer != "libvfio-user":
            bench_sample(args, tmp)
    except BenchError as exc:
        sys.exit(f"proxy_bench: {exc}\n  captures and proxy log kept in {tmp}")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
