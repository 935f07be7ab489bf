"""Session state, `check`, `-z` statistics and device plug-ins, on real captures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_vfu
from test_expert import Script
from vfu_inspect.capture import CaptureWriter, read_all
from vfu_inspect.dissect import Analyzer, Matcher, find_responses, state_at
from vfu_inspect.records import Message
from vfu_inspect.session import SessionTracker

ROOT = Path(__file__).resolve().parent.parent
TRACE = ROOT / "captures" / "libvfio-user-samples.vfucap"


def trace_messages() -> list[Message]:
    records, damage = read_all(TRACE)
    assert damage is None
    return [r for r in records if isinstance(r, Message)]


def analyze(messages: list[Message], tracker: SessionTracker | None = None) -> list:
    return list(Analyzer(find_responses(messages), tracker).run(messages))


def test_state_at_the_end_of_the_libvfio_user_trace_is_what_it_did():
    analyzer = Analyzer(sessions=SessionTracker())
    packets = list(analyzer.run(trace_messages()))
    source, destination = analyzer.sessions.conns[0], analyzer.sessions.conns[1]
    # Source: 16 maps of 4 KiB at 0..0xf000, the first 8 unmapped again.
    assert [(m.iova, m.size, m.offset) for m in source.maps] == [
        (0x8000 + i * 0x1000, 0x1000, 0x8000 + i * 0x1000) for i in range(8)]
    assert all(m.fd.startswith("file") and m.flags == 3 for m in source.maps)
    assert source.server_version == (0, 2) and source.twin is False
    assert source.server_caps == {"max_msg_fds": 8, "max_data_xfer_size": 1048576,
                                  "migration.pgsize": 4096}
    assert source.device == {"argsz": 16, "flags": 3, "num_regions": 9, "num_irqs": 5}
    bar1, config = source.regions[1], source.regions[7]
    assert (bar1.size, bar1.areas, bar1.caps) == (0x4000, [(0, 0x1000), (0x2000, 0x1000)],
                                                  ["SPARSE_MMAP"])
    assert config.size == 0x100 and config.flags == 3
    assert source.irqs[0].count == 1 and source.irqs[0].eventfds == {0}
    assert source.mig_state == 1                      # STOP: migrated out
    assert source.config.identity == (0xDEAD, 0xBEEF)
    # Destination: its maps were all unmapped; it resumed and runs.
    assert not destination.maps and destination.mig_state == 2
    assert not source.inflight and not destination.inflight
    assert packets[-1].number == 344


def test_state_at_any_message_equals_a_straight_run_to_it():
    messages = trace_messages()
    tracker = SessionTracker(checkpoint_every=50)
    list(Analyzer(sessions=tracker).run(messages))
    assert [n for n, _ in tracker.checkpoints] == [50, 100, 150, 200, 250, 300]
    replayed: list[tuple[int, int]] = []

    def replay(first: int, last: int):
        replayed.append((first, last))
        return messages[first - 1:last]

    for number in (1, 49, 50, 51, 120, 344):
        snapshot = state_at(tracker, number, replay)
        straight = Analyzer(sessions=SessionTracker(checkpoint_every=0))
        list(straight.run(messages[:number]))
        assert {c: s.sections() for c, s in snapshot.connections.items()} == \
               {c: s.sections() for c, s in straight.sessions.conns.items()}
    # Each query rolled forward from the nearest checkpoint, never from the start.
    assert replayed == [(1, 1), (1, 49), (51, 50), (51, 51), (101, 120), (301, 344)]


def test_the_trace_has_no_error_and_only_explained_notes():
    items = {(e.severity, e.id) for p in analyze(trace_messages()) for e in p.tree.experts}
    assert items == {("note", "argsz.truncated"), ("note", "interop.mig_data_padding")}


def test_check_exit_status_follows_the_worst_item(tmp_path):
    result = run_vfu("check", str(TRACE))
    assert result.returncode == 0, result.stderr
    assert "argsz.truncated" in result.stdout and "Notes (2)" in result.stdout
    script = Script()
    script.negotiate()
    script.map(0x10000)
    script.map(0x18000)                          # overlapping, and accepted
    bad = tmp_path / "bad.vfucap"
    with CaptureWriter(bad) as writer:
        for msg in script.messages:
            writer.write(msg)
    result = run_vfu("check", str(bad))
    assert result.returncode == 1
    assert "reply.accepted_invalid" in result.stdout and "Errors (1)" in result.stdout
    assert run_vfu("check", str(TRACE), "--fail-on", "warning").returncode == 0
    assert run_vfu("check", str(bad), "--fail-on", "warning", "-q").returncode == 1
    truncated = tmp_path / "cut.vfucap"
    truncated.write_bytes(b"not a capture")
    for path in (truncated, tmp_path / "missing.vfucap"):
        result = run_vfu("check", str(path))
        assert result.returncode == 2 and "Traceback" not in result.stderr


def test_z_expert_and_z_session_print_their_tables():
    result = run_vfu("read", str(TRACE), "-q", "-z", "expert", "-z", "session,100")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Notes (2)" in out and "interop.mig_data_padding" in out
    assert "Session state of connection 0 after message 100" in out
    assert "0x000000000000-0x000000000fff size 0x1000 RW" in out     # maps live at 100
    assert "dirty logging page 0x1000, ranges all" in out
    assert " REGION_READ " not in out                                  # -q: no packet lines
    for bad in ("session,x", "session,0", "flows"):
        result = run_vfu("read", str(TRACE), "-z", bad)
        assert result.returncode == 2 and "Traceback" not in result.stderr


def test_expert_filter_fields_select_the_flagged_messages():
    result = run_vfu("read", str(TRACE), "-2", "-T", "fields", "-e", "frame.number",
                     "-Y", 'expert.severity == "note" && expert.id == "argsz.truncated"')
    assert result.stdout.split() == ["10"]


def test_config_space_of_the_trace_is_decoded_as_pci():
    packets = analyze(trace_messages())
    config_reply = packets[27]
    values = config_reply.tree.values()
    assert values["pci.vendor_id"] == [0xDEAD] and values["pci.device_id"] == [0xBEEF]
    assert values["pci.subsystem_vendor_id"] == [0xCAFE]


PLUGIN = '''
from scapy.packet import Packet
from vfu_inspect.devices import PciDevice
from vfu_inspect.fields import Fields, u64

FIELDS = Fields()

@FIELDS.layer("lvu_sample.bar0")
class TimeRegister(Packet):
    name = "libvfio-user sample BAR0"
    fields_desc = [u64("time", label="Time register")]

DEVICES = [PciDevice("libvfio-user sample", 0xDEAD, 0xBEEF, {0: TimeRegister})]
'''


def test_a_user_device_plugin_decodes_its_registers(tmp_path):
    (tmp_path / "lvu_sample.py").write_text(PLUGIN)
    (tmp_path / "broken.py").write_text("raise RuntimeError('half-written plug-in')\n")
    env = {**os.environ, "VFU_INSPECT_PLUGINS": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "vfu_inspect", "read", str(TRACE), "-T", "fields",
         "-e", "frame.number", "-e", "lvu_sample.bar0.time", "-Y", "lvu_sample.bar0.time"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert [number for number, _ in rows] == ["77", "80", "147"]    # writes and the read reply
    assert "broken.py not loaded: RuntimeError: half-written plug-in" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("timeout,flagged", [("0.5", True), ("10", False)])
def test_timeout_option_sets_when_a_request_is_late(tmp_path, timeout, flagged):
    script = Script()
    script.negotiate()
    first = script.command("DEVICE_RESET")
    script.reply(script.command("DEVICE_RESET", after=1.0), "DEVICE_RESET")
    script.reply(first, "DEVICE_RESET")
    path = tmp_path / "late.vfucap"
    with CaptureWriter(path) as writer:
        for msg in script.messages:
            writer.write(msg)
    result = run_vfu("check", str(path), "--timeout", timeout)
    assert ("request.timeout" in result.stdout) == flagged


def test_requests_sharing_a_msg_id_are_answered_in_order_and_only_from_the_other_side():
    matcher = Matcher()
    for number in (1, 2, 3):                      # three in flight with id 7, client to server
        matcher.request(0, 0, 0, 7, number, f"r{number}")
    matcher.request(0, 0, 1, 7, 4, "server's")    # the server's own command, same id
    matcher.request(1, 0, 0, 7, 5, "conn 1")
    assert matcher.outstanding() == ["r1", "r2", "r3", "server's", "conn 1"]
    assert matcher.reply(0, 0, 1, 7) == (1, "r1")      # a reply from the server: the oldest
    assert matcher.reply(0, 0, 0, 7) == (4, "server's")
    assert matcher.reply(0, 0, 0, 7) is None
    assert matcher.waiting(0, 0, 0, 7) and not matcher.waiting(0, 0, 1, 7)
    assert [matcher.reply(0, 0, 1, 7) for _ in range(3)] == [(2, "r2"), (3, "r3"), None]
    assert not matcher.waiting(0, 0, 0, 7) and matcher.outstanding() == ["conn 1"]
