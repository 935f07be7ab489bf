"""The proxy between real processes over real UNIX sockets, with real fds."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time

import msgpack
import pytest

from helpers import (TESTS, open_fds, rss_kib, run_vfu, stop, vfu, wait_for_accepted,
                     wait_for_socket)
from vfu_inspect.capture import read_all
from vfu_inspect.dissect import Analyzer, find_responses
from vfu_inspect.dissectors.vfio_user import CMD, DmaMap, DmaUnmap, Header, SetIrqs
from vfu_inspect.records import BURST, C2S, CLOSE, MSG, OPEN, S2C, Event, Message
from vfu_inspect.sockio import recv_chunk, send_all


@pytest.fixture
def echo(tmp_path):
    """A raw echo peer standing in for the server."""
    path = tmp_path / "real.sock"
    proc = subprocess.Popen([sys.executable, str(TESTS / "raw_echo.py"), str(path)])
    wait_for_socket(path, proc)
    yield path
    proc.kill()
    proc.wait()


@pytest.fixture
def proxy(tmp_path, echo):
    listen, capture = tmp_path / "p.sock", tmp_path / "cap.vfucap"
    proc = vfu("proxy", "--listen", str(listen), "--server", str(echo), "-w", str(capture))
    wait_for_socket(listen, proc)
    yield proc, listen, capture
    stop(proc)


def connect(path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sock.settimeout(10)
    return sock


def recv_exactly(sock: socket.socket, size: int) -> tuple[bytes, list[int]]:
    data, fds = b"", []
    while len(data) < size:
        chunk, more = recv_chunk(sock)
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {size} bytes")
        data += chunk
        fds += more
    return data, fds


def dma_map(msg_id: int, iova: int) -> bytes:
    return bytes(Header(msg_id=msg_id, cmd=CMD["DMA_MAP"]) /
                 DmaMap(flags=3, address=iova, size=0x1000))


def messages(path) -> list[Message]:
    records, damage = read_all(path)
    assert damage is None
    return [r for r in records if isinstance(r, Message)]


def events(path) -> list[Event]:
    return [r for r in read_all(path)[0] if isinstance(r, Event)]


def test_relays_bytes_and_fds_exactly_and_captures_them(proxy):
    proc, listen, capture = proxy
    memfd = os.memfd_create("dma")
    os.ftruncate(memfd, 0x1000)
    sent = [dma_map(1, 0x1000), b"\xde\xad" * 20, dma_map(2, 0x2000)]   # the middle is garbage
    with connect(listen) as sock:
        send_all(sock, sent[0], [memfd])
        data, fds = recv_exactly(sock, len(sent[0]))
        assert data == sent[0] and len(fds) == 1
        assert os.fstat(fds[0]).st_ino == os.fstat(memfd).st_ino   # the same memory
        os.close(fds[0])
        send_all(sock, sent[1] + sent[2])
        assert recv_exactly(sock, len(sent[1] + sent[2]))[0] == sent[1] + sent[2]
    stop(proc, signal.SIGINT)
    assert proc.returncode == 0
    got = messages(capture)
    # The garbage (msg_size 0xaddeadde) is kept as a truncated message, flagged.
    assert [m.direction for m in got] == [C2S, S2C, C2S, S2C]
    assert got[0].data == sent[0] and got[1].data == sent[0]
    assert got[0].fds == [{"kind": "memfd", "size": 0x1000, "inode": os.fstat(memfd).st_ino}]
    assert got[2].data.startswith(sent[1]) and got[2].size == 0xaddeadde


def test_bogus_message_size_does_not_allocate(proxy):
    proc, listen, capture = proxy
    header = struct.pack("<HHIII", 1, CMD["REGION_WRITE"], 0xFFFFFFF0, 0, 0)
    block = os.urandom(64 << 10)
    with connect(listen) as sock:
        send_all(sock, header)
        recv_exactly(sock, len(header))
        before = rss_kib(proc.pid)
        for _ in range(1024):                       # 64 MiB through the proxy
            send_all(sock, block)
            assert recv_exactly(sock, len(block))[0] == block
        grown = rss_kib(proc.pid) - before
    assert grown < 32 * 1024, f"proxy grew by {grown} KiB relaying 64 MiB"
    stop(proc)
    first = messages(capture)[0]
    assert first.size == 0xFFFFFFF0 and len(first.data) <= 64 * 1024


def test_no_fd_leak_after_1000_map_unmap_cycles(proxy):
    proc, listen, _ = proxy
    memfd = os.memfd_create("dma")
    os.ftruncate(memfd, 0x1000)
    unmap = bytes(Header(msg_id=2, cmd=CMD["DMA_UNMAP"]) / DmaUnmap(address=0, size=0x1000))
    with connect(listen) as sock:
        send_all(sock, dma_map(1, 0), [memfd])
        os.close(recv_exactly(sock, 48)[1][0])
        # the proxy closes its copy of a relayed fd just after passing it on,
        # which can be after the receiver already has it: let that settle
        baseline = settled(lambda: open_fds(proc.pid))
        for i in range(1000):
            send_all(sock, dma_map(i, 0), [memfd])
            for fd in recv_exactly(sock, 48)[1]:
                os.close(fd)
            send_all(sock, unmap)
            recv_exactly(sock, len(unmap))
        assert settled(lambda: open_fds(proc.pid)) == baseline


def settled(read, pause: float = 0.05, tries: int = 40) -> int:
    """A value read until it stays the same over `pause`."""
    value = read()
    for _ in range(tries):
        time.sleep(pause)
        value, previous = read(), value
        if value == previous:
            break
    return value


def test_client_close_reaches_the_server_and_is_recorded(proxy, tmp_path):
    proc, listen, capture = proxy
    with connect(listen) as sock:
        send_all(sock, dma_map(7, 0))       # a request the echo never "answers"
        recv_exactly(sock, 48)
    time.sleep(0.3)
    stop(proc)
    closes = [e for e in events(capture) if e.kind == CLOSE]
    assert closes[0].info["by"] == "client"


def test_server_close_reaches_the_client(tmp_path):
    real, listen = tmp_path / "real.sock", tmp_path / "p.sock"
    server = subprocess.Popen([sys.executable, str(TESTS / "raw_echo.py"), str(real),
                               "--close-on", "2", "--as-reply"])
    wait_for_socket(real, server)
    proc = vfu("proxy", "--listen", str(listen), "--server", str(real),
               "-w", str(tmp_path / "c.vfucap"))
    wait_for_socket(listen, proc)
    try:
        with connect(listen) as sock:
            send_all(sock, dma_map(1, 0))
            recv_exactly(sock, 48)
            send_all(sock, dma_map(2, 0x1000))
            assert recv_chunk(sock)[0] == b""        # the server left: so does the proxy
    finally:
        stop(proc)
        server.kill()
    close = [e for e in events(tmp_path / "c.vfucap") if e.kind == CLOSE][0]
    assert close.info["by"] == "server"
    assert close.info["unanswered"] == [{"msg_id": 2, "cmd": "DMA_MAP",
                                         "channel": "main", "dir": "c2s"}]


def test_a_pipelined_write_is_one_burst_record_that_reads_as_its_messages(tmp_path, echo):
    listen, capture = tmp_path / "p.sock", tmp_path / "cap.vfucap"
    proc = vfu("proxy", "--listen", str(listen), "--server", str(echo), "-w", str(capture),
               "--print")
    wait_for_socket(listen, proc)
    burst = [dma_map(n, n << 12) for n in range(1, 17)]
    split = dma_map(17, 0x20000)
    with connect(listen) as sock:
        send_all(sock, b"".join(burst))
        recv_exactly(sock, len(b"".join(burst)))
        send_all(sock, split[:20])          # one message in two writes: framed, not a burst
        time.sleep(0.2)
        send_all(sock, split[20:])
        recv_exactly(sock, len(split))
    time.sleep(0.3)
    stop(proc, signal.SIGINT)
    with open(capture, "rb") as file:
        kinds = [record[0] for record in list(msgpack.Unpacker(file, raw=False))[1:]]
    assert kinds.count(BURST) >= 2 and kinds.count(MSG) >= 1      # each way
    got = messages(capture)
    assert [m.data for m in got if m.direction == C2S] == burst + [split]
    assert [m.data for m in got if m.direction == S2C] == burst + [split]
    # the relay tracked every message of the bursts: the echo answers none
    close = [e for e in events(capture) if e.kind == CLOSE][0]
    assert sorted((u["dir"], u["msg_id"]) for u in close.info["unanswered"]) == sorted(
        (way, n) for way in ("c2s", "s2c") for n in range(1, 18))
    # --print, in its own process, dissected each message of the bursts
    read = run_vfu("read", str(capture), "--events")
    assert read.returncode == 0, read.stderr
    lines = [line for line in read.stdout.splitlines() if not line.startswith("#")]
    assert proc.stdout.read() == read.stdout and len(lines) == 34


def test_missing_server_closes_the_client_and_keeps_listening(tmp_path, echo):
    listen, capture = tmp_path / "p.sock", tmp_path / "c.vfucap"
    proc = vfu("proxy", "--listen", str(listen), "--server", str(tmp_path / "absent.sock"),
               "-w", str(capture))
    wait_for_socket(listen, proc)
    for _ in range(2):
        with connect(listen) as sock:
            assert recv_chunk(sock)[0] == b""
    assert proc.poll() is None
    stop(proc)
    err = proc.stderr.read()
    assert "cannot connect to server" in err and "Traceback" not in err
    kinds = [(e.kind, e.conn) for e in events(capture)]
    assert kinds == [(OPEN, 0), (CLOSE, 0), (OPEN, 1), (CLOSE, 1)]


def test_several_clients_at_once_get_their_own_connection(proxy):
    proc, listen, capture = proxy
    socks = [connect(listen) for _ in range(3)]
    for i, sock in enumerate(socks):
        send_all(sock, dma_map(i, i * 0x1000))
    for i, sock in enumerate(socks):
        assert recv_exactly(sock, 48)[0] == dma_map(i, i * 0x1000)
        sock.close()
    time.sleep(0.2)
    stop(proc)
    by_conn = {}
    for m in messages(capture):
        by_conn.setdefault(m.conn, []).append(m.data)
    assert sorted(by_conn) == [0, 1, 2]
    assert sorted(v[0] for v in by_conn.values()) == sorted(dma_map(i, i * 0x1000)
                                                             for i in range(3))


def test_kill_9_leaves_a_readable_capture(proxy):
    proc, listen, capture = proxy
    with connect(listen) as sock:
        for i in range(50):
            send_all(sock, dma_map(i, 0))
            recv_exactly(sock, 48)
        time.sleep(0.1)                     # past the proxy's 5 ms flush interval
        proc.kill()
        proc.wait()
    got = messages(capture)
    assert len(got) == 100


def test_listening_socket_mode_and_removal(proxy):
    proc, listen, _ = proxy
    assert stat.S_IMODE(os.stat(listen).st_mode) == 0o600
    stop(proc, signal.SIGINT)
    assert proc.returncode == 0
    assert not listen.exists()


def test_refuses_to_replace_a_file_that_is_not_a_socket(tmp_path, echo):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    result = run_vfu("proxy", "--listen", str(target), "--server", str(echo))
    assert result.returncode == 2
    assert "not a socket" in result.stderr and "Traceback" not in result.stderr
    assert target.read_text() == "keep me"


def test_replaces_a_stale_socket(tmp_path, echo):
    stale = tmp_path / "stale.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(stale))
    sock.close()                                # bound, never listened: stale
    proc = vfu("proxy", "--listen", str(stale), "--server", str(echo))
    wait_for_socket(stale, proc)
    assert stop(proc) == 0


def test_refuses_a_socket_in_use(tmp_path, echo):
    result = run_vfu("proxy", "--listen", str(echo), "--server", str(echo))
    assert result.returncode == 2 and "in use" in result.stderr


def test_live_monitor_stream_reaches_read_live(tmp_path, echo):
    listen, monitor = tmp_path / "p.sock", tmp_path / "mon.sock"
    proc = vfu("proxy", "--listen", str(listen), "--server", str(echo),
               "--monitor", str(monitor), "--print")
    wait_for_socket(listen, proc)
    wait_for_socket(monitor, proc)
    viewer = vfu("read", "--live", str(monitor), "-T", "fields", "-e", "frame.number",
                 "-e", "vfio_user.msg_id", "-e", "dma_map.address")
    wait_for_accepted(monitor)         # the viewer is attached before traffic starts
    with connect(listen) as sock:
        for i in range(5):
            send_all(sock, dma_map(i, i * 0x1000))
            recv_exactly(sock, 48)
    time.sleep(0.3)
    stop(proc)
    out, err = viewer.communicate(timeout=10)
    assert viewer.returncode == 0, err
    lines = out.splitlines()
    assert lines[0::2] == [f"{2 * i + 1}\t{i}\t{i * 0x1000}" for i in range(5)]
    printed = proc.stdout.read().splitlines()
    assert sum("DMA_MAP" in line for line in printed if not line.startswith("#")) == 10
    # Expert items show live: these maps come without a VERSION first.
    assert sum("[error: DMA_MAP before VERSION]" in line for line in printed) == 5
    assert not monitor.exists()


def test_fds_reach_a_one_at_a_time_reader_with_their_own_message(tmp_path):
    """QEMU pipelines fd-less DMA_UNMAPs before a DMA_MAP with a memfd; one
    recvmsg of the proxy takes them all.  A receiver reading one message at a
    time (libvfio-user, QEMU) must still get the fds with the DMA_MAP, and so
    must the capture; likewise for the server's replies."""
    from one_at_a_time import recv_message
    real, listen, capture = tmp_path / "real.sock", tmp_path / "p.sock", tmp_path / "c.vfucap"
    memfd, eventfds = os.memfd_create("guest-ram"), [os.eventfd(0), os.eventfd(0)]
    os.ftruncate(memfd, 0x1000)
    burst = [  # (message, fds): several fd-less messages, then one with fds, twice
        (bytes(Header(msg_id=1, cmd=CMD["DMA_UNMAP"]) / DmaUnmap(address=0, size=0x1000)), []),
        (bytes(Header(msg_id=2, cmd=CMD["DMA_UNMAP"]) / DmaUnmap(address=0x1000, size=0x1000)),
         []),
        (dma_map(3, 0x2000), [memfd]),
        (bytes(Header(msg_id=4, cmd=CMD["DMA_UNMAP"]) / DmaUnmap(address=0x2000, size=0x1000)),
         []),
        (bytes(Header(msg_id=5, cmd=CMD["DEVICE_SET_IRQS"]) /
               SetIrqs(flags=0x24, index=2, start=0, count=2)), eventfds),
    ]
    server = subprocess.Popen([sys.executable, str(TESTS / "one_at_a_time.py"), str(real),
                               str(len(burst))], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    wait_for_socket(real, server)
    proxy = vfu("proxy", "--listen", str(listen), "--server", str(real), "-w", str(capture))
    wait_for_socket(listen, proxy)
    try:
        with connect(listen) as sock:
            wait_until(lambda: capture.stat().st_size > 0 and
                       any(e.kind == OPEN for e in events(capture)))
            with stopped(proxy):            # the whole burst waits for one recvmsg
                for data, fds in burst:
                    send_all(sock, data, fds)
            received = json.loads(server.stdout.readline())
            assert [(m["msg_id"], m["fds"]) for m in received] == [
                (1, []), (2, []), (3, ["memfd"]), (4, []), (5, ["eventfd", "eventfd"])]
            with stopped(proxy):
                server.stdin.write("go\n")
                server.stdin.flush()
                assert server.stdout.readline() == "sent\n"
            replies = []
            for _ in burst:
                data, fds = recv_message(sock)
                replies.append((struct.unpack_from("<H", data)[0], len(fds)))
                for fd in fds:
                    os.close(fd)
            assert replies == [(1, 0), (2, 0), (3, 1), (4, 0), (5, 1)]
    finally:
        stop(proxy)
        server.kill()
        server.wait()
        for fd in [memfd, *eventfds]:
            os.close(fd)
    recorded = {(m.direction, m.data[0]): [fd["kind"] for fd in m.fds] for m in messages(capture)}
    assert recorded == {(C2S, 1): [], (C2S, 2): [], (C2S, 3): ["memfd"], (C2S, 4): [],
                        (C2S, 5): ["eventfd", "eventfd"], (S2C, 1): [], (S2C, 2): [],
                        (S2C, 3): ["eventfd"], (S2C, 4): [], (S2C, 5): ["eventfd"]}


@contextlib.contextmanager
def stopped(proc: subprocess.Popen):
    """Hold a process (SIGSTOP) so that what is written meanwhile waits in its socket."""
    proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGCONT)


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_a_request_answered_from_its_header_comes_before_its_reply(tmp_path):
    """The server rejects a header whose msg_size it refuses without reading on
    (libvfio-user does), and the body is never sent: the capture holds the
    request, cut at its header, then the reply, and frames the next request
    from the byte after the header."""
    real, listen, capture = tmp_path / "real.sock", tmp_path / "p.sock", tmp_path / "c.vfucap"
    server = subprocess.Popen([sys.executable, str(TESTS / "raw_echo.py"), str(real), "--reject"])
    wait_for_socket(real, server)
    proc = vfu("proxy", "--listen", str(listen), "--server", str(real), "-w", str(capture))
    wait_for_socket(listen, proc)
    too_big = struct.pack("<HHIII", 0xbad1, CMD["REGION_WRITE"], (1 << 20) + 33, 0, 0)
    reset = bytes(Header(msg_id=0x22, cmd=CMD["DEVICE_RESET"]))
    try:
        with connect(listen) as sock:
            for request in (too_big, reset):
                send_all(sock, request)
                recv_exactly(sock, 16)
    finally:
        stop(proc)
        server.kill()
        server.wait()
    records = read_all(capture)[0]
    msgs = [r for r in records if isinstance(r, Message)]
    assert [(m.direction, m.data[:2], len(m.data)) for m in msgs] == [
        (C2S, too_big[:2], 16), (S2C, too_big[:2], 16), (C2S, reset[:2], 16), (S2C, reset[:2], 16)]
    packets = list(Analyzer(find_responses(records)).run(records))
    assert [p.request_in for p in packets] == [None, 1, None, 3]
    assert "header.size" in {e.id for e in packets[0].tree.experts}
    assert not {e.id for p in packets for e in p.tree.experts} & {
        "reply.unmatched", "request.unanswered"}
    assert any("answered msg_id 0xbad1 after its header" in e.info.get("text", "")
               for e in records if isinstance(e, Event))
