"""Sample client <-> proxy <-> sample server: real processes, sockets and fds."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from helpers import (libvfio_user_samples_through_proxy, needs_libvfio_user, run_vfu, stop,
                     streams, vfu, wait_for_socket)
from vfu_inspect.capture import read_all
from vfu_inspect.dissect import Analyzer, find_responses
from vfu_inspect.dissectors.vfio_user import (CLIENT_COMMANDS, CMD, COMMANDS, OBSOLETE_COMMANDS,
                                              parse_header)
from vfu_inspect.endpoints.common import (BAR0_SIZE, DEFAULT_ID_VALUE, DEVICE_ID, MSIX_VECTORS,
                                           REG_DMA_CMD, VENDOR_ID)
from vfu_inspect.endpoints.sample_server import ANSWERS
from vfu_inspect.records import MAIN, TWIN, Message

# What a session of the sample client and server must hold: every command
# the spec defines, each sent and answered.
EVERY_COMMAND = set(COMMANDS) - OBSOLETE_COMMANDS


@pytest.fixture
def server(tmp_path, request):
    """The sample server, with extra options from @pytest.mark.server_args."""
    marker = request.node.get_closest_marker("server_args")
    extra = list(marker.args) if marker else []
    path, record = tmp_path / "server.sock", tmp_path / "server.vfucap"
    proc = vfu("sample-server", "--listen", str(path), "--record", str(record), *extra)
    wait_for_socket(path, proc)
    yield path, record
    assert stop(proc) == 0
    assert not path.exists()


@pytest.fixture
def proxy(tmp_path, server):
    listen, capture = tmp_path / "proxy.sock", tmp_path / "proxy.vfucap"
    proc = vfu("proxy", "--listen", str(listen), "--server", str(server[0]), "-w", str(capture))
    wait_for_socket(listen, proc)
    yield listen, capture
    assert stop(proc) == 0


def client(path: Path, *args: str) -> subprocess.CompletedProcess:
    return run_vfu("sample-client", "--server", str(path), *args)


def messages(path: Path) -> list[Message]:
    records, damage = read_all(path)
    assert damage is None
    return [r for r in records if isinstance(r, Message)]


def test_the_sample_server_answers_every_command_a_client_sends():
    assert {COMMANDS[cmd] for cmd in CLIENT_COMMANDS - set(ANSWERS)} == set()
    assert set(ANSWERS) <= CLIENT_COMMANDS


def test_client_runs_every_command_directly(server):
    result = client(server[0])
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("twin", [True, False])
def test_through_the_proxy_the_capture_holds_exactly_what_each_side_sent(
        tmp_path, server, proxy, twin):
    client_record = tmp_path / "client.vfucap"
    result = client(proxy[0], "--record", str(client_record), *([] if twin else ["--no-twin"]))
    assert result.returncode == 0, result.stderr     # DMA through memfds and messages, MSI-X
    captured = messages(proxy[1])
    sent_by_client = [m for m in messages(client_record) if m.direction == 0]
    sent_by_server = [m for m in messages(server[1]) if m.direction == 1]
    # Each endpoint's own record of what it sent equals the proxy's capture,
    # message for message, per connection, channel and direction.
    assert streams(captured) == streams(sent_by_client + sent_by_server)
    commands = {parse_header(m.data).cmd for m in captured}
    assert commands == EVERY_COMMAND
    channels = Counter((m.channel, parse_header(m.data).cmd) for m in captured
                       if parse_header(m.data).cmd in (CMD["DMA_READ"], CMD["DMA_WRITE"]))
    on = TWIN if twin else MAIN
    assert channels[(on, CMD["DMA_READ"])] >= 2 and channels[(on, CMD["DMA_WRITE"])] >= 2
    assert not any(ch == (MAIN if twin else TWIN) for ch, _ in channels)


# The sample client probes the server's error paths on purpose; each of these
# requests must be refused (an accepted one would be a reply.accepted_invalid error).
DELIBERATE_WARNINGS = {"dma.overlap", "region.unknown", "region.out_of_bounds",
                       "dma.unmap_unknown"}


def test_capture_of_the_reference_session_has_fd_metadata_and_no_errors(tmp_path, server, proxy):
    assert client(proxy[0]).returncode == 0
    packets = list(Analyzer(find_responses(messages(proxy[1]))).run(messages(proxy[1])))
    kinds = Counter(fd["kind"] for p in packets for fd in p.msg.fds)
    assert kinds == {"socket": 2, "memfd": 2, "eventfd": 6}    # INTx, 4 MSI-X, the doorbell
    memfd = next(fd for p in packets for fd in p.msg.fds if fd["kind"] == "memfd")
    assert memfd["size"] > 0 and memfd["inode"] > 0
    by_severity = {severity: {e.id for p in packets for e in p.tree.experts
                              if e.severity == severity} for severity in ("error", "warning")}
    assert by_severity == {"error": set(), "warning": DELIBERATE_WARNINGS}
    for p in packets:
        if any(e.id in DELIBERATE_WARNINGS for e in p.tree.experts):
            assert packets[p.response_in - 1].header.is_error
    # The device layers: config space (with the BAR sizing probe and the MSI-X
    # capability) and the sample device's own registers.
    values: dict[str, list] = {}
    for p in packets:
        for name, found in p.tree.values().items():
            values.setdefault(name, []).extend(found)
    assert VENDOR_ID in values["pci.vendor_id"] and DEVICE_ID in values["pci.device_id"]
    assert values["pci.bar_size"] == [BAR0_SIZE]
    assert values["pci.msix.control.table_size"][0] == MSIX_VECTORS - 1
    assert DEFAULT_ID_VALUE in values["vfu_sample.bar0.id"]


def test_two_clients_at_once(tmp_path, server, proxy):
    # Read-only traffic: two full exercises would race on the one shared device.
    procs = [vfu("sample-client", "--server", str(proxy[0]), "--rounds", "500",
                 "--pipeline", "4") for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "500 round trips" in out
    packets = list(Analyzer().run(messages(proxy[1])))
    assert Counter(p.msg.conn for p in packets) == {0: 1002, 1: 1002}
    assert all(p.request_in is not None for p in packets if p.header.is_reply)


@pytest.mark.server_args("--id-value", "0x1234")
def test_misbehaving_id_register_is_caught_by_the_client(server):
    result = client(server[0])
    assert result.returncode == 1
    assert f"ID register: expected {DEFAULT_ID_VALUE}, got 4660" in result.stderr


@pytest.mark.server_args("--errno-for", "DEVICE_RESET=EIO")
def test_misbehaving_errno_is_caught_by_the_client(server):
    result = client(server[0])
    assert result.returncode == 1 and "DEVICE_RESET: expected success, got EIO" in result.stderr


@pytest.mark.server_args("--accept-overlap")
def test_overlapping_map_accepted_is_caught_by_the_client(server):
    result = client(server[0])
    assert result.returncode == 1 and "DMA_MAP: expected EEXIST, got success" in result.stderr


@pytest.mark.server_args("--caps-when-truncated")
def test_linux_style_truncated_region_info_is_refused_as_qemu_does(server, tmp_path):
    result = client(server[0], "--record", str(tmp_path / "c.vfucap"))
    assert result.returncode == 1
    assert "region 2 CAPS with cap_offset in [32, 80]: expected True, got False" in result.stderr
    checked = run_vfu("check", str(tmp_path / "c.vfucap"))
    assert "note    interop.region_caps_offset" in checked.stdout and checked.returncode == 0


@pytest.mark.server_args("--dma-via-messages")
def test_dma_through_messages_only(server):
    assert client(server[0]).returncode == 0


@pytest.mark.server_args("--dma-via-messages")
def test_messaged_dma_without_twin_socket_comes_after_the_write_reply(proxy):
    """A client waiting for its REGION_WRITE's reply on the main socket cannot
    serve a DMA request (QEMU times out): the device answers first."""
    listen, capture = proxy
    assert client(listen, "--no-twin").returncode == 0
    msgs = messages(capture)
    packets = list(Analyzer(find_responses(msgs)).run(msgs))
    dma_starts = [p for p in packets if p.header.cmd == CMD["REGION_WRITE"]
                  and not p.header.is_reply
                  and p.tree.prefixed("region_write").get("offset") == REG_DMA_CMD]
    dma = [p for p in packets if p.header.cmd in (CMD["DMA_READ"], CMD["DMA_WRITE"])
           and not p.header.is_reply]
    assert dma and all(p.msg.channel == MAIN for p in dma)
    for p in dma:
        start = max((s for s in dma_starts if s.number < p.number), key=lambda s: s.number)
        assert start.response_in < p.number, f"frame {p.number} during frame {start.number}"


def test_missing_socket_is_a_clear_error(tmp_path):
    result = client(tmp_path / "absent.sock")
    assert result.returncode == 2 and "no such socket" in result.stderr
    result = run_vfu("sample-server", "--listen", str(tmp_path / "no" / "dir.sock"))
    assert result.returncode != 0 and "Traceback" not in result.stderr


def test_demo_runs_and_leaves_a_capture(tmp_path):
    capture = tmp_path / "demo.vfucap"
    result = subprocess.run([sys.executable, "-m", "vfu_inspect", "demo", "-w", str(capture)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "The sample client succeeded" in result.stdout
    assert f"vfu-inspect read {capture}" in result.stdout
    assert "DEVICE_GET_REGION_INFO" in result.stdout and "0:twin" in result.stdout
    assert {parse_header(m.data).cmd for m in messages(capture)} == EVERY_COMMAND


@needs_libvfio_user
def test_libvfio_user_samples_through_the_proxy(tmp_path):
    capture = tmp_path / "lvu.vfucap"
    libvfio_user_samples_through_proxy(tmp_path, capture)
    packets = list(Analyzer().run(messages(capture)))
    assert len(packets) > 100
    assert not [e for p in packets for e in p.tree.experts if e.severity == "error"]
