"""The terminal UI, driven by textual's pilot on the sample capture and a live proxy."""

from __future__ import annotations

import asyncio
import os
import pty
import select
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from helpers import run_vfu, sample_session, stop, vfu, wait_for_socket
from vfu_inspect.capture import CLOSE, OPEN, CaptureWriter, Message, read_all
from vfu_inspect.dissect import Analyzer, find_responses
from vfu_inspect.dfilter import compile_filter
from vfu_inspect.dissectors.vfio_user import CMD
from vfu_inspect.tui.app import DetailTree, FilterBar, HexPane, InspectApp, MessageList
from vfu_inspect.tui.model import CaptureModel

ROOT = Path(__file__).resolve().parent.parent
TRACE = str(ROOT / "captures" / "libvfio-user-samples.vfucap")
SIZE = (160, 48)


def trace_packets() -> list:
    records, _ = read_all(TRACE)
    messages = [r for r in records if isinstance(r, Message)]
    return list(Analyzer(find_responses(messages)).run(messages))


async def loaded(pilot, app: InspectApp) -> None:
    """Wait until the background pass has read the whole capture."""
    for _ in range(200):
        if app.model.done:
            break
        await pilot.pause(0.02)
    await pilot.pause(0.3)          # one poll tick: the list learns the count


async def until(pilot, condition, seconds: float = 30) -> None:
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        await pilot.pause(0.05)
    raise AssertionError("condition not reached")


def run(test) -> None:
    """Run an async pilot scenario on a fresh app over the sample capture."""
    async def main():
        app = InspectApp(CaptureModel(TRACE))
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


def test_c_limits_the_list_to_one_connection():
    second = [p.number for p in trace_packets() if p.msg.conn == 1]

    async def scenario(pilot, app):
        app.messages.go_to_number(second[0])
        await pilot.press("c")
        await until(pilot, lambda: app.matches is not None)
        assert list(app.messages.rows) == second
        await pilot.press("c")                                   # again: back to all
        await until(pilot, lambda: app.matches is None)
    run(scenario)


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
        await pilot.press("G", "i")
        session = _screen_text(app)
        assert "Session state after message 344" in session
        assert "0x000000008000-0x000000008fff" in session and "SPARSE_MMAP" in session
        await pilot.press("escape", "question_mark")
        help_text = _screen_text(app)
        for binding in [*MessageList.BINDINGS, *app.BINDINGS]:
            assert binding.description in help_text
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


def test_demo_on_a_terminal_runs_the_tui_and_quits_on_q(tmp_path):
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
