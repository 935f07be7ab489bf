"""Display filters: matching, repeated fields, errors at their position."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from vfu_inspect.dfilter import FilterError, compile_filter

DMA_MAP = {"vfio_user": [None], "vfio_user.cmd": [2], "vfio_user.msg_id": [7],
           "vfio_user.flags.type": [0], "vfio_user.flags.no_reply": [False],
           "dma_map": [None], "dma_map.size": [0x2000], "dma_map.flags": [3],
           "dma_map.flags.read": [True], "fd.kind": ["memfd"],
           "fd.purpose": ["DMA memory for iova 0x1000-0x3000"], "vfio_user.time": [0.5]}
ERROR_REPLY = {"vfio_user": [None], "vfio_user.cmd": [9], "vfio_user.msg_id": [8],
               "vfio_user.flags.type": [1], "vfio_user.error": [22],
               "region_read.data": [b"\x01\x02\x03"],
               "region_info.area.offset": [0, 0x2000],
               "expert": [True], "expert.severity": ["note"], "expert.id": ["argsz.truncated"]}


@pytest.mark.parametrize("expr,on_map,on_error", [
    ("vfio_user.cmd == DMA_MAP", True, False),
    ("vfio_user.cmd == 2", True, False),
    ("vfio_user.cmd eq dma_map", True, False),
    ("vfio_user.cmd != DMA_MAP", False, True),
    ("vfio_user.error", False, True),
    ("!vfio_user.error", True, False),
    ("vfio_user.error == EINVAL", False, True),
    ("dma_map.size >= 0x2000 && dma_map.size < 8193", True, False),
    ("dma_map.size > 0x2000 || vfio_user.msg_id == 8", False, True),
    ("not (vfio_user.cmd == DMA_MAP) and vfio_user", False, True),
    ("dma_map.flags & 0x2", True, False),
    ("dma_map.flags.read", True, False),
    ("vfio_user.flags.no_reply", False, False),
    ("vfio_user.flags.type == reply", False, True),
    ('fd.kind == "memfd"', True, False),
    ('fd.purpose contains "iova 0x1000"', True, False),
    ('fd.purpose matches "IOVA 0x1[0-9]+"', True, False),
    ("region_read.data contains 02:03", False, True),
    ("region_read.data == 01:02:03", False, True),
    ("region_info.area.offset == 0x2000", False, True),          # any occurrence
    ("region_info.area.offset != 0x2000", False, False),         # none may equal
    ("region_info.area.offset != 0x1000", False, True),
    ("vfio_user.msg_id in {1..7}", True, False),
    ("vfio_user.cmd in {DMA_MAP, REGION_READ}", True, True),
    ("vfio_user.time > 0.25", True, False),
    ("expert.severity == note", False, True),
    ('expert.id == "argsz.truncated"', False, True),
    ("expert", False, True),
])
def test_matches(expr, on_map, on_error):
    f = compile_filter(expr)
    assert (f.matches(DMA_MAP), f.matches(ERROR_REPLY)) == (on_map, on_error)


def test_fields_lists_what_the_filter_reads():
    assert compile_filter("vfio_user.response_in || dma_map").fields == {
        "vfio_user.response_in", "dma_map"}


@pytest.mark.parametrize("expr,position,reason", [
    ("dma_map.sise == 1", 0, "unknown field"),
    ("vfio_user.cmd == NOPE", 17, "not a value of vfio_user.cmd"),
    ("(vfio_user.cmd == 1", 19, "missing ')'"),
    ("vfio_user.cmd == 1)", 18, "unexpected ')'"),
    ("vfio_user.cmd ==", 16, "needs a value"),
    ("dma_map > 1", 8, "cannot be ordered"),
    ("version.json > \"a\"", 13, "cannot be ordered"),
    ("vfio_user.cmd contains 1", 14, "contains needs"),
    ("dma_map.size == \"big\"", 16, "not a string"),
    ("vfio_user.cmd == 1 junk", 19, "unexpected 'junk'"),
    ("vfio_user.cmd in {1 2", 21, "missing '}'"),
    ("vfio_user.cmd # 1", 14, "unexpected character"),
    ("", 0, "empty filter"),
    ("&& dma_map", 0, "expected a field"),
])
def test_errors_have_a_position(expr, position, reason):
    with pytest.raises(FilterError) as info:
        compile_filter(expr)
    assert info.value.position == position
    assert reason in info.value.message


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="vfio_usercmd.=!<>&|(){}0x1234 \"DMA_P,..", max_size=40))
def test_random_text_raises_only_filter_errors(text):
    try:
        compile_filter(text).matches(DMA_MAP)
    except FilterError:
        pass


@pytest.mark.parametrize("capture", ["libvfio-user-samples.vfucap", "sample-endpoints.vfucap"])
def test_a_filters_own_values_select_what_every_value_selects(capture):
    """`Tree.values(only)` skips the layers a filter does not name: for
    every registered field, presence and a value test select the same
    messages from it as from all the values."""
    from pathlib import Path

    from vfu_inspect.capture import read_all
    from vfu_inspect.dissect import Analyzer, find_responses
    from vfu_inspect.fields import REGISTRY
    records, _ = read_all(Path(__file__).parent.parent / "captures" / capture)
    packets = list(Analyzer(find_responses(records)).run(records))
    checked = 0
    for name in [*REGISTRY, "expert.id"]:
        for text in (name, f"{name} == 1"):
            try:
                display = compile_filter(text)
            except FilterError:
                continue
            every = [p.number for p in packets if display.matches(p.tree.values())]
            own = [p.number for p in packets if display.matches(p.tree.values(display.fields))]
            assert own == every, text
            checked += bool(every)
    assert checked > 100          # the captures reach a good part of the registry
