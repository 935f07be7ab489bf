"""Replay (vfu-inspect as the client) and serve (as the server) of real recordings."""

from __future__ import annotations

import errno
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import (LIBVFIO_USER, TESTS, needs_libvfio_user, run_vfu, sample_session, stop, vfu,
                     wait_for_socket)
from vfu_inspect.dissectors.vfio_user import CMD, RegionRead, parse_header
from vfu_inspect.endpoints.common import message, pack
from vfu_inspect.sockio import MessageSocket

CAPTURES = TESTS.parent / "captures"


def sample_server(path: Path, *options: str) -> subprocess.Popen:
    proc = vfu("sample-server", "--listen", str(path), *options)
    wait_for_socket(path, proc)
    return proc


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:
    """A session between the sample client and server, captured by the proxy."""
    tmp = tmp_path_factory.mktemp("rec")
    server = sample_server(tmp / "server.sock")
    proxy = vfu("proxy", "--listen", str(tmp / "proxy.sock"), "--server", str(tmp / "server.sock"),
                "-w", str(tmp / "session.vfucap"))
    wait_for_socket(tmp / "proxy.sock", proxy)
    result = run_vfu("sample-client", "--server", str(tmp / "proxy.sock"))
    stop(proxy)
    stop(server)
    assert result.returncode == 0, result.stderr
    return tmp / "session.vfucap"


def replay(recording: Path, server: Path, *args: str) -> subprocess.CompletedProcess:
    return run_vfu("replay", str(recording), "--server", str(server), *args)


def diverged_fields(stdout: str) -> list[str]:
    return re.findall(r"^  (\S+)\s+recorded", stdout, re.MULTILINE)


def test_replay_against_the_same_server_matches(recording, tmp_path):
    server = sample_server(tmp_path / "s.sock")
    try:
        for conn in ("0", "1"):          # the source, then the migration destination
            result = replay(recording, tmp_path / "s.sock", "--conn", conn,
                            "-w", str(tmp_path / f"replay{conn}.vfucap"))
            assert result.returncode == 0, result.stdout + result.stderr
            assert ", 0 diverged" in result.stdout
    finally:
        stop(server)
    assert run_vfu("read", str(tmp_path / "replay0.vfucap")).stdout.count("\n") > 100


def replay_against_sample(recording: Path, tmp_path: Path, server_options: list[str],
                          *args: str) -> subprocess.CompletedProcess:
    server = sample_server(tmp_path / "s.sock", *server_options)
    try:
        return replay(recording, tmp_path / "s.sock", "--conn", "0", *args)
    finally:
        stop(server)


def test_a_changed_register_is_reported_exactly(recording, tmp_path):
    result = replay_against_sample(recording, tmp_path, ["--id-value", "0x99"])
    assert result.returncode == 1
    # The ID register read, and the migration stream that carries the registers.
    assert diverged_fields(result.stdout) == ["region_read.data", "mig_data_read.data"]
    assert "recorded 5646553100000000  live 9900000000000000" in result.stdout
    assert ", 2 diverged" in result.stdout


def test_a_changed_errno_is_reported(recording, tmp_path):
    result = replay_against_sample(recording, tmp_path, ["--errno-for", "DEVICE_RESET=EIO"])
    assert result.returncode == 1
    first = result.stdout.split("DIVERGED")[1]
    assert "DEVICE_RESET reply" in first and "vfio_user.error" in first and "live 5" in first


def test_ignored_fields_do_not_count(recording, tmp_path):
    result = replay_against_sample(recording, tmp_path, ["--id-value", "0x99"],
                                   "--ignore", "region_read.data", "--ignore", "mig_data_read.")
    assert result.returncode == 0 and ", 0 diverged" in result.stdout


def test_sample_client_succeeds_against_serve(recording, tmp_path):
    listen = tmp_path / "serve.sock"
    served = vfu("serve", str(recording), "--listen", str(listen), "--clients", "2")
    wait_for_socket(listen, served)
    result = run_vfu("sample-client", "--server", str(listen), "--protocol-only")
    out, err = served.communicate(timeout=30)
    assert result.returncode == 0, result.stderr
    assert served.returncode == 0, out + err
    assert "0 without a recorded answer" in out


def test_serve_answers_unknown_requests_with_an_error(recording, tmp_path):
    listen = tmp_path / "serve.sock"
    served = vfu("serve", str(recording), "--listen", str(listen), "--clients", "1")
    wait_for_socket(listen, served)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(listen))
    conn = MessageSocket(sock)
    conn.send(message(9, CMD["REGION_READ"], pack(RegionRead, 0, 5, 4)))   # never recorded
    reply = parse_header(conn.recv().data)
    sock.close()
    out, _ = served.communicate(timeout=30)
    assert (reply.msg_id, reply.is_error, reply.error) == (9, True, errno.EINVAL)
    assert served.returncode == 1 and "no recorded answer for REGION_READ" in out


@pytest.mark.parametrize("make,reason", [
    (lambda tmp: tmp / "missing.vfucap", "cannot open"),
    (lambda tmp: _truncated(tmp), "no messages"),
])
def test_bad_recordings_exit_2(tmp_path, make, reason):
    server = sample_server(tmp_path / "s.sock")
    try:
        result = replay(make(tmp_path), tmp_path / "s.sock")
    finally:
        stop(server)
    assert result.returncode == 2 and reason in result.stderr
    assert "Traceback" not in result.stderr


def _truncated(tmp: Path) -> Path:
    path = tmp / "cut.vfucap"
    path.write_bytes((CAPTURES / "libvfio-user-samples.vfucap").read_bytes()[:150])
    return path


def test_missing_server_exits_2(recording, tmp_path):
    result = replay(recording, tmp_path / "absent.sock")
    assert result.returncode == 2 and "cannot connect" in result.stderr


def test_server_that_disconnects_mid_replay_exits_2(recording, tmp_path):
    path = tmp_path / "echo.sock"
    echo = subprocess.Popen([sys.executable, str(TESTS / "raw_echo.py"), str(path), "--close-on", "3",
                             "--as-reply"])
    wait_for_socket(path, echo)
    try:
        result = replay(recording, path, "--conn", "0")
    finally:
        echo.kill()
        echo.wait()
    assert result.returncode == 2
    assert "closed the connection" in result.stderr and "Traceback" not in result.stderr


@needs_libvfio_user
def test_libvfio_user_trace_replays_against_its_server(tmp_path):
    sock = tmp_path / "lvu.sock"
    server = subprocess.Popen([str(Path(LIBVFIO_USER) / "samples" / "server"), "-v", str(sock)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_socket(sock, server)
    try:
        result = replay(CAPTURES / "libvfio-user-samples.vfucap", sock, "--conn", "0")
    finally:
        server.kill()
        server.wait()
    print(result.stdout[-4000:])
    assert result.returncode in (0, 1), result.stderr
    assert "requests sent" in result.stdout


@pytest.fixture(scope="module")
def traced(tmp_path_factory) -> Path:
    """The sample session recorded by proxy --trace-irqs."""
    tmp = tmp_path_factory.mktemp("traced")
    result, capture, _, _ = sample_session(tmp, ["--trace-irqs"])
    assert result.returncode == 0, result.stderr
    return capture


def test_replay_rings_the_recorded_doorbell_and_compares_interrupts(traced, tmp_path):
    result = replay_against_sample(traced, tmp_path, [])
    assert result.returncode == 0, result.stdout
    assert ", 0 diverged" in result.stdout
    refused = replay_against_sample(traced, tmp_path, ["--errno-for", "DEVICE_SET_IRQS=EINVAL"])
    assert refused.returncode == 1
    for vector in ("INTx vector 0", "MSI-X vector 1", "MSI-X vector 2", "MSI-X vector 3"):
        assert f"interrupts: {vector} raised 1 time(s) in the recording, 0 live" in \
            refused.stdout


def test_replay_takes_the_proxys_faults(traced, tmp_path):
    result = replay_against_sample(traced, tmp_path, [], "--fault",
                                   "vfio_user.cmd == DEVICE_GET_INFO: errno EIO",
                                   "-w", str(tmp_path / "replay.vfucap"))
    assert result.returncode == 1
    assert "fault: DEVICE_GET_INFO answered with EIO in place of the server" in result.stdout
    assert "vfio_user.error" in diverged_fields(result.stdout)
    assert result.stdout.rstrip().endswith("1 faults injected")
    shown = run_vfu("read", str(tmp_path / "replay.vfucap"), "--events", "-Y", "fault").stdout
    assert shown.startswith("# conn 0 fault: DEVICE_GET_INFO answered with EIO")
    refused = replay_against_sample(traced, tmp_path, [], "--fault",
                                    "vfio_user.cmd == DMA_READ: errno EFAULT")
    assert refused.returncode == 2        # the sample server drops a client that refuses DMA
    assert "server closed the connection" in refused.stderr
    closed = replay_against_sample(traced, tmp_path, [], "--fault",
                                   "vfio_user.cmd == DEVICE_RESET: close before")
    assert closed.returncode == 0 and "the replay ends here" in closed.stdout
