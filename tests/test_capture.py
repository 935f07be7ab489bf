"""Capture files: round trip, crash tolerance, following a growing file."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import msgpack
import pytest

from vfu_inspect.capture import CaptureReader, CaptureWriter, read_all
from vfu_inspect.errors import CaptureError
from vfu_inspect.records import C2S, CLOSE, MAIN, OPEN, S2C, TWIN, Burst, Event, Message


def sample_records() -> list:
    return [
        Event(OPEN, 1, 0, {"client": "/tmp/c", "server": "/tmp/s"}),
        Message(10, 0, MAIN, C2S, b"\x01\x00" * 8, [{"kind": "memfd", "size": 4096, "inode": 7}]),
        Message(20, 0, TWIN, S2C, bytes(range(40))),
        Burst(25, 0, MAIN, S2C, bytes(range(16)) + bytes(range(100, 124)), [16, 24]),
        Message(30, 1, MAIN, C2S, b"x" * 100, [], size=5000),
        Event(CLOSE, 40, 0, {"by": "client", "unanswered": [3]}),
    ]


def as_read(records: list) -> list:
    """What a reader gives for these records: a burst as its messages."""
    return [m for r in records for m in (r.messages() if isinstance(r, Burst) else [r])]


def write(path, records) -> None:
    with CaptureWriter(path, source="test", bursts=True) as w:
        for r in records:
            w.write(r)


def test_round_trip_keeps_every_field(tmp_path):
    path = tmp_path / "a.vfucap"
    write(path, sample_records())
    records, damage = read_all(path)
    assert damage is None
    assert records == as_read(sample_records())
    assert records[3] == Message(25, 0, MAIN, S2C, bytes(range(16)))
    assert records[4] == Message(25, 0, MAIN, S2C, bytes(range(100, 124)))
    with CaptureReader(path) as reader:
        assert reader.header["version"] == 2 and reader.header["source"] == "test"


def test_a_writer_without_bursts_writes_their_messages_as_version_1(tmp_path):
    path = tmp_path / "v1.vfucap"
    with CaptureWriter(path, source="test") as w:
        for r in sample_records():
            w.write(r)
    with open(path, "rb") as f:
        header, *records = msgpack.Unpacker(f, raw=False)
    assert header["version"] == 1 and [r[0] for r in records] == [1, 0, 0, 0, 0, 0, 2]
    assert read_all(path) == (as_read(sample_records()), None)


def test_a_version_1_file_still_reads(tmp_path):
    path = tmp_path / "v1.vfucap"
    header = {"format": "vfu-inspect-capture", "version": 1, "source": "old"}
    records = [r for r in sample_records() if not isinstance(r, Burst)]
    path.write_bytes(msgpack.packb(header) + b"".join(
        msgpack.packb(r.to_record(), use_bin_type=True) for r in records))
    assert read_all(path) == (records, None)


@pytest.mark.parametrize("sizes", [[16, 23], [16, 25], [8, 32], [], "16"])
def test_a_burst_whose_sizes_do_not_cut_its_bytes_is_malformed(tmp_path, sizes):
    path = tmp_path / "a.vfucap"
    write(path, sample_records()[:2])
    with open(path, "ab") as f:
        f.write(msgpack.packb([7, 25, 0, MAIN, S2C, bytes(40), sizes], use_bin_type=True))
    assert read_all(path) == (sample_records()[:2], "1 malformed record(s) skipped")


def test_truncated_at_every_byte_reads_every_complete_record(tmp_path):
    path = tmp_path / "a.vfucap"
    write(path, sample_records())
    data = path.read_bytes()
    full = sample_records()
    boundaries = record_boundaries(data)
    cut_path = tmp_path / "cut.vfucap"
    for cut in range(boundaries[0], len(data)):
        cut_path.write_bytes(data[:cut])
        records, damage = read_all(cut_path)
        complete = sum(1 for b in boundaries[1:] if b <= cut)
        assert records == as_read(full[:complete]), cut
        assert (damage is None) == (cut in boundaries), cut
        if damage:
            assert "ends inside a record" in damage


def record_boundaries(data: bytes) -> list[int]:
    """Byte offsets where each object (header first) ends."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    ends = []
    for _ in unpacker:
        ends.append(unpacker.tell())
    return ends


def test_garbage_records_are_skipped_and_reported_once(tmp_path):
    path = tmp_path / "a.vfucap"
    write(path, sample_records()[:2])
    with open(path, "ab") as f:
        f.write(msgpack.packb([99, 1, 2, 3]) + msgpack.packb("hello") + msgpack.packb([0, 1]))
    records, damage = read_all(path)
    assert records == sample_records()[:2]
    assert damage == "3 malformed record(s) skipped"


@pytest.mark.parametrize("content,reason", [
    (b"", "not a vfu-inspect capture"),
    (b"\xc1\xc1\xc1", "not a vfu-inspect capture"),
    (msgpack.packb({"format": "pcap"}), "not a vfu-inspect capture"),
    (msgpack.packb({"format": "vfu-inspect-capture", "version": 99}), "version 99"),
])
def test_not_a_capture(tmp_path, content, reason):
    path = tmp_path / "x"
    path.write_bytes(content)
    with pytest.raises(CaptureError, match=reason):
        CaptureReader(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CaptureError, match="cannot open .*No such file"):
        CaptureReader(tmp_path / "nope.vfucap")


def test_absurd_length_does_not_allocate(tmp_path):
    path = tmp_path / "a.vfucap"
    write(path, sample_records()[:2])
    with open(path, "ab") as f:   # a bin8/32 header claiming 4 GiB, then nothing
        f.write(b"\x97\x00\x01\x00\x00\x00\xc6\xff\xff\xff\xff")
    records, damage = read_all(path)
    assert records == sample_records()[:2]
    assert damage is not None


def test_follow_reads_records_as_another_process_appends(tmp_path):
    path = tmp_path / "live.vfucap"
    writer_code = (
        "import sys, time\n"
        "from vfu_inspect.capture import CaptureWriter\n"
        "from vfu_inspect.records import C2S, MAIN\n"
        "with CaptureWriter(sys.argv[1]) as w:\n"
        "    for i in range(20):\n"
        "        w.message(i, 0, MAIN, C2S, bytes([i]) * 16)\n"
        "        time.sleep(0.01)\n")
    proc = subprocess.Popen([sys.executable, "-c", writer_code, str(path)])
    while not path.exists():
        time.sleep(0.01)
    reader = CaptureReader(path, follow=True, poll=0.01)
    seen: list[Message] = []

    def collect() -> None:
        for record in reader:
            seen.append(record)
            if len(seen) == 20:
                reader.stop()

    thread = threading.Thread(target=collect)
    thread.start()
    proc.wait(timeout=10)
    thread.join(timeout=10)
    reader.close()
    assert not thread.is_alive()
    assert [m.data[0] for m in seen] == list(range(20))


def test_killed_writer_leaves_a_readable_file(tmp_path):
    path = tmp_path / "killed.vfucap"
    code = (
        "import sys, os\n"
        "from vfu_inspect.capture import CaptureWriter\n"
        "from vfu_inspect.records import C2S, MAIN\n"
        "w = CaptureWriter(sys.argv[1])\n"
        "for i in range(100):\n"
        "    w.message(i, 0, MAIN, C2S, bytes(16))\n"
        "os.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)])
    assert proc.returncode == -9
    records, damage = read_all(path)
    assert len(records) == 100 and damage is None
    os.truncate(path, os.path.getsize(path) - 3)
    records, damage = read_all(path)
    assert len(records) == 99 and "ends inside a record" in damage
