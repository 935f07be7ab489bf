"""strace import of sessions recorded here, compared with what was really sent."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import run_vfu, stop, streams, wait_for_socket
from vfu_inspect.capture import read_all
from vfu_inspect.importers.strace import import_strace
from vfu_inspect.records import Message

STRACE = shutil.which("strace")
TRACE_ARGS = ["-f", "-yy", "-xx", "-s", "1100000", "-tt",
              "-e", "trace=sendmsg,recvmsg,sendto,recvfrom"]


def _ptrace_works() -> bool:
    if STRACE is None:
        return False
    return subprocess.run([STRACE, "-o", "/dev/null", "true"]).returncode == 0


pytestmark = pytest.mark.skipif(not _ptrace_works(), reason="strace missing or ptrace refused")


def stop_traced(proc: subprocess.Popen) -> None:
    """SIGTERM the traced program itself (its process group), and let strace end."""
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def traced(log: Path, *cmd: str, s: str = "1100000") -> list[str]:
    args = list(TRACE_ARGS)
    args[args.index("-s") + 1] = s
    return [STRACE, *args, "-o", str(log), *cmd]


def messages(records) -> list[Message]:
    return [r for r in records if isinstance(r, Message)]


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """The sample client and server, each under strace, each recording what it sent."""
    tmp = tmp_path_factory.mktemp("strace")
    sock = tmp / "s.sock"
    vfu = [sys.executable, "-m", "vfu_inspect"]
    server = subprocess.Popen(traced(tmp / "server.log", *vfu, "sample-server", "--listen",
                                     str(sock), "--record", str(tmp / "server.vfucap")),
                              start_new_session=True)
    wait_for_socket(sock, server)
    client = subprocess.run(traced(tmp / "client.log", *vfu, "sample-client", "--server",
                                   str(sock), "--record", str(tmp / "client.vfucap")),
                            capture_output=True, text=True, timeout=120)
    stop_traced(server)
    assert client.returncode == 0, client.stderr
    sent = [m for m in messages(read_all(tmp / "client.vfucap")[0]) if m.direction == 0]
    sent += [m for m in messages(read_all(tmp / "server.vfucap")[0]) if m.direction == 1]
    return tmp, streams(sent)


@pytest.mark.parametrize("logs", [["client.log", "server.log"], ["client.log"], ["server.log"]])
def test_import_matches_what_each_side_sent(session, logs):
    tmp, sent = session
    result = import_strace([str(tmp / log) for log in logs])
    assert result.problems == []
    assert streams(messages(result.records)) == sent
    assert any(channel == 1 for _, channel, _ in sent)          # the twin socket too


def test_framing_across_and_within_syscalls(tmp_path):
    """A header and its payload in two syscalls; two messages in one."""
    program = textwrap.dedent("""
        import os, socket, struct
        a, b = socket.socketpair()
        def msg(msg_id, cmd, payload=b"", flags=0):
            return struct.pack("<HHIII", msg_id, cmd, 16 + len(payload), flags, 0) + payload
        version = msg(1, 1, struct.pack("<HH", 0, 0) + b'{"capabilities":{}}\\0')
        maps = msg(2, 2, bytes(32)) + msg(3, 2, bytes(32))
        if os.fork() == 0:
            got = b""
            while len(got) < len(version) + len(maps):
                got += b.recv(4096)
            b.sendall(msg(1, 1, version[16:], 1) + msg(2, 2, b"", 1) + msg(3, 2, b"", 1))
            os._exit(0)
        a.send(version[:16]); a.send(version[16:]); a.send(maps)
        a.recv(4096); os.wait()
    """)
    log = tmp_path / "t.log"
    subprocess.run(traced(log, sys.executable, "-c", program), check=True, timeout=60)
    result = import_strace([str(log)])
    assert result.problems == []
    got = [(m.direction, m.data[2], len(m.data)) for m in messages(result.records)]
    c2s = [g for g in got if g[0] == 0]
    s2c = [g for g in got if g[0] == 1]
    assert c2s == [(0, 1, 40), (0, 2, 48), (0, 2, 48)]
    assert s2c == [(1, 1, 40), (1, 2, 16), (1, 2, 16)]


def test_a_call_the_process_exits_in_is_not_a_problem(tmp_path):
    """A thread still blocked in recvmsg when its process exits: strace ends the
    line with "= ?" (the sample client's twin-socket thread does this)."""
    program = textwrap.dedent("""
        import os, socket, threading, time
        a, b = socket.socketpair()
        def serve():
            while True:
                a.recvmsg(100)
        threading.Thread(target=serve, daemon=True).start()
        b.send(bytes([1, 0, 1, 0, 16]) + bytes(11))
        time.sleep(0.3)
        os._exit(0)
    """)
    log = tmp_path / "t.log"
    subprocess.run(traced(log, sys.executable, "-c", program), check=True, timeout=60)
    assert "<unfinished ...>) = ?" in log.read_text()
    result = import_strace([str(log)])
    assert result.problems == [] and len(messages(result.records)) == 1


def test_a_request_answered_from_its_header_comes_before_its_reply(tmp_path):
    """The server answers a header whose body never comes (as libvfio-user
    rejects a msg_size it refuses) and reads the next header after it."""
    program = textwrap.dedent("""
        import os, socket, struct
        a, b = socket.socketpair()
        def msg(msg_id, cmd, payload=b"", flags=0, size=None, error=0):
            return struct.pack("<HHIII", msg_id, cmd, size or 16 + len(payload), flags,
                               error) + payload
        version = msg(1, 1, struct.pack("<HH", 0, 0) + b'{"capabilities":{}}\\0')
        if os.fork() == 0:
            b.recv(4096); b.sendall(msg(1, 1, version[16:], 1))
            b.recv(16); b.sendall(msg(2, 10, flags=0x21, error=22))
            b.recv(16); b.sendall(msg(3, 13, b"", 1))
            os._exit(0)
        a.send(version); a.recv(4096)
        a.send(msg(2, 10, size=(1 << 20) + 33)); a.recv(16)
        a.send(msg(3, 13)); a.recv(16); os.wait()
    """)
    log = tmp_path / "t.log"
    subprocess.run(traced(log, sys.executable, "-c", program), check=True, timeout=60)
    result = import_strace([str(log)])
    assert result.problems == []
    assert [(m.direction, m.data[0], len(m.data)) for m in messages(result.records)] == [
        (0, 1, 40), (1, 1, 40), (0, 2, 16), (1, 2, 16), (0, 3, 16), (1, 3, 16)]


def test_strings_cut_by_s_are_reported(tmp_path, session):
    tmp, _ = session
    sock = tmp_path / "s.sock"
    vfu = [sys.executable, "-m", "vfu_inspect"]
    server = subprocess.Popen([*vfu, "sample-server", "--listen", str(sock)])
    wait_for_socket(sock, server)
    subprocess.run(traced(tmp_path / "short.log", *vfu, "sample-client", "--server", str(sock),
                          s="32"), capture_output=True, timeout=120)
    stop(server)
    result = import_strace([str(tmp_path / "short.log")])
    assert any("cut by strace -s" in p for p in result.problems)


def test_garbage_is_reported_not_raised(tmp_path):
    junk = tmp_path / "junk.log"
    junk.write_text("hello\nsendto(3<UNIX:[9->]>, \"\\x01\", 1, 0, NULL, 0) = 1\n\x00\xff")
    result = import_strace([str(junk)])
    assert result.records == [] and result.problems


def test_cli_import_then_read(session, tmp_path):
    tmp, sent = session
    out = tmp_path / "s.vfucap"
    result = run_vfu("import", str(tmp / "client.log"), str(tmp / "server.log"), "-o", str(out))
    assert result.returncode == 0, result.stderr
    total = sum(len(v) for v in sent.values())
    assert f"wrote {total} messages" in result.stderr
    lines = run_vfu("read", str(out)).stdout.splitlines()
    assert len(lines) == total and "VERSION" in lines[0]
