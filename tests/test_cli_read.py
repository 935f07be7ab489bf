"""`vfu-inspect read` and `import` as a user runs them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import run_vfu

SAMPLE = Path(__file__).resolve().parent.parent / "captures" / "libvfio-user-samples.vfucap"
TRACE = SAMPLE.with_suffix(".jsonl")


def read(*args: str) -> list[str]:
    result = run_vfu("read", str(SAMPLE), *args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout.splitlines()


def test_summary_has_one_line_per_message():
    lines = read()
    assert len(lines) == 344
    first = lines[0].split()
    assert first[:7] == ["1", "0.000000", "0.000000", "0", "C→S", "0xda55", "VERSION"]
    assert "EINVAL" in lines[3] and "error" in lines[3]
    assert any("DMA_MAP" in line and "iova=0x1000 size=0x1000 prot=RW fd=file" in line
               for line in lines)


def test_count_limits_the_output():
    assert len(read("-c", "5")) == 5


def test_detail_tree_shows_fields_and_links():
    text = "\n".join(read("-V", "-c", "12"))
    assert "Response in frame: 2" in text            # VERSION request -> reply
    assert "Request in frame: 11" in text            # BAR1 full reply -> its request
    assert "Region: BAR1 (1)" in text
    assert "Id: SPARSE_MMAP (1)" in text
    assert "Purpose: mmap fd of region BAR1" in text
    assert "Expert Info (Note/argsz.truncated)" in text


def test_hex_dump():
    lines = read("-x", "-c", "1")
    assert lines[1].startswith("0000  55 da 01 00 52 00 00 00")


def test_json_has_every_field():
    packets = json.loads(run_vfu("read", str(SAMPLE), "-T", "json").stdout)
    assert len(packets) == 344
    version = packets[1]["layers"]
    assert version["vfio_user"]["vfio_user.response_to"] == 1
    assert version["version"]["version.json_tree"]["version.max_msg_fds"] == 8
    bar1 = packets[11]["layers"]["region_info"]
    areas = bar1["region_info.cap"]["region_info.area"]
    assert [a["region_info.area.offset"] for a in areas] == [0, 0x2000]
    assert packets[9]["expert"] == [{
        "id": "argsz.truncated", "severity": "note",
        "message": "DEVICE_GET_REGION_INFO reply truncated: argsz asks for 80 bytes, "
                   "32 sent; the client should retry with a larger buffer"}]


def test_fields_output():
    lines = read("-T", "fields", "-e", "frame.number", "-e", "vfio_user.cmd",
                 "-e", "dma_map.address", "-c", "32")
    assert lines[30] == "31\t2\t0"
    assert lines[31] == "32\t2\t"


@pytest.mark.parametrize("expr,count", [
    ("vfio_user.cmd == DMA_MAP", 48),
    ("vfio_user.cmd == DMA_MAP && vfio_user.flags.type == command", 24),
    ("vfio_user.error", 1),
    ("vfio_user.error == EINVAL", 1),
    ("fd.kind == \"file\"", 25),
    ("frame.dir == s2c && frame.conn == 1", 45),
    ("region_info.area", 1),
    ("expert.severity == note", 2),
    ("vfio_user.cmd in {DMA_READ DMA_WRITE} && !vfio_user.flags.type == reply", 16),
])
def test_display_filter_selects(expr, count):
    assert len(read("-Y", expr)) == count


def test_invalid_filter_is_reported_at_its_position():
    result = run_vfu("read", str(SAMPLE), "-Y", "dma_map.sise == 1")
    assert result.returncode == 2
    assert "invalid display filter" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == "  ^"


@pytest.mark.parametrize("args,reason", [
    (["read", "/nonexistent.vfucap"], "cannot open"),
    (["read", str(TRACE)], "not a vfu-inspect capture"),
    (["read", str(SAMPLE), "-T", "fields"], "needs at least one -e"),
    (["read", str(SAMPLE), "-T", "fields", "-e", "nope.field"], "unknown field"),
    (["read"], "give a capture FILE"),
    (["import", "/nonexistent.jsonl", "-o", "/tmp/x.vfucap"], "no such file"),
])
def test_bad_input_gives_a_clear_error(args, reason):
    result = run_vfu(*args)
    assert result.returncode == 2
    assert reason in result.stderr and "Traceback" not in result.stderr


def test_truncated_capture_reads_with_one_warning(tmp_path):
    cut = tmp_path / "cut.vfucap"
    data = SAMPLE.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    result = run_vfu("read", str(cut))
    assert result.returncode == 0
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "ends inside a record" in warnings[0]
    assert 100 < len(result.stdout.splitlines()) < 344


def test_import_then_read(tmp_path):
    out = tmp_path / "t.vfucap"
    result = run_vfu("import", str(TRACE), "-o", str(out))
    assert result.returncode == 0 and "wrote 344 messages" in result.stderr
    assert out.read_bytes()[:40] != b"" and os.path.getsize(out) > 100_000
    assert len(run_vfu("read", str(out)).stdout.splitlines()) == 344
