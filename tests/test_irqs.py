"""proxy --trace-irqs: interrupts and doorbells through the proxy's own eventfds."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import (TESTS, libvfio_user_client, libvfio_user_server_through_proxy,
                     needs_libvfio_user, open_fds, run_vfu, sample_session, stop, vfu,
                     wait_for_socket)
from vfu_inspect.capture import read_all
from vfu_inspect.dissectors.vfio_user import (CMD, Header, RegionIoFds, RegionWrite, SetIrqs,
                                              SubRegion, parse_header)
from vfu_inspect.records import DOORBELL, IRQ, Event, Message
from vfu_inspect.sockio import recv_chunk, send_all

DATA_EVENTFD_TRIGGER, DISABLE, MASK = 0x24, 0x21, 0x09


def records(path: Path) -> list:
    found, damage = read_all(path)
    assert damage is None
    return found


def signals(path: Path) -> list[tuple]:
    """(kind, index or region, vector or offset, count) of each signal, in order."""
    return [(r.kind, r.info.get("index", r.info.get("region")),
             r.info.get("vector", r.info.get("offset")), r.info["count"])
            for r in records(path) if isinstance(r, Event) and r.kind in (IRQ, DOORBELL)]


def eventfd_id(fd: int) -> int:
    """Which eventfd this is (eventfds share one inode): Linux's fdinfo id."""
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("eventfd-id:"):
            return int(line.split()[1])
    pytest.skip("this kernel does not show eventfd-id in fdinfo")


def test_every_interrupt_of_the_sample_server_reaches_the_client_in_order(tmp_path):
    result, capture, server, client = sample_session(tmp_path, ["--trace-irqs"])
    assert result.returncode == 0, result.stderr          # it checked each interrupt came
    assert signals(capture) == [(IRQ, 0, 0, 1),            # INTx, before MSI-X is set up
                                (IRQ, 2, 1, 1),            # SET_IRQS DATA_BOOL trigger
                                (IRQ, 2, 2, 1),            # REG_IRQ write
                                (DOORBELL, 0, 0x28, 1),    # REG_IRQ's ioeventfd ...
                                (IRQ, 2, 3, 1)]            # ... raises its datamatch vector
    timeline = [r for r in records(capture) if isinstance(r, Message) and r.conn == 0
                or isinstance(r, Event) and r.kind in (IRQ, DOORBELL)]
    first_irq = next(i for i, r in enumerate(timeline) if isinstance(r, Event))
    cause = timeline[first_irq - 1]                        # the INTx follows its write
    assert parse_header(cause.data).cmd == CMD["REGION_WRITE"]
    assert RegionWrite(cause.data[16:]).offset == 0x28


def test_without_trace_irqs_nothing_is_traced(tmp_path):
    result, capture, _, _ = sample_session(tmp_path, [])
    assert result.returncode == 0, result.stderr
    assert signals(capture) == []


def echo_proxy_with(tmp_path: Path, *options: str):
    """proxy OPTIONS in front of a peer that echoes each message back as its
    reply, with the fds it came with."""
    real, listen, capture = tmp_path / "real.sock", tmp_path / "p.sock", tmp_path / "c.vfucap"
    echo = subprocess.Popen([sys.executable, str(TESTS / "raw_echo.py"), str(real),
                             "--as-reply"])
    wait_for_socket(real, echo)
    proxy = vfu("proxy", "--listen", str(listen), "--server", str(real), "-w", str(capture),
                *options)
    wait_for_socket(listen, proxy)
    yield proxy, listen, capture
    stop(proxy)
    echo.kill()
    echo.wait()


@pytest.fixture
def echo_proxy(tmp_path):
    yield from echo_proxy_with(tmp_path, "--trace-irqs")


@pytest.fixture
def plain_echo_proxy(tmp_path):
    yield from echo_proxy_with(tmp_path)


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sock.settimeout(10)
    return sock


def call(sock: socket.socket, data: bytes, fds: list[int] = ()) -> list[int]:
    """Send a message; its echo's fds (what the 'server' was handed)."""
    send_all(sock, data, list(fds))
    got, fds = b"", []
    while len(got) < len(data):
        chunk, more = recv_chunk(sock)
        assert chunk, "closed"
        got, fds = got + chunk, fds + more
    return fds


def set_irqs(msg_id: int, flags: int, index: int, start: int, count: int) -> bytes:
    return bytes(Header(msg_id=msg_id, cmd=CMD["DEVICE_SET_IRQS"]) /
                 SetIrqs(flags=flags, index=index, start=start, count=count))


def read_count(fd: int, timeout: float = 5.0) -> int:
    assert select.select([fd], [], [], timeout)[0], "no signal"
    return os.eventfd_read(fd)


def test_a_signal_of_the_servers_eventfd_reaches_the_clients_with_its_count(echo_proxy):
    proxy, listen, capture = echo_proxy
    ours = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
    with connect(listen) as sock:
        held = call(sock, set_irqs(1, DATA_EVENTFD_TRIGGER, 2, 4, 2), ours)
        assert not {eventfd_id(fd) for fd in held} & {eventfd_id(fd) for fd in ours}
        os.eventfd_write(held[1], 5)              # the "server" raises MSI-X vector 5 ...
        assert read_count(ours[1]) == 5           # ... the client sees it
        call(sock, set_irqs(2, MASK, 2, 5, 1))
        os.eventfd_write(held[1], 1)              # raised while masked: relayed, and said
        assert read_count(ours[1]) == 1
        for fd in held + ours:
            os.close(fd)
    time.sleep(0.2)
    stop(proxy)
    irqs = [r.info for r in records(capture) if isinstance(r, Event) and r.kind == IRQ]
    assert irqs == [{"index": 2, "vector": 5, "count": 5},
                    {"index": 2, "vector": 5, "count": 1, "masked": True}]


def test_a_doorbell_reaches_the_servers_ioeventfd(echo_proxy):
    proxy, listen, capture = echo_proxy
    servers = os.eventfd(0, os.EFD_NONBLOCK)
    sub = SubRegion(offset=0x40, size=4, fd_index=0, type=0, flags=1, datamatch=0x7)
    reply = bytes(Header(msg_id=1, cmd=CMD["DEVICE_GET_REGION_IO_FDS"]) /
                  RegionIoFds(argsz=56, index=0, count=1) / sub)
    with connect(listen) as sock:
        [doorbell] = call(sock, reply, [servers])   # echoed as the server's reply
        assert eventfd_id(doorbell) != eventfd_id(servers)
        os.eventfd_write(doorbell, 3)
        assert read_count(servers) == 3
        os.close(doorbell)
    time.sleep(0.2)
    stop(proxy)
    bells = [r.info for r in records(capture) if isinstance(r, Event) and r.kind == DOORBELL]
    assert bells == [{"region": 0, "offset": 0x40, "size": 4, "datamatch": 7, "count": 3}]
    os.close(servers)


def test_without_trace_irqs_the_server_gets_the_clients_own_eventfds(plain_echo_proxy):
    proxy, listen, capture = plain_echo_proxy
    ours = os.eventfd(0)
    with connect(listen) as sock:
        [held] = call(sock, set_irqs(1, DATA_EVENTFD_TRIGGER, 2, 0, 1), [ours])
        assert eventfd_id(held) == eventfd_id(ours)
        os.close(held)
    os.close(ours)


def test_no_eventfd_leaks_across_1000_assign_disable_cycles_and_disconnects(echo_proxy):
    proxy, listen, _ = echo_proxy
    with connect(listen) as sock:
        eventfds = [os.eventfd(0) for _ in range(4)]
        for fd in call(sock, set_irqs(0, DATA_EVENTFD_TRIGGER, 2, 0, 4), eventfds):
            os.close(fd)
        call(sock, set_irqs(1, DISABLE, 2, 0, 0))
        baseline = open_fds(proxy.pid)
        for i in range(1000):
            held = call(sock, set_irqs(i, DATA_EVENTFD_TRIGGER, 2, i % 3, 1 + i % 2),
                        eventfds[:1 + i % 2])
            for fd in held:
                os.close(fd)
            if i % 2:
                call(sock, set_irqs(i, DISABLE, 2, 0, 0))          # disable the index
            else:
                call(sock, set_irqs(i, DATA_EVENTFD_TRIGGER, 2, i % 3, 1))   # de-assign
        call(sock, set_irqs(1, DISABLE, 2, 0, 0))
        assert open_fds(proxy.pid) == baseline
    for _ in range(50):                        # assigned, then the client goes away
        with connect(listen) as sock:
            for fd in call(sock, set_irqs(0, DATA_EVENTFD_TRIGGER, 2, 0, 4), eventfds):
                os.close(fd)
    time.sleep(0.3)
    assert open_fds(proxy.pid) == baseline - 2     # the first connection's sockets are gone too
    for fd in eventfds:
        os.close(fd)


@needs_libvfio_user
def test_libvfio_user_server_interrupt_reaches_its_client(tmp_path):
    """Its client waits for the INTx its server raises a second after a BAR0 write."""
    capture = tmp_path / "c.vfucap"
    with libvfio_user_server_through_proxy(tmp_path, capture, "--trace-irqs") as listen:
        result = libvfio_user_client(listen)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "INTx triggered" in result.stdout
    assert signals(capture) == [(IRQ, 0, 0, 1)]
    stats = run_vfu("read", str(capture), "-q", "-z", "irq").stdout
    latency = [line for line in stats.splitlines() if "REGION_WRITE BAR0+0x0" in line]
    assert latency and float(latency[0].split()[-2]) > 900_000      # its alarm: 1 s later


def test_fields_and_json_carry_the_events_the_filter_selects():
    reference = str(TESTS.parent / "captures" / "sample-endpoints.vfucap")
    fields = run_vfu("read", reference, "-Y", "irq.vector == 2 || doorbell.datamatch == 3 || "
                     "vfio_user.cmd == DEVICE_SET_IRQS", "-T", "fields", "-e", "vfio_user.cmd",
                     "-e", "irq.vector", "-e", "doorbell.datamatch").stdout.splitlines()
    assert "\t2\t" in fields and "\t\t3" in fields
    assert fields.index("\t2\t") > fields.index(f"{CMD['DEVICE_SET_IRQS']}\t\t")
    shown = json.loads(run_vfu("read", reference, "--events", "-T", "json").stdout)
    irqs = [e for e in shown if e.get("event") == "irq"]
    assert {e["layers"]["irq"]["irq.vector"] for e in irqs} == {0, 1, 2, 3}
    assert irqs[0]["text"].startswith("# conn 0 irq: ")
    assert [e["event"] for e in shown if "event" in e][0] == "open"
    assert len([e for e in shown if "frame" in e]) == 220       # every message too


def test_read_filters_and_counts_the_reference_sessions_interrupts():
    reference = str(TESTS.parent / "captures" / "sample-endpoints.vfucap")
    shown = run_vfu("read", reference, "-Y", "irq.vector == 2 || doorbell.datamatch == 3")
    assert shown.stdout.splitlines() == [
        "# conn 0 irq: MSI-X vector 2, count 1",
        "# conn 0 doorbell: BAR0 offset 0x28 size 8 datamatch 0x3, count 1"]
    stats = run_vfu("read", reference, "-q", "-z", "irq").stdout
    assert [line.split()[1:4] for line in stats.splitlines() if "vector" in line
            and "Events" not in line and "REGION_WRITE" not in line and "doorbell" not in line] \
        == [["INTx", "vector", "0"], ["MSI-X", "vector", "1"], ["MSI-X", "vector", "2"],
            ["MSI-X", "vector", "3"]]
    assert any(line.split()[1] == "doorbell" and line.split()[3:6] == ["MSI-X", "vector", "3"]
               for line in stats.splitlines() if "doorbell BAR0" in line)
