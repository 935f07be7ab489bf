"""Process and socket helpers shared by the tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def wait_for_socket(path: Path | str, proc: subprocess.Popen | None = None,
                    timeout: float = 10.0) -> None:
    """Wait until something listens on `path`, without connecting to it
    (a probe connection would show up in the proxy's capture)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_listening(path):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {path} appeared")
        time.sleep(0.02)
    raise TimeoutError(f"{path} did not appear")


def is_listening(path: Path | str) -> bool:
    listening = 0x10000     # __SO_ACCEPTCON in /proc/net/unix's Flags column
    return any(int(fields[3], 16) & listening for fields in _unix_sockets(path))


def wait_for_accepted(path: Path | str, timeout: float = 10.0) -> None:
    """Wait until the listener on `path` has accepted a connection: the
    accepted socket shows under the listener's name, connected (state 03)."""
    deadline = time.monotonic() + timeout
    while not any(fields[5] == "03" for fields in _unix_sockets(path)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing connected to {path}")
        time.sleep(0.02)


def _unix_sockets(path: Path | str) -> list[list[str]]:
    lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    return [fields for fields in map(str.split, lines) if len(fields) >= 8 and fields[7] == str(path)]


def vfu(*args: str, **kw) -> subprocess.Popen:
    """Start `vfu-inspect ARGS` as a real process."""
    return subprocess.Popen([sys.executable, "-m", "vfu_inspect", *args],
                            stdout=kw.pop("stdout", subprocess.PIPE),
                            stderr=kw.pop("stderr", subprocess.PIPE), text=True, **kw)


def run_vfu(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vfu_inspect", *args],
                          capture_output=True, text=True, timeout=timeout)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def open_fds(pid: int) -> int:
    """The process's open fds, once the count holds still: a relay closes its
    copy of a passed fd just after sending it, maybe after the peer got it."""
    count = len(os.listdir(f"/proc/{pid}/fd"))
    for _ in range(100):
        time.sleep(0.02)
        count, last = len(os.listdir(f"/proc/{pid}/fd")), count
        if count == last:
            break
    return count


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def streams(msgs: list) -> dict[tuple, list[tuple[bytes, list[str]]]]:
    """Per (conn, channel, direction): the messages in order, with their fd kinds."""
    out: dict[tuple, list] = {}
    for m in msgs:
        out.setdefault((m.conn, m.channel, m.direction), []).append(
            (m.data, [fd["kind"] for fd in m.fds]))
    return out


LIBVFIO_USER = os.environ.get("LIBVFIO_USER_BUILD")
needs_libvfio_user = pytest.mark.skipif(
    not LIBVFIO_USER, reason="set LIBVFIO_USER_BUILD to a libvfio-user build dir")

QEMU = os.environ.get("VFU_INSPECT_QEMU")
needs_qemu = pytest.mark.skipif(
    not QEMU, reason="set VFU_INSPECT_QEMU to a qemu-system-x86_64 with vfio-user-pci")


@contextlib.contextmanager
def libvfio_user_server_through_proxy(tmp_path: Path, capture: Path, *proxy_args: str):
    """libvfio-user's samples/server behind `proxy -w capture PROXY_ARGS`:
    yields the proxy's socket, for a client to connect to."""
    real, listen = tmp_path / "lvu.sock", tmp_path / "p.sock"
    server = subprocess.Popen([str(Path(LIBVFIO_USER) / "samples" / "server"), "-v", str(real)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_socket(real, server)
    proxy = vfu("proxy", "--listen", str(listen), "--server", str(real), "-w", str(capture),
                *proxy_args)
    try:
        wait_for_socket(listen, proxy)
        yield listen
    finally:
        stop(proxy)
        server.kill()
        server.wait()


def libvfio_user_client(listen: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """libvfio-user's samples/client against `listen`.  A run that gets through
    takes about 12 s: before migrating, the client writes now + 10 s to BAR0,
    and the destination server (the process this waits for: the client forks,
    its parent execs the server) arms its INTx timer from that value.  Should
    the 10 s pass before the destination is running (a very loaded machine),
    its timer is never armed and the client waits for the interrupt forever."""
    return subprocess.run([str(Path(LIBVFIO_USER) / "samples" / "client"), str(listen)],
                          capture_output=True, text=True, timeout=timeout)


def libvfio_user_samples_through_proxy(tmp_path: Path, capture: Path) -> None:
    """libvfio-user's samples/client against samples/server through `proxy -w
    capture`; fails unless the client succeeds."""
    with libvfio_user_server_through_proxy(tmp_path, capture) as listen:
        result = libvfio_user_client(listen)
        assert result.returncode == 0, result.stderr[-2000:]


def sample_session(tmp_path: Path, proxy_args: list[str], client_args: list[str] = (),
                   server_args: list[str] = ()) -> tuple[subprocess.CompletedProcess, Path, Path,
                                                        Path]:
    """The sample client through `proxy PROXY_ARGS` to the sample server, each
    recording what it sent and received: (client result, proxy capture, server's
    recording, client's recording)."""
    real, listen = tmp_path / "server.sock", tmp_path / "proxy.sock"
    captures = [tmp_path / name for name in ("proxy.vfucap", "server.vfucap", "client.vfucap")]
    server = vfu("sample-server", "--listen", str(real), "--record", str(captures[1]),
                 *server_args)
    wait_for_socket(real, server)
    proxy = vfu("proxy", "--listen", str(listen), "--server", str(real), "-w", str(captures[0]),
                *proxy_args)
    try:
        wait_for_socket(listen, proxy)
        result = run_vfu("sample-client", "--server", str(listen), "--record", str(captures[2]),
                         *client_args)
    finally:
        assert stop(proxy) == 0, proxy.stderr.read()
        stop(server)
    return result, *captures
