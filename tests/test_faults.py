"""proxy --fault: each action against real peers, the record it leaves, its triggers."""

from __future__ import annotations

import os
import shutil
import random
import subprocess
import time
from pathlib import Path

import pytest

from helpers import (TESTS, libvfio_user_client, libvfio_user_server_through_proxy,
                     needs_libvfio_user, run_vfu, sample_session)
from vfu_inspect.capture import read_all
from vfu_inspect.dissect import Analyzer
from vfu_inspect.dissectors.vfio_user import CMD, DmaMap, Header, RegionRead, parse_header
from vfu_inspect.endpoints.common import parse_caps
from vfu_inspect.faults import FaultInjector, Gate, Verdict, load_rules
from vfu_inspect.records import CLOSE, FAULT, C2S, S2C, Event, Message

GET_INFO = "vfio_user.cmd == DEVICE_GET_INFO"


def records(path: Path) -> list:
    found, damage = read_all(path)
    assert damage is None
    return found


def messages(path: Path, cmd: str | None = None, direction: int | None = None) -> list[Message]:
    return [r for r in records(path) if isinstance(r, Message)
            and (cmd is None or parse_header(r.data).cmd == CMD[cmd])
            and (direction is None or r.direction == direction)]


def faults(path: Path) -> list[dict]:
    return [r.info for r in records(path) if isinstance(r, Event) and r.kind == FAULT]


def expert_ids(path: Path) -> list[tuple[int, str]]:
    return [(p.number, e.id) for p in Analyzer().run(records(path)) for e in p.tree.experts
            if e.id == "fault.injected"]


def faulted(tmp_path: Path, rule: str, *client_args: str):
    return sample_session(tmp_path, ["--fault", rule], list(client_args))


# --- each action against the sample endpoints ---------------------------------------

def test_errno_answers_in_place_of_the_server(tmp_path):
    rule = "region_read.region == BAR0 && region_read.offset == 0 && frame.dir == c2s: errno EIO"
    result, capture, server, client = faulted(tmp_path, rule)
    assert result.returncode == 1
    assert "REGION_READ: expected success, got EIO" in result.stderr
    [info] = faults(capture)
    assert (info["action"], info["errno"], info["cmd"], info["dir"]) == ("errno", 5, "REGION_READ",
                                                                        "c2s")
    msg_id = info["msg_id"]
    reads = [m for m in messages(capture, "REGION_READ") if parse_header(m.data).msg_id == msg_id]
    assert [parse_header(m.data).kind for m in reads] == ["command", "error"]
    assert parse_header(reads[1].data).error == 5
    # the server never saw it; the client got the proxy's error reply
    assert not [m for m in messages(server, "REGION_READ") if m.data[16:28] == bytes(12)]
    assert parse_header(messages(client, "REGION_READ")[-1].data).error == 5
    assert expert_ids(capture) == [(messages(capture).index(reads[0]) + 1, "fault.injected")]


def test_delay_holds_the_reply_back(tmp_path):
    result, capture, _, client = faulted(tmp_path, f"{GET_INFO} && frame.dir == s2c: delay 400ms")
    assert result.returncode == 0, result.stderr
    request, reply = messages(client, "DEVICE_GET_INFO")
    assert (reply.ts_ns - request.ts_ns) / 1e9 >= 0.4      # as the client saw it
    [info] = faults(capture)
    assert (info["action"], info["delay"]) == ("delay", 0.4)


def test_drop_makes_the_client_time_out(tmp_path):
    result, capture, server, client = faulted(tmp_path, f"{GET_INFO} && frame.dir == s2c: drop",
                                              "--timeout", "1")
    assert result.returncode == 1
    assert "DEVICE_GET_INFO: no reply within 1 s" in result.stderr
    assert len(messages(server, "DEVICE_GET_INFO")) == 2         # the server did answer
    assert len(messages(client, "DEVICE_GET_INFO")) == 1         # the client never got it
    assert faults(capture)[0]["effect"] == \
        "DEVICE_GET_INFO reply dropped: the client never got it"


def test_close_before_the_request_reaches_the_server(tmp_path):
    result, capture, server, _ = faulted(tmp_path, f"{GET_INFO} && frame.dir == c2s: close before")
    assert result.returncode == 1 and "peer closed the connection" in result.stderr
    assert messages(server, "DEVICE_GET_INFO") == []
    [close] = [r for r in records(capture) if isinstance(r, Event) and r.kind == CLOSE]
    assert close.info["by"] == "proxy"
    assert close.info["reason"].startswith("fault: connection closed before DEVICE_GET_INFO")


def test_close_after_the_reply_reaches_the_client(tmp_path):
    result, capture, _, client = faulted(tmp_path, f"{GET_INFO} && frame.dir == s2c: close after")
    assert result.returncode == 1 and "connection to" in result.stderr
    assert len(messages(client, "DEVICE_GET_INFO")) == 2          # it got the reply, then EOF
    assert faults(capture)[0]["when"] == "after"


def test_rewrite_of_max_data_xfer_size_makes_the_client_chunk(tmp_path):
    rule = "vfio_user.cmd == VERSION && frame.dir == s2c: rewrite version.max_data_xfer_size=1024"
    result, capture, server, client = faulted(tmp_path, rule)
    assert result.returncode == 0, result.stderr
    told = [parse_caps(m.data[16:])["max_data_xfer_size"]
            for m in messages(client, "VERSION", S2C)]
    sent = [parse_caps(m.data[16:])["max_data_xfer_size"]
            for m in messages(server, "VERSION", S2C)]
    assert told == [1024, 1024] and sent == [1 << 20, 1 << 20]   # both connections
    recorded = messages(capture, "VERSION", S2C)[0]              # as delivered
    assert parse_caps(recorded.data[16:])["max_data_xfer_size"] == 1024
    assert int.from_bytes(recorded.data[4:8], "little") == len(recorded.data)
    sizes = {int.from_bytes(m.data[20:24], "little")
             for m in messages(capture, "MIG_DATA_READ", C2S)}
    assert sizes == {1024}
    assert [(i["from"], i["to"]) for i in faults(capture)] == [(1 << 20, 1024)] * 2


def test_truncate_cuts_the_reply_and_its_msg_size(tmp_path):
    result, capture, _, _ = faulted(tmp_path, f"{GET_INFO} && frame.dir == s2c: truncate 24")
    assert result.returncode == 1 and "shorter than its layout" in result.stderr
    [reply] = messages(capture, "DEVICE_GET_INFO", S2C)
    assert len(reply.data) == 24 and int.from_bytes(reply.data[4:8], "little") == 24
    assert faults(capture)[0]["from_size"] == 32


def test_duplicate_makes_the_server_answer_twice(tmp_path):
    result, capture, server, _ = faulted(tmp_path, f"{GET_INFO} && frame.dir == c2s: duplicate")
    assert result.returncode == 1 and "reply does not match the request" in result.stderr
    assert len(messages(server, "DEVICE_GET_INFO", C2S)) == 2
    assert len(messages(capture, "DEVICE_GET_INFO", C2S)) == 2


def test_triggers_nth_every_and_seeded_probability(tmp_path):
    reads = "vfio_user.cmd == REGION_READ && frame.dir == s2c"
    result, capture, _, _ = sample_session(tmp_path, [
        "--fault", f"{reads}: delay 1ms nth=5", "--fault", f"{reads}: delay 1ms every=4",
        "--fault", f"{reads}: delay 1ms p=0.5 seed=7"])
    assert result.returncode == 0, result.stderr
    by_rule = {}
    for info in faults(capture):
        by_rule.setdefault(info["number"], []).append(info["match"])
    replies = len(messages(capture, "REGION_READ", S2C))
    assert by_rule[1] == [5]
    # rule 2 sees every reply but the 5th (rule 1 took it); rule 3 what both left
    assert by_rule[2] == list(range(4, replies, 4))
    left = replies - 1 - len(by_rule[2])
    rng = random.Random(7)
    assert by_rule[3] == [n for n in range(1, left + 1) if rng.random() < 0.5]


@pytest.mark.parametrize("spec, message", [
    ("vfio_user.cmd == REGION_READ", "expected 'FILTER: ACTION'"),
    ("vfio_user.cmd == READ: drop", "invalid filter"),
    ("frame.number == 3: drop", "not frame.number"),
    ("vfio_user: errno ENOTANERRNO", "errno 'ENOTANERRNO'"),
    ("vfio_user: delay 2h", "delay '2h'"),
    ("vfio_user: delay -1s", "delay '-1s'"),
    ("vfio_user: truncate 8", "truncate keeps 16"),
    ("vfio_user: drop nth=0", "nth=0"),
    ("vfio_user: drop nth=2 every=3", "one trigger"),
    ("vfio_user: drop p=1.5", "p=1.5"),
    ("vfio_user: rewrite dma_map.size=0x1ffffffffffffffff", "does not fit"),
    ("vfio_user: rewrite version.json=x", "not a field the proxy can rewrite"),
    ("vfio_user: close soon", "close before|after"),
])
def test_bad_fault_specs_are_one_line_errors(tmp_path, spec, message):
    result = run_vfu("proxy", "--listen", str(tmp_path / "p.sock"), "--server",
                     str(tmp_path / "absent.sock"), "--fault", spec)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_fault_file(tmp_path):
    rules = tmp_path / "faults"
    rules.write_text(f"# a slow request, then no reply\n\n{GET_INFO} && frame.dir == c2s: "
                     f"delay 10ms\n{GET_INFO}: drop\n")
    result, capture, _, _ = sample_session(tmp_path, ["--fault-file", str(rules)],
                                           ["--timeout", "1"])
    assert result.returncode == 1
    assert [(i["number"], i["action"]) for i in faults(capture)] == [(1, "delay"), (2, "drop")]
    bad = run_vfu("proxy", "--listen", str(tmp_path / "p.sock"), "--server", "x",
                  "--fault-file", str(tmp_path / "absent"))
    assert bad.returncode == 2 and "cannot read fault file" in bad.stderr


# --- the gate, on real bytes and fds -----------------------------------------------------

def stream_of(n: int) -> list[bytes]:
    return [bytes(Header(msg_id=i, cmd=CMD["DMA_MAP"] if i % 3 == 0 else CMD["REGION_READ"])
                  / (DmaMap(address=i << 12, size=0x1000) if i % 3 == 0
                     else RegionRead(region=i % 4, count=4))) for i in range(n)]


@pytest.mark.parametrize("seed", range(20))
def test_gate_passes_every_byte_and_fd_however_the_stream_is_cut(seed):
    """Whatever the reads, the bytes that pass are those of the messages no
    fault took, each fd with the first byte of its own message."""
    rng = random.Random(seed)
    msgs = stream_of(40)
    gate = Gate(FaultInjector(load_rules(["dma_map.address == 0x3000: drop",
                                          "region_read.region == 2: errno EIO"])), 0, 0, C2S)
    stream, starts = b"".join(msgs), []
    for m in msgs:
        starts.append(sum(map(len, msgs[:len(starts)])))
    with_fd = {i for i in range(len(msgs)) if i % 5 == 0}
    eventfds = {starts[i]: os.eventfd(0) for i in with_fd}
    out, pos = [], 0
    while pos < len(stream):
        end = min(len(stream), pos + rng.randint(1, 90))
        owner_starts = [s for s in starts if pos <= s < end and s in eventfds]
        owner = owner_starts[-1] if owner_starts else None     # one sendmsg's fds per read
        if owner is not None and len(owner_starts) > 1:
            end = owner_starts[1]
            owner = owner_starts[0]
        fds = [eventfds[owner]] if owner is not None else []
        chunk, at_owner = memoryview(stream)[pos:end], owner - pos if fds else 0
        if gate.all_pass(chunk, len(fds), at_owner):        # as the proxy does
            out += [(chunk[:at_owner], []), (chunk[at_owner:], fds)]
        else:
            out += gate.feed(chunk, fds, at_owner)
        pos = end
    passed, at = b"", {}
    for piece in out:
        if isinstance(piece, tuple):
            for fd in piece[1]:
                at[len(passed)] = fd
            passed += bytes(piece[0])
    kept = [i for i, m in enumerate(msgs) if m[32:40] != (0x3000).to_bytes(8, "little")
            and not (i % 3 and i % 4 == 2)]
    assert passed == b"".join(msgs[i] for i in kept)
    offsets = [sum(len(msgs[j]) for j in kept[:n]) for n in range(len(kept))]
    assert at == {offsets[n]: eventfds[starts[i]] for n, i in enumerate(kept) if i in with_fd}
    verdicts = [p for p in out if isinstance(p, Verdict)]
    assert [v.fault.action.name for v in verdicts].count("drop") == 1
    for fd in eventfds.values():
        os.close(fd)


def test_header_prefilter_never_misses_a_match():
    """A rule the header rules out must not match the whole message either."""
    rules = load_rules([
        "region_read.region == CONFIG && frame.dir == c2s: drop",
        "!(vfio_user.cmd == DMA_MAP) && dma_map.size > 0: drop",
        "vfio_user.flags.type == reply && version.max_msg_fds: drop",
        "fd.kind == \"eventfd\" || vfio_user.error == EINVAL: drop",
        "!region_read && vfio_user.msg_id > 3 || set_irqs.count == 4: drop",
        "vfio_user.payload || frame.len > 100: drop"])
    injector = FaultInjector(rules)
    checked = 0
    for capture in ("libvfio-user-samples.vfucap", "sample-endpoints.vfucap"):
        for p in Analyzer().run(records(TESTS.parent / "captures" / capture)):
            h, msg = p.header, p.msg
            candidates = injector.candidates(msg.channel, msg.direction, h.cmd, h.flags, h.error,
                                             len(msg.fds))
            values = p.tree.values()
            for rule in rules:
                if rule.filter.matches(values):
                    assert rule in candidates, (rule.text, p.number)
                    checked += 1
    assert checked > 100
    # and it does rule out: a REGION_READ request is no candidate for the first rule
    assert rules[0] not in injector.candidates(0, C2S, CMD["DMA_MAP"], 0, 0, 0)


# --- against libvfio-user's samples ------------------------------------------------------

def lvu_session(tmp_path: Path, rule: str, timeout: float = 120):
    """libvfio-user's client through proxy --fault RULE to its server: (client
    result, or None when it was still running at `timeout`; proxy capture)."""
    capture = tmp_path / "c.vfucap"
    with libvfio_user_server_through_proxy(tmp_path, capture, "--fault", rule) as listen:
        try:
            result = libvfio_user_client(listen, timeout)
        except subprocess.TimeoutExpired:
            result = None
    return result, capture


@needs_libvfio_user
def test_libvfio_user_client_fails_on_an_eio_config_read(tmp_path):
    result, capture = lvu_session(tmp_path, "region_read.region == CONFIG && frame.dir == c2s: "
                                            "errno EIO")
    assert result.returncode == 1
    assert "failed to read PCI configuration space: Input/output error" in result.stderr
    assert [i["action"] for i in faults(capture)] == ["errno"]


@needs_libvfio_user
def test_libvfio_user_client_waits_out_a_delay(tmp_path):
    start = time.monotonic()
    result, capture = lvu_session(tmp_path, f"{GET_INFO} && frame.dir == s2c: delay 500ms")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - start > 0.5
    assert faults(capture)[0]["delay"] == 0.5


@needs_libvfio_user
def test_libvfio_user_client_has_no_timeout_for_a_dropped_reply(tmp_path):
    result, capture = lvu_session(tmp_path, f"{GET_INFO} && frame.dir == s2c: drop", timeout=3)
    assert result is None                          # still waiting after 3 s
    assert faults(capture)[0]["action"] == "drop"


@needs_libvfio_user
@pytest.mark.parametrize("rule, complaint", [
    (f"{GET_INFO} && frame.dir == c2s: close before", "failed to get device info"),
    (f"{GET_INFO} && frame.dir == s2c: truncate 24", "failed to get device info"),
    (f"{GET_INFO} && frame.dir == s2c: duplicate", "failed to get device region info: "
                                                   "Protocol error"),
    ("vfio_user.cmd == DEVICE_GET_REGION_INFO && frame.dir == s2c: close after",
     "failed to get device region info"),
])
def test_libvfio_user_client_fails_cleanly(tmp_path, rule, complaint):
    result, capture = lvu_session(tmp_path, rule)
    assert result.returncode == 1 and complaint in result.stderr
    assert faults(capture)[0]["rule"] == rule


@needs_libvfio_user
def test_libvfio_user_client_asserts_its_migration_iterations(tmp_path):
    """A server max_data_xfer_size of 512 makes the client cut its 16 KiB of
    migration data in 32 pieces, and it asserts there are 16."""
    result, capture = lvu_session(tmp_path, "vfio_user.cmd == VERSION && frame.dir == s2c: "
                                            "rewrite version.max_data_xfer_size=512")
    assert result.returncode < 0 and "nr_iters == 16" in result.stderr      # SIGABRT
    assert faults(capture)[0]["to"] == 512


@needs_libvfio_user
def test_libvfio_user_client_mishandles_a_server_that_chunks_its_dma(tmp_path):
    """Told the client takes 512 bytes, the server cuts each DMA_WRITE in
    pieces; the sample client expects one DMA_WRITE, then a DMA_READ."""
    result, capture = lvu_session(tmp_path, "vfio_user.cmd == VERSION && frame.dir == c2s: "
                                            "rewrite version.max_data_xfer_size=512")
    assert result.returncode == 1
    assert "failed to receive DMA read: Invalid argument" in result.stderr
    writes = messages(capture, "DMA_WRITE", S2C)
    assert len(writes) > 1 and {int.from_bytes(m.data[24:32], "little") for m in writes} == {512}


def test_faults_survive_pcapng_and_show_in_its_comments(tmp_path):
    rule = f"{GET_INFO} && frame.dir == s2c: rewrite device_info.num_irqs=4"
    result, capture, _, _ = faulted(tmp_path, rule)
    assert result.returncode == 1
    pcapng, back = tmp_path / "s.pcapng", tmp_path / "back.vfucap"
    assert run_vfu("export", str(capture), "-o", str(pcapng)).returncode == 0
    assert run_vfu("import", str(pcapng), "-o", str(back)).returncode == 0
    assert records(back) == records(capture)
    if shutil.which("tshark"):
        plugin = run_vfu("wireshark-plugin").stdout.strip()
        shown = subprocess.run(["tshark", "-X", f"lua_script:{plugin}", "-r", str(pcapng), "-Y",
                                'frame.comment contains "fault.injected"'],
                               capture_output=True, text=True, timeout=60)
        assert "DEVICE_GET_INFO reply" in shown.stdout and len(shown.stdout.splitlines()) == 1
