"""The latency `proxy --trace-irqs` adds to an interrupt.

A device process takes the eventfd of a DEVICE_SET_IRQS and signals it
--interval after the client said (on a pipe) it saw the previous one; the
client blocks on its eventfd and notes when each signal wakes it.  Both read CLOCK_MONOTONIC, so each signal's latency is wake-up time minus
signal time.  Directly, the client's eventfd is the one the device signals;
through `proxy --trace-irqs -w`, the device signals the proxy's eventfd and
the proxy relays it (and records it).  Interleaved passes; prints median and
99th percentile of each path and what the proxy adds.  Each proxy capture must
hold every signal as an IRQ event, so a relay that loses one fails the bench.

    python bench/irq_bench.py [--signals N] [--passes P] [--interval SECONDS]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vfu_inspect import registry
from vfu_inspect.capture import CaptureReader
from vfu_inspect.dissectors.vfio_user import CMD, SetIrqs
from vfu_inspect.endpoints.common import message, pack, reply_to
from vfu_inspect.records import IRQ, Event
from vfu_inspect.sockio import MessageSocket, PeerClosed

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from helpers import stop, wait_for_socket  # noqa: E402

VFU = [sys.executable, "-m", "vfu_inspect"]
MSIX, VECTOR = 2, 0


class BenchError(Exception):
    pass


def device(path: str, signals: int, interval: float, out: str, ack: int) -> None:
    """The device side: take the eventfd, then signal it and note when."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    conn = MessageSocket(listener.accept()[0])
    frame = conn.recv()
    conn.send(reply_to(frame.data))
    times = []
    for n in range(signals):
        if n:
            os.read(ack, 1)         # the client saw the previous one: it is idle again
        time.sleep(interval)
        times.append(time.monotonic_ns())
        os.eventfd_write(frame.fds[0], 1)
    Path(out).write_text(json.dumps(times))
    try:
        conn.recv()                 # until the client has seen them all and goes
    except PeerClosed:
        pass


def client(path: Path, signals: int, ack: int) -> list[int]:
    """Wake-up times of each signal of our eventfd."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    conn = MessageSocket(sock)
    eventfd = os.eventfd(0, os.EFD_NONBLOCK)
    conn.send(message(1, CMD["DEVICE_SET_IRQS"], pack(SetIrqs, 20, 0x24, MSIX, VECTOR, 1)),
              [eventfd])
    conn.recv()
    woken = []
    while len(woken) < signals:
        if not select.select([eventfd], [], [], 10)[0]:
            raise BenchError(f"signal {len(woken) + 1} of {signals} never came via {path.name}")
        woken.append(time.monotonic_ns())
        os.eventfd_read(eventfd)
        os.write(ack, b".")
    conn.close()
    os.close(eventfd)
    return woken


def run(tmp: Path, via_proxy: bool, args: argparse.Namespace, n: int) -> list[float]:
    """Latencies in microseconds of one run."""
    device_sock, times = tmp / f"device{n}.sock", tmp / f"times{n}.json"
    ack_r, ack_w = os.pipe()
    dev = subprocess.Popen([sys.executable, __file__, "--device", str(device_sock),
                            str(args.signals), str(args.interval), str(times), str(ack_r)],
                           pass_fds=[ack_r])
    os.close(ack_r)
    proxy = None
    try:
        wait_for_socket(device_sock, dev)
        target = device_sock
        if via_proxy:
            target, capture = tmp / f"proxy{n}.sock", tmp / f"irqs{n}.vfucap"
            proxy = subprocess.Popen([*VFU, "proxy", "--listen", str(target), "--server",
                                      str(device_sock), "-w", str(capture), "--trace-irqs"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for_socket(target, proxy)
        woken = client(target, args.signals, ack_w)
        dev.wait(timeout=30)
    finally:
        os.close(ack_w)
        if proxy is not None:
            stop(proxy)
        dev.kill()
        dev.wait()
    if via_proxy:
        check_capture(capture, args.signals)
    signalled = json.loads(times.read_text())
    return [(w - s) / 1e3 for w, s in zip(woken, signalled)]


def check_capture(path: Path, signals: int) -> None:
    with CaptureReader(path) as reader:
        irqs = [r for r in reader if isinstance(r, Event) and r.kind == IRQ]
    if len(irqs) != signals or any(r.info["vector"] != VECTOR for r in irqs):
        raise BenchError(f"{path.name}: {len(irqs)} IRQ events, expected {signals}: "
                         "the proxy lost interrupts")


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def main() -> None:
    registry.load()
    if sys.argv[1:2] == ["--device"]:
        path, signals, interval, out, ack = sys.argv[2:]
        device(path, int(signals), float(interval), out, int(ack))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signals", type=int, default=500, help="interrupts per run")
    parser.add_argument("--passes", type=int, default=3, help="interleaved passes")
    parser.add_argument("--interval", type=float, default=0.001,
                        help="seconds the client is idle before each interrupt")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="irq_bench."))
    latencies: dict[str, list[float]] = {"direct": [], "proxy --trace-irqs": []}
    try:
        for n in range(args.passes):
            for i, name in enumerate(latencies if n % 2 == 0 else list(latencies)[::-1]):
                latencies[name] += run(tmp, name != "direct", args, 2 * n + i)
    except BenchError as exc:
        sys.exit(f"irq_bench: {exc}\n  captures kept in {tmp}")
    shutil.rmtree(tmp)
    print(f"interrupt latency, eventfd signal to the client's wake-up: {args.signals} "
          f"interrupts per run, {args.passes} interleaved passes, each after the client "
          f"idled {args.interval * 1e3:g} ms")
    for name, values in latencies.items():
        print(f"  {name:<20} median {statistics.median(values):8.1f} us   p99 "
              f"{p99(values):8.1f} us   ({len(values)} interrupts)")
    direct, traced = (statistics.median(v) for v in latencies.values())
    print(f"  --trace-irqs adds {traced - direct:+.1f} us to an interrupt (median), "
          f"{p99(latencies['proxy --trace-irqs']) - p99(latencies['direct']):+.1f} us at p99")


if __name__ == "__main__":
    main()
