"""The real libvfio-user trace, imported: its README's count table, field by field."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from vfu_inspect.capture import CaptureWriter, read_all
from vfu_inspect.dissect import Analyzer
from vfu_inspect.importers.trace_jsonl import import_trace
from vfu_inspect.packet import Dissected

CAPTURES = Path(__file__).resolve().parent.parent / "captures"
TRACE = CAPTURES / "libvfio-user-samples.jsonl"
TABLE = CAPTURES / "libvfio-user-samples.md"
CAPTURE = CAPTURES / "libvfio-user-samples.vfucap"


def readme_table() -> dict[tuple, tuple[int, int, int]]:
    """(conn, cmd, name, dir, kind) -> (messages, fds, errors) from the README."""
    rows = {}
    for line in TABLE.read_text().splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\w+)\s*\|\s*(c2s|s2c)\s*\|"
                     r"\s*(command|reply)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|", line)
        if m:
            conn, cmd, name, d, kind, n, fds, errs = m.groups()
            rows[(int(conn), int(cmd), name, d, kind)] = (int(n), int(fds), int(errs))
    return rows


def counted(packets: list[Dissected]) -> dict[tuple, tuple[int, int, int]]:
    n, fds, errs = Counter(), Counter(), Counter()
    for p in packets:
        h = p.header
        key = (p.msg.conn, h.cmd, h.command_name, p.direction,
               "reply" if h.is_reply else "command")
        n[key] += 1
        fds[key] += len(p.msg.fds)
        errs[key] += h.kind == "error"
    return {k: (n[k], fds[k], errs[k]) for k in n}


def dissect_file(path: Path) -> list[Dissected]:
    records, damage = read_all(path)
    assert damage is None
    return list(Analyzer().run(records))


@pytest.fixture(scope="module")
def fresh_import(tmp_path_factory) -> list[Dissected]:
    result = import_trace(str(TRACE))
    assert result.problems == []
    out = tmp_path_factory.mktemp("imp") / "trace.vfucap"
    with CaptureWriter(out) as writer:
        for record in result.records:
            writer.write(record)
    return dissect_file(out)


def test_readme_table_is_parsed():
    table = readme_table()
    assert len(table) == 48
    assert sum(n for n, _, _ in table.values()) == 344


def test_import_reproduces_the_count_table(fresh_import):
    assert counted(fresh_import) == readme_table()


def test_committed_sample_capture_matches_the_trace(fresh_import):
    committed = dissect_file(CAPTURE)
    assert [p.msg.data for p in committed] == [p.msg.data for p in fresh_import]
    assert counted(committed) == readme_table()


def test_both_version_objects_decode_to_fields(fresh_import):
    versions = [p.tree.values() for p in fresh_import if p.header.cmd == 1]
    assert len(versions) == 4
    for v in versions:
        assert v["version.minor"] == [2]
    client, server = versions[0], versions[1]
    assert client["version.max_msg_fds"] == [32]
    assert client["version.max_data_xfer_size"] == [1024]
    assert server["version.max_msg_fds"] == [8]
    assert server["version.max_data_xfer_size"] == [1048576]
    assert server["version.migration.pgsize"] == [4096]


def test_bar1_sparse_mmap_areas_decode(fresh_import):
    bar1 = [p.tree.values() for p in fresh_import
            if p.header.cmd == 5 and p.header.is_reply and p.msg.fds]
    assert len(bar1) == 1
    v = bar1[0]
    assert v["region_info.index"] == [1]
    assert v["region_info.cap.id"] == [1]
    assert v["region_info.sparse.nr_areas"] == [2]
    assert v["region_info.area.offset"] == [0x0, 0x2000]
    assert v["region_info.area.size"] == [0x1000, 0x1000]
    assert "mmap fd of region BAR1" in v["fd.purpose"][0]


def test_every_dma_map_shows_its_fd(fresh_import):
    maps = [p for p in fresh_import if p.header.cmd == 2 and not p.header.is_reply]
    assert len(maps) == 24
    for p in maps:
        v = p.tree.values()
        assert v["fd.kind"] == ["file"]
        iova = v["dma_map.address"][0]
        assert v["fd.purpose"] == [f"DMA memory for iova {iova:#x}-{iova + v['dma_map.size'][0]:#x}"
                                   f" (file offset {v['dma_map.offset'][0]:#x})"]
        assert f"iova={iova:#x}" in p.tree.info


def test_every_reply_is_matched_to_its_request(fresh_import):
    for p in fresh_import:
        if p.header.is_reply:
            request = fresh_import[p.request_in - 1]
            assert request.header.msg_id == p.header.msg_id
            assert request.header.cmd == p.header.cmd
            assert request.direction != p.direction


def test_bad_trace_lines_are_reported_not_raised(tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = TRACE.read_text().splitlines()[:3]
    bad.write_text("\n".join([lines[0], "{not json", '{"dir": "sideways", "conn": 0, "hex": ""}',
                              '{"dir": "c2s", "conn": 0, "hex": "zz"}', "[1, 2]", lines[1]]))
    result = import_trace(str(bad))
    assert len(result.records) == 2
    assert [p.split(":")[0] for p in result.problems] == ["line 2", "line 3", "line 4", "line 5"]
