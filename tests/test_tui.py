"""The terminal UI, driven by textual's pilot on the sample capture and a live proxy."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import msgpack
import pytest
from textual import events
from textual.theme import BUILTIN_THEMES
from textual.widgets import Input

from helpers import run_vfu, sample_session, stop, vfu, wait_for_socket
from vfu_inspect.capture import CaptureWriter, read_all
from vfu_inspect.dfilter import compile_filter
from vfu_inspect.dissect import Analyzer, find_responses
from vfu_inspect.dissectors.vfio_user import CMD, Header
from vfu_inspect.fields import all_fields
from vfu_inspect.output import filter_values
from vfu_inspect.records import CLOSE, OPEN, Burst, Message
from vfu_inspect.tui.app import (AllRows, DetailTree, FilterBar, HexPane, InspectApp,
                                 MessageList, row_palette)
from vfu_inspect.tui.model import CaptureModel

ROOT = Path(__file__).resolve().parent.parent
TRACE = str(ROOT / "captures" / "libvfio-user-samples.vfucap")
ENDPOINTS = str(ROOT / "captures" / "sample-endpoints.vfucap")
SIZE = (160, 48)


def trace_packets() -> list:
    records, _ = read_all(TRACE)
    messages = [r for r in records if isinstance(r, Message)]
    return list(Analyzer(find_responses(messages)).run(messages))


async def loaded(pilot, app: InspectApp) -> None:
    """Wait until the background pass has read the whole capture."""
    await until(pilot, lambda: app.model.done, seconds=120)
    await pilot.pause(0.3)          # one poll tick: the list learns the count


async def until(pilot, condition, seconds: float = 30) -> None:
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        await pilot.pause(0.05)
    raise AssertionError("condition not reached")


def run(test, capture: str = TRACE) -> None:
    """Run an async pilot scenario on a fresh app over a capture."""
    async def main():
        app = InspectApp(CaptureModel(capture))
        async with app.run_test(size=SIZE) as pilot:
            await loaded(pilot, app)
            await test(pilot, app)
    asyncio.run(main())


async def type_filter(pilot, text: str, submit: bool = True) -> None:
    await pilot.press("slash")
    pilot.app.query_one(FilterBar).value = text
    await pilot.pause(0.05)
    if submit:
        await pilot.press("enter")


def test_moving_through_the_list_selects_and_shows_each_message():
    async def scenario(pilot, app):
        assert app.model.count == 344 and app.messages.entry() == 1
        assert "VERSION" in app.messages.row(1)[0]
        await pilot.press("j", "j", "down", "k")
        assert app.messages.entry() == 3
        assert str(app.query_one(DetailTree).root.label) == "Message 3"
        await pilot.press("G")
        assert app.messages.entry() == 344
        await pilot.press("g", "pagedown")
        height = app.messages.scrollable_content_region.height
        assert app.messages.entry() == height            # moved a screenful (less one)
        await pilot.press("pageup")
        assert app.messages.entry() == 1
        await pilot.click(MessageList, offset=(5, 4))
        assert app.messages.entry() == 5
    run(scenario)


def test_valid_filter_shows_the_matches_and_invalid_leaves_the_list_alone():
    expected = [p.number for p in trace_packets() if p.header.cmd == CMD["DMA_MAP"]]

    async def scenario(pilot, app):
        await type_filter(pilot, "vfio_user.cmd == DMA_MAP")
        await until(pilot, lambda: app.matches is not None)
        assert list(app.matches) == expected
        assert list(app.messages.rows) == expected
        assert "48/344 shown" in str(app.query_one("#status").render())
        await type_filter(pilot, "vfio_user.cmd == ", submit=False)
        assert app.query_one(FilterBar).has_class("-invalid")
        await pilot.press("enter")
        assert "invalid filter" in str(app.query_one("#status").render())
        assert list(app.messages.rows) == expected                 # unchanged
        await type_filter(pilot, "dma_map.size >= 0x1000 && expert")   # a deep filter
        await until(pilot, lambda: app.filter_text.startswith("dma_map"))
        assert len(app.matches) == 0
        await type_filter(pilot, "")                                    # cleared
        assert len(app.messages.rows) == 344 + len(app.model.events)
    run(scenario)


def test_keys_typed_in_one_burst_go_where_the_focus_moves():
    """A slow terminal or a paste delivers "/filter⏎j" at once: the app routes
    each key as it arrives, so the filter must get the characters and the list the j."""
    async def scenario(pilot, app):
        text = "vfio_user.cmd == DMA_MAP"
        burst = ["slash", *(("space" if c == " " else c) for c in text), "enter", "j"]
        for key in burst:
            app.post_message(events.Key(key, " " if key == "space" else
                                        "/" if key == "slash" else
                                        None if key == "enter" else key))
        await until(pilot, lambda: app.filter_text == text)
        await pilot.pause(0.1)
        assert app.query_one(FilterBar).value == text and app.focused is app.messages
        assert app.messages.entry() == list(app.matches)[1]     # j: the second match
    run(scenario)


@pytest.mark.parametrize("text", [
    "vfio_user.cmd == DMA_MAP",                         # header: the index alone
    "vfio_user.time > 0.0000015 || vfio_user.response_to == 1",
    "dma_map.size >= 0x1000",                           # stateless: DMA_MAP messages only
    "!dma_map && vfio_user.flags.type == 0",            # negation of a deep field
    'fd.kind == "eventfd" || region_info.area.size',
    "version.max_msg_fds == 8 || mig_data_read.size < 1024",
    "vfio_user.trailing || vfio_user.payload",          # any command: all dissected
    'expert.severity == "warning" || !expert && vfio_user.cmd == DMA_UNMAP',  # index
    'expert.id == "argsz.truncated" || dma_map.size > 0x1000000',  # stateless + index
    'expert.id == "argsz.truncated" || pci.vendor_id',  # stateful: the full pass
    'expert.message contains "EINVAL" || vfio_user.flags.error',
])
@pytest.mark.parametrize("capture", [TRACE, str(ROOT / "captures" / "sample-endpoints.vfucap")],
                         ids=["libvfio-user", "sample-endpoints"])
def test_every_filter_path_selects_what_read_selects(capture, text):
    assert model_matches(capture, text) == read_matches(capture, text)


def registry_filters(values: list[dict[str, list]]) -> Iterator[str]:
    """Each registered field as a filter (present, absent), and == two of the
    integer values it takes in these messages."""
    for name in sorted(fd.name for fd in all_fields()):
        yield from (name, f"!{name}")
        seen = {v for vs in values for v in vs.get(name, ()) if type(v) is int}
        yield from (f"{name} == {v}" for v in sorted(seen)[:2])


@pytest.mark.parametrize("capture", [TRACE, ENDPOINTS, "size-lies"])
def test_read_and_the_tui_select_the_same_messages_for_every_registered_field(capture, tmp_path):
    """What read filters on against the TUI's index, stateless and full paths."""
    records, _ = read_all(TRACE if capture == "size-lies" else capture)
    messages = [r for r in records if isinstance(r, Message)]
    if capture == "size-lies":       # a 16-byte message whose msg_size says 99
        capture = str(tmp_path / "size-lies.vfucap")
        with CaptureWriter(capture) as writer:
            for m in messages[:10]:
                writer.write(m)
            writer.write(Message(messages[9].ts_ns, 0, 0, 0, bytes(Header(
                msg_id=7, cmd=CMD["DEVICE_GET_INFO"], size=99))))
        messages = [r for r in read_all(capture)[0] if isinstance(r, Message)]
    values = [(p.number, filter_values(p)) for p in Analyzer(find_responses(messages)).run(messages)]
    model = CaptureModel(capture)
    model.start()
    model._thread.join(timeout=60)
    try:
        for text in registry_filters([v for _, v in values]):
            display = compile_filter(text)
            read = [n for n, v in values if display.matches(v)]
            assert list(model.matches(display, lambda n: True)) == read, text
    finally:
        model.close()


def model_matches(capture: str, text: str) -> list[int]:
    model = CaptureModel(capture)
    model.start()
    model._thread.join(timeout=60)
    try:
        return list(model.matches(compile_filter(text), lambda n: True))
    finally:
        model.close()


def read_matches(capture: str, text: str) -> list[int]:
    """What `read` selects, with the links of a two-pass read as the TUI has them."""
    read = run_vfu("read", capture, "-2", "-Y", text, "-T", "fields", "-e", "frame.number")
    assert read.returncode == 0, read.stderr
    return [int(n) for n in read.stdout.split()]


def test_unanswered_requests_are_found_from_the_index(tmp_path):
    records, _ = read_all(TRACE)
    messages = [r for r in records if isinstance(r, Message)]
    replies = {8, 30, 31, 90}      # drop a few replies: their requests go unanswered
    capture = tmp_path / "unanswered.vfucap"
    with CaptureWriter(capture) as writer:
        for number, m in enumerate(messages, 1):
            if number not in replies:
                writer.write(m)
    for text in ('expert.id == "request.unanswered"', "expert.severity == \"warning\""):
        expected = read_matches(str(capture), text)
        assert expected and model_matches(str(capture), text) == expected


def test_messages_inside_bursts_read_back_by_number(tmp_path):
    """A burst record holds several messages at one offset: each reads back as itself."""
    records, _ = read_all(TRACE)
    capture, written = tmp_path / "bursts.vfucap", []
    with CaptureWriter(capture, bursts=True) as writer:
        run: list[Message] = []
        for record in records + [None]:
            same = run and isinstance(record, Message) and not record.fds and record.size is None \
                and len(run) < 5 \
                and (record.conn, record.channel, record.direction) == (
                    run[0].conn, run[0].channel, run[0].direction)
            if run and not same:
                first = run[0]
                writer.write(Burst(first.ts_ns, first.conn, first.channel, first.direction,
                                   b"".join(m.data for m in run), [len(m.data) for m in run]))
                run = []
            if isinstance(record, Message) and not record.fds and record.size is None:
                run.append(record)
            elif record is not None:
                writer.write(record)
            written += [record] if isinstance(record, Message) else []
    expected = [m for m in read_all(capture)[0] if isinstance(m, Message)]
    assert [m.data for m in expected] == [m.data for m in written]
    assert len(expected) > len(open_records(capture))     # some records are bursts
    model = CaptureModel(str(capture))
    model.start()
    model._thread.join(timeout=60)
    try:
        assert [model.message(n) for n in range(1, model.count + 1)] == expected
        assert list(model.messages(7, 23)) == expected[6:23]
        for text in ("dma_map.size >= 0x1000", "region_read.count == 4", "!dma_unmap"):
            selected = list(model.matches(compile_filter(text), lambda n: True))
            assert selected and selected == read_matches(str(capture), text), text
    finally:
        model.close()


def open_records(path: Path) -> list:
    unpacker = msgpack.Unpacker(open(path, "rb"), raw=False)
    return list(unpacker)[1:]


def test_n_and_N_walk_the_matches_in_the_full_list_and_history_recalls_filters():
    async def scenario(pilot, app):
        await type_filter(pilot, "vfio_user.error")
        await until(pilot, lambda: app.matches is not None)
        errors = list(app.matches)
        assert errors, "the sample has error replies"
        await pilot.press("v", "g", "n")                 # all rows shown, walk the matches
        assert app.messages.entry() == errors[0] and len(app.messages.rows) == 344
        await pilot.press("n", "N")
        assert app.messages.entry() == errors[0]
        await pilot.press("slash")
        app.query_one(FilterBar).value = ""
        await pilot.press("up")
        assert app.query_one(FilterBar).value == "vfio_user.error"
    run(scenario)


def test_r_jumps_between_a_request_and_its_reply():
    packets = trace_packets()
    request = next(p for p in packets if p.header.cmd == CMD["DMA_UNMAP"])

    async def scenario(pilot, app):
        app.messages.go_to_number(request.number)
        await pilot.press("r")
        assert app.messages.entry() == request.response_in
        await pilot.press("r")
        assert app.messages.entry() == request.number
    run(scenario)


def test_c_limits_the_list_to_one_connection_and_keeps_the_filter():
    packets = trace_packets()
    second = [p.number for p in packets if p.msg.conn == 1]
    maps = [p.number for p in packets if p.header.cmd == CMD["DMA_MAP"]]

    async def scenario(pilot, app):
        app.messages.go_to_number(second[0])
        await pilot.press("c")
        await until(pilot, lambda: list(app.messages.rows) == second)
        assert f"{len(second)}/344 shown" in status(app) and "conn 1 only" in status(app)
        await pilot.press("c")                                   # again: back to all
        await until(pilot, lambda: len(app.messages.rows) == 344 + len(app.model.events))
        await type_filter(pilot, "vfio_user.cmd == DMA_MAP")
        await until(pilot, lambda: list(app.messages.rows) == maps)
        app.messages.go_to_number(next(n for n in maps if n in second))
        await pilot.press("c")                                   # the filter and conn 1
        await until(pilot, lambda: list(app.messages.rows) == [n for n in maps if n in second])
        await pilot.press("v")                                   # conn 1, matches marked
        await until(pilot, lambda: list(app.messages.rows) == second)
        assert list(app.messages.matched) == maps
        assert f"{len(second)}/344 shown" in status(app) and "48 match" in status(app)
        await pilot.press("c", "v")                              # the filter is still there
        await until(pilot, lambda: list(app.messages.rows) == maps)
        assert app.filter_text == "vfio_user.cmd == DMA_MAP"
        await pilot.press("v")
        await until(pilot, lambda: isinstance(app.messages.rows, AllRows))
        assert "344/344 shown" in status(app) and "48 match" in status(app)
    run(scenario)


def test_an_event_row_shows_the_event_and_c_on_it_limits_to_its_connection():
    async def scenario(pilot, app):
        rows = AllRows(app.model)
        events = [i for i in range(len(rows)) if rows[i] < 0]
        app.messages.action_move_to(3)                          # a message first
        await pilot.pause(0.1)
        app.messages.action_move_to(events[-1])
        await pilot.pause(0.1)
        conn = app.model.events[-1][1].conn
        assert str(app.query_one(DetailTree).root.label) == f"Event: connection {conn} close"
        assert app.query_one(HexPane).text.plain == ""          # not the last message's bytes
        await type_filter(pilot, "vfio_user.flags.error")
        await pilot.press("v")
        app.messages.action_move_to(events[-1])
        await pilot.press("c")
        await until(pilot, lambda: app.view.conn == conn)
        assert app.filter_text == "vfio_user.flags.error"        # c never clears the filter
        assert all(app.model.columns["conn"][n - 1] == conn for n in app.messages.rows)
    run(scenario, ENDPOINTS)


def status(app) -> str:
    return str(app.query_one("#status").render())


def test_the_selected_field_is_highlighted_in_the_hex_pane():
    async def scenario(pilot, app):
        app.messages.go_to_number(31)                            # a DMA_MAP request
        await pilot.pause(0.1)
        tree = app.query_one(DetailTree)
        node = next(n for n in _walk(tree.root)
                    if n.data is not None and n.data.field.name == "dma_map.size")
        tree.select_node(node)
        tree.move_cursor(node)
        await pilot.pause(0.1)
        text = app.query_one(HexPane).text
        lit = [span for span in text.spans if span.style and "reverse" in str(span.style)]
        assert len(lit) == 2 * node.data.length                # hex cell and char per byte
    run(scenario)


def _walk(node):
    yield node
    for child in node.children:
        yield from _walk(child)


def test_screens_show_statistics_experts_session_and_help():
    packets = trace_packets()
    counts = Counter(p.header.cmd for p in packets)

    async def scenario(pilot, app):
        await pilot.press("s")
        stats = _screen_text(app)
        assert f"\nDMA_MAP │ {counts[CMD['DMA_MAP']]} │" in stats
        assert "Median" in stats and "p99" in stats and "Errno" in stats
        await pilot.press("escape", "x")
        experts = _screen_text(app)
        assert "argsz.truncated" in experts and "interop.mig_data_padding" in experts
        await pilot.press("enter")                               # jump to the first
        assert app.messages.entry() == 10
        last = max(p.number for p in packets if p.msg.conn == 0)
        app.messages.go_to_number(last)
        await pilot.press("i")
        await until(pilot, lambda: f"after message {last} (" in _screen_text(app))
        session = _screen_text(app)
        assert f"Connection 0 after message {last}" in session
        assert "0x000000008000-0x000000008fff" in session and "SPARSE_MMAP" in session
        assert "Connection 1" not in session                     # the selected one only
        await pilot.press("escape", "question_mark")
        help_text = _screen_text(app)
        for binding in [*MessageList.BINDINGS, *app.BINDINGS, *DetailTree.BINDINGS]:
            assert binding.description in help_text
        for real, raw in (("?", "question_mark"), ("/", "slash"), (":", "colon"),
                          ("]", "right_square_bracket")):
            assert f"  {real} " in help_text and raw not in help_text
        assert "^g" in help_text or "ctrl+g" in help_text
    run(scenario)


def _screen_text(app) -> str:
    lines = [str(w.render()) for w in app.screen.query("Static")]
    for table in app.screen.query("DataTable"):
        lines.append(" │ ".join(str(c.label) for c in table.columns.values()))
        lines += [" │ ".join(str(c) for c in table.get_row_at(i)) for i in range(table.row_count)]
    return "\n".join(lines)


@pytest.mark.parametrize("keys", [(), ("s",), ("question_mark",)],
                         ids=["main", "statistics", "help"])
def test_snapshot(snap_compare, keys):
    async def before(pilot):
        await loaded(pilot, pilot.app)
        await pilot.press("j", "j", "j")
        for key in keys:
            await pilot.press(key)
        await pilot.pause(0.2)
    assert snap_compare(InspectApp(CaptureModel(TRACE)), terminal_size=SIZE, run_before=before)


def test_attached_to_a_live_proxy_messages_and_events_arrive(tmp_path):
    server_sock, proxy_sock, monitor = (tmp_path / n for n in ("s.sock", "p.sock", "m.sock"))
    server = vfu("sample-server", "--listen", str(server_sock))
    wait_for_socket(server_sock, server)
    proxy = vfu("proxy", "--listen", str(proxy_sock), "--server", str(server_sock),
                "--monitor", str(monitor))
    wait_for_socket(proxy_sock, proxy)

    async def main():
        app = InspectApp(CaptureModel(str(monitor), follow=True))
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("f")                               # follow the tail
            client = vfu("sample-client", "--server", str(proxy_sock))
            await until(pilot, lambda: any(e.kind == CLOSE for _, e in app.model.events))
            assert client.wait(timeout=30) == 0
            await pilot.pause(0.5)
            kinds = [e.kind for _, e in app.model.events]
            assert OPEN in kinds and CLOSE in kinds
            assert app.model.count > 100 and app.model.live
            assert app.messages.cursor == len(app.messages.rows) - 1    # followed
            assert "close: client closed the connection" in app.messages.row(app.messages.entry())[0]
            await pilot.press("g")
            assert "# conn 0 open" in app.messages.row(app.messages.entry())[0]
            await pilot.press("j")
            assert "VERSION" in app.messages.row(app.messages.entry())[0]
    try:
        asyncio.run(main())
    finally:
        stop(proxy)
        stop(server)


def test_demo_on_a_terminal_runs_the_tui_and_q_s_stops_it(tmp_path):
    """A real pseudo-terminal: the demo shows the TUI; q ends it, the capture stays."""
    capture = tmp_path / "demo.vfucap"
    leader, follower = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "48"}
    proc = subprocess.Popen([sys.executable, "-m", "vfu_inspect", "demo", "-w", str(capture)],
                            stdin=follower, stdout=follower, stderr=follower, env=env,
                            cwd=ROOT, start_new_session=True)
    os.close(follower)
    screen = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and b"DMA_MAP" not in screen:
        screen += _read_some(leader)
    time.sleep(2)                               # the client finishes meanwhile
    os.write(leader, b"q")
    while b"detach" not in screen and time.monotonic() < deadline:
        screen += _read_some(leader)
    os.write(leader, b"s")                      # stop the proxy
    while proc.poll() is None and time.monotonic() < deadline:
        screen += _read_some(leader)
    os.close(leader)
    assert proc.wait(timeout=10) == 0
    assert b"DMA_MAP" in screen and b"The sample client succeeded" in screen
    records, damage = read_all(capture)
    assert damage is None and sum(isinstance(r, Message) for r in records) > 100


def _read_some(fd: int) -> bytes:
    if select.select([fd], [], [], 0.1)[0]:
        try:
            return os.read(fd, 65536)
        except OSError:
            return b""
    return b""


def test_proxy_tui_and_print_are_exclusive(tmp_path):
    result = run_vfu("proxy", "--listen", str(tmp_path / "p.sock"), "--server",
                     str(tmp_path / "s.sock"), "--tui", "--print")
    assert result.returncode == 2 and "choose one" in result.stderr


def test_bad_inputs_get_one_line_and_exit_2(tmp_path):
    garbage = tmp_path / "garbage.vfucap"
    garbage.write_bytes(b"\x93not a capture")
    for args in (["tui", str(tmp_path / "missing.vfucap")], ["tui", str(garbage)], ["tui"],
                 ["tui", "--attach", str(tmp_path / "no.sock")]):
        result = run_vfu(*args)
        assert result.returncode == 2, args
        assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, args


# --- live: a growing file, bad files, quitting a live proxy --------------------------

def trace_messages() -> list[Message]:
    records, _ = read_all(TRACE)
    return [r for r in records if isinstance(r, Message)]


def append(path: Path, messages: list[Message]) -> None:
    """Append records as a proxy does, each flushed."""
    with open(path, "ab") as f:
        for m in messages:
            f.write(msgpack.packb(m.to_record(), use_bin_type=True))


def grow_scenario(tmp_path: Path, first: int, test) -> None:
    """`tui FILE` on a capture holding the sample's first `first` messages,
    followed while `test` appends the rest."""
    path = tmp_path / "growing.vfucap"
    messages = trace_messages()
    with CaptureWriter(path) as writer:
        for m in messages[:first]:
            writer.write(m)

    async def main():
        app = InspectApp(CaptureModel(str(path), follow=True))
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.model.count == first and "done" in status(app))
            await test(pilot, app, lambda: append(path, messages[first:]), path)
    asyncio.run(main())


def test_a_filter_applied_on_a_growing_file_goes_on_with_new_messages(tmp_path):
    texts = ["vfio_user.cmd == DMA_MAP", "dma_map.size >= 0x1000",
             'expert.id == "request.unanswered" || pci.vendor_id']

    async def scenario(pilot, app, grow, path):
        await type_filter(pilot, texts[0])
        await until(pilot, lambda: app.filter_text == texts[0])
        before = list(app.matches)
        grow()
        await until(pilot, lambda: app.model.count == 344 and app.live[texts[0]].upto == 344)
        await pilot.pause(0.3)
        assert len(app.matches) > len(before)
        assert list(app.messages.rows) == read_matches(str(path), texts[0])
        assert f"{len(app.matches)}/344 shown" in status(app)
        for text in texts[1:]:          # the stateless and the full path, on the whole file
            await type_filter(pilot, text)
            await until(pilot, lambda: app.filter_text == text)
            assert list(app.matches) == read_matches(str(path), text)
    grow_scenario(tmp_path, 150, scenario)


def test_a_request_drawn_before_its_reply_is_redrawn_when_the_reply_arrives(tmp_path):
    packets = trace_packets()
    request = next(p for p in packets if p.header.cmd == CMD["DMA_MAP"])
    unanswered = 'expert.id == "request.unanswered"'

    async def scenario(pilot, app, grow, path):
        app.messages.go_to_number(request.number)
        await pilot.pause(0.1)
        assert "no reply in this capture" in app.messages.row(request.number)[0]
        assert app.messages.row(request.number)[1] == app.messages.palette["warning"]
        await type_filter(pilot, unanswered)
        await until(pilot, lambda: app.filter_text == unanswered)
        assert request.number in app.matches
        await pilot.press("v")
        grow()
        await until(pilot, lambda: app.model.count == 344 and app.live[unanswered].upto == 344)
        await pilot.pause(0.3)
        assert "no reply" not in app.messages.row(request.number)[0]
        labels = [str(n.label) for n in _walk(app.query_one(DetailTree).root)]
        assert any(label.startswith("Response in frame: ") and
                   label.endswith(str(request.response_in)) for label in labels), labels      # the detail was redone
        assert request.number not in app.matches                   # the filter re-decided it
        assert list(app.matches) == read_matches(str(path), unanswered)
        assert app.model.stats.expert_rows() == [r for r in app.model.stats.expert_rows()
                                                 if r[1] != "request.unanswered"]
    grow_scenario(tmp_path, request.number, scenario)


def test_follow_shows_new_messages_until_the_user_moves(tmp_path):
    messages = trace_messages()

    async def scenario(pilot, app, grow, path):
        await pilot.press("f")
        assert "follow: on" in status(app) and app.messages.entry() == 100
        append(path, messages[100:150])
        await until(pilot, lambda: app.messages.entry() == 150)
        await pilot.press("k")                                   # moving pauses following
        assert "follow: on" not in status(app) and app.messages.entry() == 149
        append(path, messages[150:])
        await until(pilot, lambda: app.model.count == 344)
        await pilot.pause(0.3)
        assert app.messages.entry() == 149
        assert "following" in status(app)                        # the file grows
    grow_scenario(tmp_path, 100, scenario)


def test_a_truncated_capture_is_reported_and_done(tmp_path):
    data = Path(TRACE).read_bytes()
    path = tmp_path / "cut.vfucap"
    path.write_bytes(data[:len(data) - 100])

    async def main():
        app = InspectApp(CaptureModel(str(path), follow=True))
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: "capture ends inside a record" in status(app))
            whole = sum(isinstance(r, Message) for r in read_all(path)[0])
            assert "done" in status(app) and f"{whole}/{whole} shown" in status(app)
    asyncio.run(main())
    read = run_vfu("read", str(path))
    assert "capture ends inside a record" in read.stderr        # as read says


def test_empty_and_cut_header_files_are_refused_and_a_header_only_file_opens(tmp_path):
    empty, cut, header_only = (tmp_path / n for n in ("empty.vfucap", "cut.vfucap", "h.vfucap"))
    empty.write_bytes(b"")
    cut.write_bytes(Path(TRACE).read_bytes()[:20])
    CaptureWriter(header_only).close()
    for path, reason in ((empty, "is empty"), (cut, "ends inside its header after 20 bytes")):
        result = run_vfu("tui", str(path), timeout=20)
        assert result.returncode == 2 and reason in result.stderr, result.stderr
        assert "Traceback" not in result.stderr

    async def main():
        app = InspectApp(CaptureModel(str(header_only), follow=True))
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: "done" in status(app))
            assert "0/0 shown" in status(app)
            assert "no messages yet" in app.messages.render_line(0).text
            await pilot.press("q")
            await pilot.pause(0.1)
            assert not app.is_running
    asyncio.run(main())


def big_capture(path: Path, count: int) -> None:
    """The sample session repeated, each time on new connections (as bench/ builds)."""
    messages = trace_messages()
    with CaptureWriter(path, autoflush=False) as writer:
        for rep in range(count // len(messages) + 1):
            for m in messages[:count - rep * len(messages)]:
                writer.write(Message(m.ts_ns + rep * 10**9, m.conn + 2 * rep, m.channel,
                                     m.direction, m.data, m.fds, m.size))


def test_a_running_filter_is_cancelled_by_esc_and_by_clearing_the_bar(tmp_path):
    path = tmp_path / "big.vfucap"
    big_capture(path, 40_000)
    slow = "pci.vendor_id == 0x4e58"                             # the full analysis path

    async def main():
        app = InspectApp(CaptureModel(str(path)))
        gate = threading.Event()          # holds each filter pass until the test lets it go
        advance = app.model.advance

        def held(live, progress):
            gate.wait(30)
            return advance(live, progress)
        app.model.advance = held
        async with app.run_test(size=SIZE) as pilot:
            await loaded(pilot, app)
            await type_filter(pilot, slow)
            assert app.focused is app.messages                   # Enter gives the list focus
            assert app.pending is not None                       # the filter is running
            await pilot.press("escape")
            await until(pilot, lambda: "filter cancelled" in status(app))
            assert app.pending is None
            assert app.filter_text == "" and len(app.messages.rows) == 40_000
            gate.set()
            await pilot.pause(0.5)
            assert app.filter_text == ""                         # it never comes back
            gate.clear()
            await type_filter(pilot, slow)
            assert app.pending is not None
            await type_filter(pilot, "")                         # clearing the bar stops it
            gate.set()
            assert app.pending is None and not app.workers._workers or all(
                w.is_cancelled or w.is_finished for w in app.workers if w.group == "filter")
            await pilot.pause(0.5)
            assert app.filter_text == "" and "40,000/40,000 shown" in status(app)
    asyncio.run(main())


def test_q_in_proxy_tui_offers_detach_which_keeps_relaying(tmp_path):
    """`proxy --tui` on a real terminal: q asks; d leaves the UI and the relay
    goes on (a client run afterwards succeeds); Ctrl-C then stops it."""
    server_sock, proxy_sock, capture = (tmp_path / n for n in ("s.sock", "p.sock", "c.vfucap"))
    server = vfu("sample-server", "--listen", str(server_sock))
    wait_for_socket(server_sock, server)
    leader, follower = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    proc = subprocess.Popen([sys.executable, "-m", "vfu_inspect", "proxy", "--listen",
                             str(proxy_sock), "--server", str(server_sock), "-w", str(capture),
                             "--tui"], stdin=follower, stdout=follower, stderr=follower,
                            env=env, cwd=ROOT, start_new_session=True)
    os.close(follower)
    screen = b""
    try:
        wait_for_socket(proxy_sock, proc)
        deadline = time.monotonic() + 30
        while b"shown" not in screen and time.monotonic() < deadline:
            screen += _read_some(leader)
        os.write(leader, b"q")
        while b"keep relaying" not in screen and time.monotonic() < deadline:
            screen += _read_some(leader)
        assert b"keep relaying" in screen
        os.write(leader, b"d")
        while b"detached" not in screen and time.monotonic() < deadline:
            screen += _read_some(leader)
        assert b"detached" in screen and proc.poll() is None
        client = run_vfu("sample-client", "--server", str(proxy_sock))
        assert client.returncode == 0, client.stderr
        os.killpg(proc.pid, signal.SIGINT)
        while proc.poll() is None and time.monotonic() < deadline:
            screen += _read_some(leader)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
        stop(server)
    records, damage = read_all(capture)
    assert damage is None and sum(isinstance(r, Message) for r in records) > 100


def test_the_theme_gives_errors_warnings_and_server_commands_distinct_colours():
    for name in ("textual-dark", "textual-light"):
        palette = row_palette(BUILTIN_THEMES[name])
        looks = [palette[k] for k in ("error", "error_reply", "warning", "server")]
        assert len({(s.color, s.bgcolor) for s in looks}) == 4, name


# --- what termshark, Wireshark and mitmproxy users reach for ------------------------------

async def answer(pilot, text: str) -> None:
    """Type `text` into the prompt on screen and press Enter."""
    pilot.app.screen.query_one(Input).value = text
    await pilot.press("enter")


def test_go_to_marks_search_and_apply_as_filter(tmp_path):
    async def scenario(pilot, app):
        await pilot.press("colon")
        await pilot.press(*"100", "enter")
        assert app.messages.entry() == 100
        await pilot.press("ctrl+g")
        await pilot.press(*"31", "enter")
        assert app.messages.entry() == 31
        await pilot.press("m", "G", "k", "m", "g")             # marks on 31 and 343
        await pilot.press("right_square_bracket")
        assert app.messages.entry() == 31
        await pilot.press("right_square_bracket")
        assert app.messages.entry() == 343
        await pilot.press("left_square_bracket")
        assert app.messages.entry() == 31 and "2 marked" in status(app)
        await pilot.press("ctrl+f")                            # search the detail and the hex
        await pilot.press(*"size", "enter")
        tree = app.query_one(DetailTree)
        assert app.focused is tree and "size" in str(tree.cursor_node.label).lower()
        item = tree.selected_item()
        await pilot.press("Y")                                 # copy as a filter
        expression = f"{item.field.name} == {item.value}"
        assert app.clipboard == expression
        await pilot.press("a")                                 # apply as filter
        await until(pilot, lambda: app.filter_text == expression)
        assert 31 in app.matches and list(app.matches) == read_matches(TRACE, app.filter_text)
        hexpane = app.query_one(HexPane)
        needle = hexpane.data[9:12]
        await pilot.press("ctrl+f")
        await answer(pilot, needle.hex(" "))                   # hex bytes
        start, length = hexpane.lit
        assert length == 3 and hexpane.data[start:start + 3] == needle
    run(scenario)


def test_w_saves_the_shown_or_marked_messages_as_capture_or_pcapng(tmp_path):
    from vfu_inspect.pcapng import read_pcapng
    text = "vfio_user.cmd == DMA_UNMAP"

    async def scenario(pilot, app):
        await type_filter(pilot, text)
        await until(pilot, lambda: app.filter_text == text)
        for name in ("shown.vfucap", "shown.pcapng"):
            await pilot.press("w")
            await answer(pilot, str(tmp_path / name))
            await until(pilot, lambda: (tmp_path / name).exists() and any(
                "wrote" in str(n.message) and name in str(n.message)
                for n in app._notifications))
        app.messages.go_to_number(app.matches[1])
        await pilot.press("m")
        await pilot.press("W")
        await answer(pilot, str(tmp_path / "marked.vfucap"))
        await until(pilot, lambda: (tmp_path / "marked.vfucap").exists() and any(
            "marked.vfucap" in str(n.message) for n in app._notifications))
    run(scenario)
    expected = read_matches(TRACE, text)
    shown = [r for r in read_all(tmp_path / "shown.vfucap")[0] if isinstance(r, Message)]
    assert len(shown) == len(expected)
    exported = run_vfu("export", TRACE, "-Y", text, "-o", str(tmp_path / "cli.pcapng"))
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "shown.pcapng").read_bytes()[64:] and [
        r for r in read_pcapng(tmp_path / "shown.pcapng")[0] if isinstance(r, Message)] == [
        r for r in read_pcapng(tmp_path / "cli.pcapng")[0] if isinstance(r, Message)]
    marked = [r for r in read_all(tmp_path / "marked.vfucap")[0] if isinstance(r, Message)]
    assert marked == [shown[1]]


def test_conversations_list_each_connection():
    packets = trace_packets()

    async def scenario(pilot, app):
        await pilot.press("C")
        text = _screen_text(app)
        for conn in (0, 1):
            mine = [p for p in packets if p.msg.conn == conn]
            assert f"\n{conn} │ " in text and f" │ {len(mine)} │ " in text
        await pilot.press("down", "enter")                     # connection 1's first message
        assert app.messages.entry() == next(p.number for p in packets if p.msg.conn == 1)
    run(scenario)


def test_R_replays_the_selected_connection_and_shows_divergences(tmp_path):
    server_sock = tmp_path / "s.sock"
    server = vfu("sample-server", "--listen", str(server_sock))
    wait_for_socket(server_sock, server)
    try:
        async def scenario(pilot, app):
            app.messages.go_to_number(5)
            await pilot.press("R", *str(server_sock), "enter")
            await until(pilot, lambda: "Replay of connection" in _screen_text(app))
            text = _screen_text(app)
            assert "requests sent" in text and "answers matched" in text and "Frame" in text
        run(scenario, ENDPOINTS)
    finally:
        stop(server)


def test_filter_errors_point_a_caret_at_the_problem_and_time_is_a_clock():
    async def scenario(pilot, app):
        await type_filter(pilot, "vfio_user.cmd == ", submit=False)
        error = str(app.query_one("#filter-error").render())
        assert error.index("^") == len("vfio_user.cmd == ") + 1 and "position" not in error
        await pilot.press("escape", "t", "t")
        row = app.messages.row(1)[0]
        assert re.search(r" \d\d:\d\d:\d\d\.\d{6} ", row), row
    run(scenario)


@pytest.mark.parametrize("size", [(80, 24), (200, 50)], ids=["80x24", "200x50"])
def test_snapshot_sizes(snap_compare, size):
    async def before(pilot):
        await loaded(pilot, pilot.app)
        await pilot.press("j", "j", "j")
        await pilot.pause(0.2)
    assert snap_compare(InspectApp(CaptureModel(TRACE)), terminal_size=size, run_before=before)


def test_interrupts_and_faults_are_rows_of_the_message_list(tmp_path):
    result, capture, _, _ = sample_session(tmp_path, [
        "--trace-irqs", "--fault", "vfio_user.cmd == DEVICE_RESET && frame.dir == s2c: delay 1ms"])
    assert result.returncode == 0, result.stderr

    async def main():
        app = InspectApp(CaptureModel(str(capture)))
        async with app.run_test(size=SIZE) as pilot:
            await loaded(pilot, app)
            entries = [app.messages.rows[i] for i in range(len(app.messages.rows))]
            rows = [app.messages.row(entry)[0] for entry in entries]
            assert any("irq: MSI-X vector 2, count 1" in row for row in rows)
            assert any("doorbell: BAR0 offset 0x28" in row for row in rows)
            fault = next(i for i, row in enumerate(rows) if "fault: DEVICE_RESET reply" in row)
            assert "DEVICE_RESET" in rows[fault + 1]
            packet = app.model.packet(entries[fault + 1])
            assert [e.id for e in packet.tree.experts] == ["fault.injected"]
    asyncio.run(main())
