"""pcapng export/import and the generated Lua plugin, checked against real tshark."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest
from scapy.utils import RawPcapNgReader

from helpers import (libvfio_user_samples_through_proxy, needs_libvfio_user, run_vfu, stop,
                     streams, vfu, wait_for_socket)
from vfu_inspect import fields, pcapng, wireshark
from vfu_inspect.capture import CaptureWriter, read_all
from vfu_inspect.dissect import Analyzer, find_responses
from vfu_inspect.dissectors import vfio_user as proto
from vfu_inspect.dissectors.vfio_user import HEADER_SIZE, protocol_fields
from vfu_inspect.dissectors.vfio_user.core import REPLY, REQUEST, render_info
from vfu_inspect.records import C2S, MAIN, S2C, Burst, Message

CAPTURES = Path(__file__).resolve().parent.parent / "captures"
SAMPLES = [CAPTURES / "libvfio-user-samples.vfucap", CAPTURES / "sample-endpoints.vfucap"]
TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed (.ci/run installs it)")

# Checks the Lua plugin does not make, mostly because it sees one message at
# a time and no fds (they are not in the packet bytes): in an exported
# capture it shows them from the packet comment.
LEFT_TO_VFU_INSPECT = {
    "reply.unmatched", "reply.command_mismatch", "reply.accepted_invalid", "reply.to_no_reply",
    "reply.echo_mismatch", "request.duplicate_id", "request.unanswered", "request.timeout",
    "fd.count", "fd.over_max", "xfer.too_big", "argsz.reply_exceeds", "version.not_first",
    "version.major", "version.minor", "version.capability_not_offered", "twin.not_negotiated",
    "twin.fd_index", "twin.wrong_channel", "dma_map.offset_no_fd", "dma.overlap",
    "dma.overlap_errno", "dma.unmap_unknown", "dma.misaligned", "dma.too_many",
    "dma.access_unmapped", "dma_logging.not_started", "dma_logging.unmapped", "dirty.bitmap_too_big",
    "device_reset.unsupported", "region_info.mmap_no_fd", "region_info.fd_per_area",
    "region_io_fds.fd_index", "region.unknown", "region.out_of_bounds", "region.access_flags",
    "write_multi.not_negotiated", "set_irqs.fd_count", "interop.irq_mask_eventfd", "irq.unknown",
    "irq.out_of_range", "irq.action_unsupported", "deadlock.server_command",
    "migration.transition", "migration.data_state", "dissector.bug",
}
COMPARED = {fd.name: fd for fd in protocol_fields() if fd.type != fields.PROTOCOL}


def tshark(pcap: Path, *args: str) -> str:
    result = subprocess.run([TSHARK, "-X", f"lua_script:{wireshark.PLUGIN}", "-r", str(pcap),
                             *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Lua" not in result.stderr, result.stderr     # a plugin that failed to load
    return result.stdout


def export(capture: Path, out: Path) -> Path:
    result = run_vfu("export", str(capture), "-o", str(out))
    assert result.returncode == 0, result.stderr
    return out


def read_json(capture: Path) -> list[dict]:
    result = run_vfu("read", str(capture), "-T", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def leaves(pairs, out: dict[str, list]) -> dict[str, list]:
    """Field name -> values in tree order, from either JSON (tshark repeats keys)."""
    for key, value in pairs:
        if isinstance(value, dict):
            leaves(value.items(), out)
        elif isinstance(value, list) and value and isinstance(value[0], tuple):
            leaves(value, out)                          # a tshark subtree
        elif isinstance(value, list):
            leaves([(key, v) for v in value], out)      # vfu-inspect's repeated field
        elif key in COMPARED:
            out.setdefault(key, []).append(normal(key, value))
    return out


def normal(name: str, value):
    """tshark prints every value as text; vfu-inspect's JSON keeps types."""
    kind = COMPARED[name].type
    if kind == fields.UINT:
        return value if isinstance(value, int) else int(value, 0)
    if kind == fields.BOOL:
        return value == "1" if isinstance(value, str) else bool(value)
    if kind == fields.BYTES:
        return value.replace(":", "")
    if kind == fields.FLOAT:        # times: whole nanoseconds, whatever the float's last digits
        return round(float(value), 9)
    if kind == fields.FRAME:
        return int(value)
    return value


def tshark_packets(pcap: Path, run=tshark) -> list[list]:
    packets = json.loads(run(pcap, "-2", "-T", "json"), object_pairs_hook=lambda p: p)
    return [dict(dict(p)["_source"])["layers"] for p in packets]


# Another Wireshark, in a root filesystem of its own: e.g. Debian 13's 4.4 with
# Lua 5.4 (debootstrap trixie DIR; chroot DIR apt-get install tshark).  Needs root.
OTHER_ROOT = os.environ.get("VFU_INSPECT_TSHARK_ROOT")


def tshark_in_other_root(pcap: Path, *args: str) -> str:
    """tshark of OTHER_ROOT, as an unprivileged user (Wireshark 4.4 ignores Lua
    scripts when run as root)."""
    work = Path(tempfile.mkdtemp(dir=Path(OTHER_ROOT) / "tmp"))
    try:
        for path in (pcap, wireshark.PLUGIN):
            shutil.copy(path, work / path.name)
        work.chmod(0o755)
        inside = Path("/") / work.relative_to(OTHER_ROOT)
        result = subprocess.run(
            ["chroot", "--userspec=65534:65534", OTHER_ROOT, "env", f"HOME={inside}", "tshark",
             "-X", f"lua_script:{inside / wireshark.PLUGIN.name}", "-r", str(inside / pcap.name),
             *args], capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(work)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_committed_plugin_is_generated_from_the_current_registry():
    assert wireshark.PLUGIN.read_text() == wireshark.generate(), \
        "dissectors/vfio_user.lua is stale: run `vfu-inspect wireshark-plugin --generate`"


def test_plugin_declares_every_protocol_field_once():
    text = wireshark.PLUGIN.read_text()
    for name in COMPARED:
        assert text.count(f'F["{name}"] = ProtoField.') == 1, name
    assert "ProtoField.bool(\"vfio_user.flags.no_reply\", \"No reply\", 32, nil, 0x10)" in text


@needs_tshark
@pytest.mark.parametrize("ours, theirs", [
    ("vfio_user.cmd == DMA_MAP", "vfio_user.cmd == 2"),
    ("vfio_user.cmd == DEVICE_FEATURE && vfio_user.flags.type == 1",
     "vfio_user.cmd == 16 && vfio_user.flags.type == 1"),
    ("region_info.area.size >= 0x1000", "region_info.area.size >= 0x1000"),
    ("vfio_user.error", "vfio_user.error"),
    ("frame.dir == 0", "frame.packet_flags_direction == 1"),
    ("frame.dir == 1", "frame.packet_flags_direction == 2"),
    ('fd.kind == "memfd"', 'frame.comment contains "memfd"'),
    ('fd.kind == "eventfd"', 'frame.comment contains "eventfd"'),
])
def test_tshark_filters_select_the_same_messages(tmp_path, ours, theirs):
    capture = SAMPLES[1]
    pcap = export(capture, tmp_path / "out.pcapng")
    mine = run_vfu("read", str(capture), "-Y", ours, "-T", "fields", "-e", "frame.number")
    assert mine.returncode == 0, mine.stderr
    other = tshark(pcap, "-2", "-Y", theirs, "-T", "fields", "-e", "frame.number")
    assert mine.stdout.split() == other.split()
    assert mine.stdout.split()


def mutations(records: list) -> list:
    """Each message cut short, cut inside its header's reach, and with trailing bytes."""
    out = []
    for r in records:
        if not isinstance(r, Message):
            continue
        variants = [r.data + b"\xee" * 4]
        if len(r.data) > HEADER_SIZE + 4:
            variants += [r.data[:-1], r.data[:HEADER_SIZE + 4]]
        for data in variants:
            # keep msg_size honest so that the payload checks, not the size check, fire
            data = data[:4] + struct.pack("<I", len(data)) + data[8:]
            out.append(Message(r.ts_ns, r.conn, r.channel, r.direction, data, r.fds))
    return out


def extreme_messages() -> list[Message]:
    """64-bit fields at and past 2^63, which Lua 5.2's doubles and 5.4's
    integers handle differently from Python's ints."""
    top, half = 2**64 - 1, 2**63

    def msg(number: int, direction: int, msg_id: int, cmd: int, flags: int, payload: bytes):
        data = struct.pack("<HHIII", msg_id, cmd, 16 + len(payload), flags, 0) + payload
        return Message(number * 1000, 0, 0, direction, data, [])
    return [
        msg(1, 0, 1, 2, 0, struct.pack("<IIQQQ", 32, 3, half + 5, top - 4095, half + 4096)),
        msg(2, 1, 1, 2, 1, b""),
        msg(3, 0, 2, 3, 0, struct.pack("<IIQQQQ", 24, 1, top - 4095, top, half, top) + b"\xff" * 8),
        msg(4, 1, 3, 11, 0, struct.pack("<QQ", top - 7, top)),
        msg(5, 0, 3, 11, 1, struct.pack("<QQ", top - 7, top) + b"\x01" * 4),
        msg(6, 0, 4, 15, 0, struct.pack("<Q", top)),
        msg(7, 0, 5, 16, 0, struct.pack("<IIQQQ", 32, (1 << 17) | 8, top, top, half) + b"\0" * 8),
        msg(8, 0, 6, 9, 0, struct.pack("<QII", top, 7, 4)),
    ]


def interleaved_messages() -> list[Message]:
    """Two clients at once, reusing the same msg_ids: replies must be paired
    within their own connection."""
    first = [r for r in read_all(SAMPLES[0])[0] if isinstance(r, Message) and r.conn == 0]
    second = [Message(m.ts_ns, 7, m.channel, m.direction, m.data, m.fds) for m in first]
    return [m for pair in zip(first, second) for m in pair]


def linux_region_info_messages() -> list[Message]:
    """A REGION_INFO reply cut to the client's 32 bytes with CAPS kept (cap_offset 0),
    as Linux VFIO answers and QEMU refuses."""
    request = struct.pack("<HHIIIIIIIQQ", 1, 5, 48, 0, 0, 32, 0, 2, 0, 0, 0)
    reply = struct.pack("<HHIIIIIIIQQ", 1, 5, 48, 1, 0, 80, 0xF, 2, 0, 0x4000, 0)
    return [Message(1000, 0, 0, 0, request, []), Message(2000, 0, 0, 1, reply, [])]


def scenario_messages() -> list[Message]:
    """Every expert check's scenario, with its fault and fixed, one connection
    each: the plugin must raise each structural check exactly where read does."""
    from test_expert import SCENARIOS, Script
    out = []
    # dissector.bug needs a broken dissector; fault.injected is a record of the
    # proxy's, not a packet
    tool_only = {"dissector.bug", "fault.injected"}
    for conn, (expert_id, bad) in enumerate((e, bad) for e in sorted(SCENARIOS)
                                             if e not in tool_only for bad in (True, False)):
        s = Script()
        SCENARIOS[expert_id](s, bad)
        out += [Message(m.ts_ns + conn * 10**9, conn, m.channel, m.direction, m.data, m.fds,
                        m.size) for m in s.messages]
    return out


MADE = {"mutated": lambda: mutations(read_all(SAMPLES[0])[0]),
        "extreme": extreme_messages, "interleaved": interleaved_messages,
        "linux_region_info": linux_region_info_messages, "scenarios": scenario_messages}


def made_capture(name: str | Path, tmp_path: Path) -> Path:
    """A sample capture, or one made here (MADE)."""
    if isinstance(name, Path):
        return name
    messages = MADE[name]()
    capture = tmp_path / f"{name}.vfucap"
    with CaptureWriter(capture) as writer:
        for m in messages:
            writer.write(m)
    return capture


@pytest.mark.parametrize("run", [
    pytest.param(tshark, marks=needs_tshark, id="tshark"),
    pytest.param(tshark_in_other_root, id="other-root", marks=pytest.mark.skipif(
        OTHER_ROOT is None, reason="VFU_INSPECT_TSHARK_ROOT names no other Wireshark"))])
@pytest.mark.parametrize("capture", [*SAMPLES, *MADE], ids=lambda p: getattr(p, "stem", p))
def test_tshark_with_the_plugin_gives_the_same_fields_as_read(tmp_path, capture, run):
    capture = made_capture(capture, tmp_path)
    ours = read_json(capture)
    theirs = tshark_packets(export(capture, tmp_path / "out.pcapng"), run)
    assert len(theirs) == len(ours)
    compared = 0
    for mine, other in zip(ours, theirs):
        expected = leaves(mine["layers"].items(), {})
        assert leaves(other, {}) == expected, f"frame {mine['frame']}"
        compared += sum(map(len, expected.values()))
    assert compared > 10 * len(ours)      # payloads too: a header alone has 9 or 10


@needs_tshark
@pytest.mark.parametrize("capture", [*SAMPLES, "scenarios"], ids=lambda p: getattr(p, "stem", p))
def test_a_declared_summary_reads_alike_in_tshark_and_read(tmp_path, capture):
    """A payload's `info` template is rendered by Python and by the plugin:
    both Info columns start with it (code may add to either)."""
    capture = made_capture(capture, tmp_path)
    infos = tshark(export(capture, tmp_path / "out.pcapng"), "-2",
                   "-o", 'gui.column.format:"Info","%i"').splitlines()
    messages = [r for r in read_all(capture)[0] if isinstance(r, Message)]
    checked = 0
    for p, info in zip(Analyzer(find_responses(messages)).run(messages), infos, strict=True):
        h = p.header
        payload = h and not h.is_error and proto.PAYLOADS.get((h.cmd, REPLY if h.is_reply
                                                               else REQUEST))
        values = payload and payload.info and p.tree.prefixed(payload.layer.vfu_field.name)
        if not values or len(values) < len(payload.layer.vfu_compiled.names):
            continue
        summary = render_info(payload, values)
        assert p.tree.info.startswith(summary), p.number
        assert info.startswith(f"{h.command_name} {h.kind} {summary}"), (p.number, info)
        checked += 1
    assert checked > 20


@needs_tshark
def test_malformed_variants_raise_the_same_expert_items(tmp_path):
    capture = made_capture("mutated", tmp_path)
    ours = read_json(capture)
    theirs = tshark_packets(export(capture, tmp_path / "mutated.pcapng"))
    flagged = 0
    for mine, other in zip(ours, theirs, strict=True):
        expected = sorted(e["id"] for e in mine.get("expert", [])
                          if e["id"] not in LEFT_TO_VFU_INSPECT)
        assert lua_experts(other) == expected, f"frame {mine['frame']}"
        flagged += bool(expected)
    assert flagged > len(ours) // 2


@needs_tshark
def test_plugin_flags_the_region_info_qemu_refuses(tmp_path):
    capture = made_capture("linux_region_info", tmp_path)
    reply = tshark_packets(export(capture, tmp_path / "linux.pcapng"))[1]
    assert lua_experts(reply) == ["argsz.truncated", "interop.region_caps_offset"]


# The plugin's one text item: the node of the expert items it takes from the
# packet comment (vfu-inspect's analysis) rather than finds itself.
ANALYSIS_NODE = "_ws.lua.text"


def lua_experts(layers: list, from_comment: bool = False) -> list[str]:
    """The expert ids the plugin raised in a packet itself, or (`from_comment`)
    those it took from the packet comment."""
    found: list[str] = []

    def walk(pairs, in_analysis: bool):
        for key, value in pairs:
            if key.startswith("vfio_user.expert.") and in_analysis == from_comment:
                found.append(key.removeprefix("vfio_user.expert."))
            if isinstance(value, list):
                walk(value if value and isinstance(value[0], tuple) else [],
                     in_analysis or key == ANALYSIS_NODE)
    walk(layers, False)
    return sorted(found)


@needs_tshark
@pytest.mark.parametrize("capture", [*SAMPLES, "scenarios"], ids=lambda p: getattr(p, "stem", p))
def test_wireshark_shows_every_expert_item_read_finds(tmp_path, capture):
    """What the plugin does not check itself (the session's checks, the fds')
    it takes from the comment `export` writes: every item of read's, once."""
    capture = made_capture(capture, tmp_path)
    ours = read_json(capture)
    theirs = tshark_packets(export(capture, tmp_path / "out.pcapng"))
    from_comment = 0
    for mine, other in zip(ours, theirs, strict=True):
        own, taken = lua_experts(other), lua_experts(other, from_comment=True)
        assert not set(own) & set(taken), f"frame {mine['frame']}"
        assert set(own) | set(taken) == {e["id"] for e in mine.get("expert", [])}, \
            f"frame {mine['frame']}"
        from_comment += len(taken)
    assert from_comment or capture in SAMPLES


@pytest.mark.parametrize("capture", SAMPLES, ids=lambda p: p.stem)
def test_export_then_import_gives_back_every_record(tmp_path, capture):
    pcap = export(capture, tmp_path / "out.pcapng")
    result = run_vfu("import", str(pcap), "-o", str(tmp_path / "back.vfucap"))
    assert result.returncode == 0, result.stderr
    original, _ = read_all(capture)
    back, damage = read_all(tmp_path / "back.vfucap")
    assert damage is None
    assert back == original     # bytes, fd records, timestamps, channels, events


def test_scapy_reads_the_export_as_wireshark_would(tmp_path):
    """An independent pcapng reader sees the interfaces, directions, times and comments."""
    records = [r for r in read_all(SAMPLES[1])[0] if isinstance(r, Message)]
    pcap = export(SAMPLES[1], tmp_path / "out.pcapng")
    seen = []
    with RawPcapNgReader(str(pcap)) as reader:
        for data, meta in reader:
            seen.append((data, meta))
    assert len(seen) == len(records)
    for (data, meta), msg in zip(seen, records):
        assert data == pcapng.pdu_header(msg.conn, msg.channel) + msg.data
        assert meta.linktype == pcapng.LINKTYPE_WIRESHARK_UPPER_PDU
        assert meta.direction == (1 if msg.direction == C2S else 2)
        assert (meta.tshigh << 32 | meta.tslow) == msg.ts_ns and meta.tsresol == 10**9
        assert meta.ifname == pcapng.interface_name(msg.conn, msg.channel).encode()
        kinds = [fd["kind"] for fd in msg.fds]
        comment = b"\n".join(meta.comments or []).decode()
        assert [line.split()[2] for line in comment.splitlines()
                if line.startswith("fd ")] == kinds


def test_truncated_pcapng_imports_what_came_before_the_cut(tmp_path):
    pcap = export(SAMPLES[0], tmp_path / "out.pcapng")
    data = pcap.read_bytes()
    cut = tmp_path / "cut.pcapng"
    cut.write_bytes(data[:len(data) // 2])
    records, problems = pcapng.read_pcapng(cut)
    original, _ = read_all(SAMPLES[0])
    assert 0 < len(records) < len(original) and records == original[:len(records)]
    assert problems and "ends inside a block" in problems[0]
    result = run_vfu("import", str(cut), "-o", str(tmp_path / "back.vfucap"))
    assert result.returncode == 0 and "ends inside a block" in result.stderr


def test_pcapng_of_another_link_type_is_refused_with_one_line(tmp_path):
    pcap = tmp_path / "ethernet.pcapng"
    writer = pcapng.PcapngWriter(pcap.open("wb"))
    writer._file.write(pcapng._block(pcapng.IDB, struct.pack("<HHI", 1, 0, 0)))
    body = struct.pack("<IIIII", 0, 0, 0, 4, 4) + b"abcd"
    writer._file.write(pcapng._block(pcapng.EPB, body))
    writer._file.close()
    result = run_vfu("import", str(pcap), "-o", str(tmp_path / "x.vfucap"))
    assert result.returncode == 2
    assert "not an exported vfio_user PDU" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["export", "/nonexistent.vfucap", "-o", "x.pcapng"], "cannot open"),
    (["export", str(SAMPLES[0]), "-o", str(SAMPLES[0])], "is also the input"),
    (["import", str(SAMPLES[0]), "-o", str(SAMPLES[0])], "is also the input"),
    (["export", str(SAMPLES[0]), "-o", "/nonexistent/dir/x.pcapng"], "cannot write"),
    (["wireshark-plugin", "--install", "/proc/none"], "vfu-inspect: error"),
])
def test_bad_paths_exit_2_with_one_line(args, message):
    result = run_vfu(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_read_of_a_pcapng_says_to_import_it(tmp_path):
    pcap = export(SAMPLES[0], tmp_path / "out.pcapng")
    result = run_vfu("read", str(pcap))
    assert result.returncode == 2 and "vfu-inspect import" in result.stderr


def test_install_copies_the_plugin(tmp_path):
    result = run_vfu("wireshark-plugin", "--install", str(tmp_path / "plugins"))
    assert result.returncode == 0, result.stderr
    installed = tmp_path / "plugins" / "vfio_user.lua"
    assert installed.read_text() == wireshark.PLUGIN.read_text()
    assert result.stdout.strip() == str(installed)


def test_proxy_writes_pcapng_by_extension(tmp_path):
    server_sock, server_record = tmp_path / "server.sock", tmp_path / "server.vfucap"
    server = vfu("sample-server", "--listen", str(server_sock), "--record", str(server_record))
    wait_for_socket(server_sock, server)
    listen, capture = tmp_path / "proxy.sock", tmp_path / "proxy.pcapng"
    proxy = vfu("proxy", "--listen", str(listen), "--server", str(server_sock), "-w", str(capture))
    wait_for_socket(listen, proxy)
    client_record = tmp_path / "client.vfucap"
    result = run_vfu("sample-client", "--server", str(listen), "--record", str(client_record))
    assert result.returncode == 0, result.stderr
    assert stop(proxy) == 0 and stop(server) == 0
    records, problems = pcapng.read_pcapng(capture)
    assert problems == []
    captured = [r for r in records if isinstance(r, Message)]
    sent = [m for m in read_all(client_record)[0] if isinstance(m, Message) and m.direction == 0]
    sent += [m for m in read_all(server_record)[0] if isinstance(m, Message) and m.direction == 1]
    assert streams(captured) == streams(sent)
    assert len(records) > len(captured)          # connection events came along


def test_a_burst_goes_into_pcapng_as_its_messages(tmp_path):
    first, second = bytes(range(16)), bytes(range(16, 48))
    path = tmp_path / "burst.pcapng"
    writer = pcapng.PcapngFileWriter(path)
    writer.write(Burst(1_000, 0, MAIN, S2C, first + second, [16, 32]))
    writer.close()
    records, problems = pcapng.read_pcapng(path)
    assert problems == []
    assert records == [Message(1_000, 0, MAIN, S2C, first), Message(1_000, 0, MAIN, S2C, second)]


HARNESS = Path(__file__).resolve().parent / "lua_harness.lua"


def as_text(name: str, value) -> str:
    """A value as the Lua harness prints it."""
    kind = COMPARED[name].type
    if kind == fields.BOOL:
        return "1" if value else "0"
    if kind == fields.STRING:
        return value.encode().hex()
    if kind == fields.FLOAT:
        return f"{value:.9f}"
    return str(value)


@pytest.mark.parametrize("lua", ["lua5.2", "lua5.4"])
@pytest.mark.parametrize("capture", [*SAMPLES, *MADE], ids=lambda p: getattr(p, "stem", p))
def test_plugin_runs_the_same_on_lua_5_2_and_5_4(tmp_path, lua, capture):
    """Wireshark 4.0 embeds Lua 5.2, 4.4+ embed 5.4: the plugin's own code is
    run on both interpreters (with a stand-in for Wireshark's API) and must
    decode every message, and flag every malformed one, as vfu-inspect does."""
    if shutil.which(lua) is None:
        pytest.skip(f"{lua} is not installed (.ci/run installs it)")
    capture = made_capture(capture, tmp_path)
    msgs = [r for r in read_all(capture)[0] if isinstance(r, Message)]
    interfaces: dict[tuple[int, int], int] = {}
    lines = [f"{interfaces.setdefault((m.conn, m.channel), len(interfaces))} "
             f"{int(m.direction == C2S)} {(m.ts_ns - msgs[0].ts_ns) / 1e9:.9f} {m.wire_size} "
             f"{m.data.hex()}"
             for m in msgs]
    (tmp_path / "messages").write_text("\n".join(lines) + "\n")
    result = subprocess.run([lua, str(HARNESS), str(wireshark.PLUGIN), str(tmp_path / "messages")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    decoded: dict[int, dict[str, list[str]]] = {}
    for line in result.stdout.splitlines():
        number, name, value = line.split("\t")
        if name in COMPARED and COMPARED[name].type == fields.STRING:
            # Wireshark shows invalid UTF-8 as U+FFFD, as vfu-inspect does
            value = bytes.fromhex(value).decode("utf-8", "replace").encode().hex()
        if name in COMPARED or name == "expert":
            decoded.setdefault(int(number), {}).setdefault(name, []).append(value)
    for mine in read_json(capture):
        expected = {name: [as_text(name, v) for v in values]
                    for name, values in leaves(mine["layers"].items(), {}).items()}
        experts = sorted(e["id"] for e in mine.get("expert", [])
                         if e["id"] not in LEFT_TO_VFU_INSPECT)
        if experts:
            expected["expert"] = experts
        got = decoded.get(mine["frame"], {})
        got["expert"] = sorted(got.get("expert", [])) or None
        expected.setdefault("expert", None)
        assert got == expected, f"frame {mine['frame']}"


@needs_tshark
def test_a_message_over_wiresharks_packet_limit_is_cut_for_it_and_whole_on_import(tmp_path):
    size = 1 << 20
    request = struct.pack("<HHIIIII", 1, 17, 24, 0, 0, 8, size)
    reply = struct.pack("<HHIIIII", 1, 17, 24 + size, 1, 0, 8 + size, size) + b"\xab" * size
    capture = tmp_path / "big.vfucap"
    with CaptureWriter(capture) as writer:
        writer.write(Message(1000, 0, 0, 0, request, []))
        writer.write(Message(2000, 0, 0, 1, reply, []))
    pcap = export(capture, tmp_path / "big.pcapng")
    shown = tshark(pcap, "-T", "fields", "-e", "frame.len", "-e", "frame.cap_len",
                   "-e", "mig_data_read.size").splitlines()
    wire, captured, decoded = shown[1].split("\t")
    assert int(wire) == pcapng.PDU_HEADER_SIZE + len(reply)
    assert int(captured) == pcapng.PACKET_LIMIT and int(decoded) == size
    # one item, the cut: what is missing is not flagged as malformed
    assert lua_experts(tshark_packets(pcap)[1]) == ["capture.truncated"]
    assert pcapng.read_pcapng(pcap) == (read_all(capture)[0], [])


def test_damaged_pcapng_files_never_raise_anything_but_a_clear_error(tmp_path):
    import random
    from vfu_inspect.errors import CaptureError
    data = export(SAMPLES[1], tmp_path / "out.pcapng").read_bytes()
    rng = random.Random(8)
    outcomes = {"read": 0, "refused": 0}
    for i in range(300):
        damaged = bytearray(data[:rng.randrange(len(data))] if i % 3 == 0 else data)
        for _ in range(rng.randrange(1, 20)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        path = tmp_path / "damaged.pcapng"
        path.write_bytes(bytes(damaged))
        try:
            records, _ = pcapng.read_pcapng(path)
            assert all(isinstance(r.fds, list) for r in records if isinstance(r, Message))
            outcomes["read"] += 1
        except CaptureError:
            outcomes["refused"] += 1
    assert outcomes["read"] > 100          # most damage loses a block, not the file
    result = run_vfu("import", str(path), "-o", str(tmp_path / "x.vfucap"))
    assert result.returncode in (0, 2) and "Traceback" not in result.stderr


@needs_tshark
def test_records_bigger_than_a_pcapng_option_survive(tmp_path):
    """An option's length is 16 bits: a close event listing 5000 unanswered
    requests, 253 fds and a 80 KB comment are split or cut, never corrupt."""
    from vfu_inspect.records import CLOSE, Event
    event = Event(CLOSE, 5, 0, {"by": "client", "unanswered": [
        {"cmd": "DMA_MAP", "msg_id": i} for i in range(5000)]})
    msg = Message(1, 0, 0, 0, struct.pack("<HHIII", 1, 13, 16, 0, 0),
                  [{"kind": "memfd", "size": 4096, "inode": i} for i in range(253)])
    pcap = tmp_path / "big.pcapng"
    with pcapng.PcapngFileWriter(pcap, "x" * 70000) as writer:
        writer.write(msg, "é" * 40000)
        writer.write(event)
    assert pcapng.read_pcapng(pcap) == ([msg, event], [])
    comment = tshark(pcap, "-T", "fields", "-e", "frame.comment").strip()
    assert 0 < len(comment.encode()) <= 0xFFFF and set(comment) == {"é"}


@needs_tshark
@needs_libvfio_user
def test_libvfio_user_session_recorded_as_pcapng_reads_the_same_in_tshark(tmp_path):
    """libvfio-user's samples/client and samples/server through `proxy -w
    X.pcapng`: the file imports, and tshark decodes it as vfu-inspect does."""
    pcap = tmp_path / "lvu.pcapng"
    libvfio_user_samples_through_proxy(tmp_path, pcap)
    capture = tmp_path / "lvu.vfucap"
    assert run_vfu("import", str(pcap), "-o", str(capture)).returncode == 0
    ours, theirs = read_json(capture), tshark_packets(pcap)
    assert len(ours) == len(theirs) > 100
    for mine, other in zip(ours, theirs):
        assert leaves(other, {}) == leaves(mine["layers"].items(), {}), f"frame {mine['frame']}"
