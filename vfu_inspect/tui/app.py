"""The terminal UI: Wireshark's three panes, mitmproxy's keys, textual's widgets.

The message list is one widget that renders only the lines on screen
(textual's line API), whatever the capture's size; the detail tree and the
hex pane show the selected message; filtering runs on a worker thread.
"""

from __future__ import annotations

import bisect
import time
from array import array
from typing import Any, Sequence

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.geometry import Size
from textual.message import Message as TextualMessage
from textual.reactive import reactive
from textual.screen import ModalScreen
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widgets import DataTable, Footer, Input, Static, Tree
from textual.worker import get_current_worker

from ..capture import describe_event
from ..capture import TWIN
from ..dfilter import FilterError, compile_filter
from ..dissect import Dissected
from ..dissectors import vfio_user as proto
from ..fields import EXPERTS, PROTOCOL, SEVERITIES
from ..output import ARROWS, hex_rows
from ..tree import Item
from .model import NO_SEVERITY, CaptureModel

TIME_MODES = ("relative", "delta", "absolute")
SEVERITY_STYLES = [Style(color="red", bold=True), Style(color="yellow"), Style(color="cyan"),
                   Style(color="blue")]
REPLY_STYLE, SERVER_STYLE, EVENT_STYLE = Style(dim=True), Style(color="magenta"), Style(
    color="green", italic=True)
ERROR_STYLE = Style(color="red")
COLUMNS = (f"{'No.':>7} {'Time':>12} {'Conn':>6} {'Dir':3} {'Msg-ID':>6} {'Command':<24} "
           f"{'Type':<7} {'Len':>6} {'Fds':>3}  Info")
POLL_SECONDS = 0.25
PREFETCH_SPAN = 2048        # a filtered screen spread wider is dissected row by row


class AllRows(Sequence[int]):
    """Every message and connection event, in order, without building a list:
    a message is its number, an event is -(its index + 1)."""

    def __init__(self, model: CaptureModel) -> None:
        self.model = model
        self._positions: list[int] = []

    def __len__(self) -> int:
        return self.model.count + len(self.model.events)

    def __getitem__(self, index: int) -> int:        # type: ignore[override]
        positions = self._positions
        if len(positions) != len(self.model.events):
            positions = self._positions = [before + k for k, (before, _)
                                           in enumerate(self.model.events)]
        events_before = bisect.bisect_right(positions, index)
        if events_before and positions[events_before - 1] == index:
            return -events_before
        return index - events_before + 1

    def index_of(self, number: int) -> int:
        return number - 1 + sum(1 for before, _ in self.model.events if before < number)


class MessageList(ScrollView, can_focus=True):
    """The list pane: one line per row, rendered only when visible."""

    BINDINGS = [
        Binding("j,down", "move(1)", "down", show=False),
        Binding("k,up", "move(-1)", "up", show=False),
        Binding("pagedown", "page(1)", "page down", show=False),
        Binding("pageup", "page(-1)", "page up", show=False),
        Binding("g,home", "move_to(0)", "first", show=False),
        Binding("G,end", "last", "last", show=False),
    ]
    cursor = reactive(0)

    class Selected(TextualMessage):
        def __init__(self, entry: int) -> None:
            super().__init__()
            self.entry = entry

    def __init__(self, model: CaptureModel) -> None:
        super().__init__()
        self.model = model
        self.rows: Sequence[int] = AllRows(model)
        self.time_mode = TIME_MODES[0]
        self.marked: array | None = None       # matches shown in the full list

    def set_rows(self, rows: Sequence[int], keep: int | None = None) -> None:
        self.rows = rows
        self.virtual_size = Size(self.size.width, len(rows))
        self.cursor = min(self.cursor, max(len(rows) - 1, 0))
        if keep is not None:
            self.go_to_number(keep)
        self.refresh()
        self._announce()

    def grown(self) -> None:
        self.virtual_size = Size(self.size.width, len(self.rows))
        self.refresh()

    def entry(self) -> int | None:
        return self.rows[self.cursor] if 0 <= self.cursor < len(self.rows) else None

    def action_move(self, delta: int) -> None:
        self.action_move_to(self.cursor + delta)

    def action_page(self, direction: int) -> None:
        self.action_move(direction * max(self.scrollable_content_region.height - 1, 1))

    def action_last(self) -> None:
        self.action_move_to(len(self.rows) - 1)

    def action_move_to(self, index: int) -> None:
        if not len(self.rows):
            return
        self.cursor = max(0, min(index, len(self.rows) - 1))
        top, height = int(self.scroll_offset.y), self.scrollable_content_region.height
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False)
        elif self.cursor >= top + height:
            self.scroll_to(y=self.cursor - height + 1, animate=False)
        self.refresh()
        self._announce()

    def go_to_number(self, number: int) -> bool:
        """Select message `number` if the list shows it."""
        if isinstance(self.rows, AllRows):
            self.action_move_to(self.rows.index_of(number))
            return True
        i = bisect.bisect_left(self.rows, number)
        if i < len(self.rows) and self.rows[i] == number:
            self.action_move_to(i)
            return True
        return False

    def _announce(self) -> None:
        entry = self.entry()
        if entry is not None:
            self.post_message(self.Selected(entry))

    def on_click(self, event: Any) -> None:
        self.action_move_to(int(self.scroll_offset.y) + event.y)

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        index = int(self.scroll_offset.y) + y
        if index >= len(self.rows):
            return Strip.blank(width)
        top = int(self.scroll_offset.y)
        if y == 0 or index == top:
            self._prefetch(top, self.scrollable_content_region.height)
        text, style = self.row(self.rows[index])
        if index == self.cursor:
            style += Style(reverse=True)
        return Strip([Segment(text[:width].ljust(width), style)], width)

    def _prefetch(self, top: int, height: int) -> None:
        """Dissect the screenful in one go: one replay from the nearest checkpoint."""
        numbers = [e for e in (self.rows[i] for i in range(top, min(top + height, len(self.rows))))
                   if e > 0]
        if numbers and numbers[-1] - numbers[0] < PREFETCH_SPAN:
            self.model.packets(numbers[0], numbers[-1])

    def row(self, entry: int) -> tuple[str, Style]:
        if entry < 0:
            _, event = self.model.events[-entry - 1]
            return f"{'':>7} {describe_event(event)}", EVENT_STYLE
        p = self.model.packet(entry)
        return self.row_text(p), self.row_style(p)

    def row_text(self, p: Dissected) -> str:
        h, msg = p.header, p.msg
        when = {"relative": p.time_relative, "delta": p.time_delta,
                "absolute": msg.ts_ns / 1e9 % 86400}[self.time_mode]
        conn = f"{msg.conn}" + (":twin" if msg.channel == TWIN else "")
        info = p.tree.info + (f" [{p.latency * 1e6:.0f} µs]" if p.latency is not None else "")
        if p.tree.experts:
            info += f"  [{p.tree.worst_severity}: {p.tree.experts[0].message}]"
        mark = "▶" if self.marked is not None and _contains(self.marked, p.number) else " "
        return (f"{mark}{p.number:>6} {when:>12.6f} {conn:>6} {ARROWS[p.direction]:3} "
                f"{(f'{h.msg_id:#06x}' if h else '-'):>6} {(h.command_name if h else '?'):<24} "
                f"{(h.kind if h else 'short'):<7} {msg.wire_size:>6} {len(msg.fds):>3}  {info}")

    def row_style(self, p: Dissected) -> Style:
        severity = self.model.severity[p.number - 1]
        h = p.header
        if severity != NO_SEVERITY:
            return SEVERITY_STYLES[severity]
        if h is not None and h.kind == "error":
            return ERROR_STYLE
        if h is not None and not h.is_reply and h.cmd in proto.SERVER_COMMANDS:
            return SERVER_STYLE
        if h is not None and h.is_reply:
            return REPLY_STYLE
        return Style()


def _contains(numbers: array, number: int) -> bool:
    i = bisect.bisect_left(numbers, number)
    return i < len(numbers) and numbers[i] == number


class DetailTree(Tree[Item]):
    """Every field of the selected message; links and expert items included."""

    def show(self, p: Dissected) -> None:
        self.clear()
        self.root.set_label(f"Message {p.number}")
        for item in p.tree.items:
            self._add(self.root, item)
        if p.tree.experts:
            node = self.root.add("Expert Info", expand=True)
            for e in p.tree.experts:
                node.add_leaf(Text(f"{e.severity}: {e.message} [{e.id}]",
                                   style=SEVERITY_STYLES[SEVERITIES.index(e.severity)]))
        self.root.expand()

    def _add(self, parent: Any, item: Item) -> None:
        label = item.heading() if item.field.type == PROTOCOL \
            else f"{item.field.label}: {item.value_text()}"
        if item.children:
            node = parent.add(label, data=item, expand=item.field.type == PROTOCOL)
            for child in item.children:
                self._add(node, child)
        else:
            parent.add_leaf(label, data=item)


class HexPane(Static):
    """The bytes of the selected message, the selected field's highlighted."""

    text = Text()

    def show(self, data: bytes, start: int = -1, length: int = 0) -> None:
        self.text = text = Text()
        for off, cells, chars in hex_rows(data):
            text.append(f"{off:04x}  ")
            for i, cell in enumerate(cells):
                text.append(cell, _hex_style(off + i, start, length))
                text.append(" ")
            text.append("   " * (16 - len(cells)) + " ")
            for i, char in enumerate(chars):
                text.append(char, _hex_style(off + i, start, length))
            text.append("\n")
        self.update(text)


def _hex_style(offset: int, start: int, length: int) -> Style:
    return Style(reverse=True, bold=True) if start <= offset < start + length else Style()


class FilterBar(Input):
    """The display filter, with history on up/down."""

    BINDINGS = [Binding("up", "history(-1)", show=False), Binding("down", "history(1)", show=False)]

    def __init__(self) -> None:
        super().__init__(placeholder="display filter, e.g. vfio_user.cmd == DMA_MAP "
                                     "(Enter applies, Esc leaves)", id="filter")
        self.history: list[str] = []
        self.position = 0

    def remember(self, text: str) -> None:
        if text and (not self.history or self.history[-1] != text):
            self.history.append(text)
        self.position = len(self.history)

    def action_history(self, step: int) -> None:
        if self.history:
            self.position = max(0, min(self.position + step, len(self.history)))
            self.value = self.history[self.position] if self.position < len(self.history) else ""


class TextScreen(ModalScreen[None]):
    """A full-screen text page (help, session state); any key listed closes it."""

    BINDINGS = [Binding("escape,q", "dismiss", "close")]

    def __init__(self, title: str, body: Text | str) -> None:
        super().__init__()
        self.title_text, self.body = title, body

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="page"):
            yield Static(Text(self.title_text, style="bold"))
            yield Static(self.body)
        yield Footer()


class TableScreen(ModalScreen[int | None]):
    """Tables (statistics, expert info); Enter on a row with a frame jumps to it."""

    BINDINGS = [Binding("escape,q", "dismiss", "close")]

    def __init__(self, title: str, tables: list[tuple[str, tuple[str, ...], list[tuple]]]
                 ) -> None:
        super().__init__()
        self.title_text, self.tables = title, tables

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="page"):
            yield Static(Text(self.title_text, style="bold"))
            for caption, headers, rows in self.tables:
                yield Static(Text(caption, style="bold underline"))
                table: DataTable = DataTable(cursor_type="row", zebra_stripes=True)
                table.add_columns(*headers)
                for row in rows:
                    table.add_row(*(str(cell) for cell in row[:len(headers)]),
                                  key=str(row[-1]) if len(row) > len(headers) else None)
                yield table
        yield Footer()

    def on_mount(self) -> None:
        self.query(DataTable).first().focus()

    @on(DataTable.RowSelected)
    def jump(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value is not None:
            self.dismiss(int(event.row_key.value))


class InspectApp(App[None]):
    """`vfu-inspect tui`: browse a capture or a live proxy."""

    TITLE = "vfu-inspect"
    CSS = """
    MessageList { height: 2fr; border: solid $primary; }
    #panes { height: 3fr; }
    DetailTree { width: 1fr; border: solid $secondary; }
    #hex-scroll { width: 80; border: solid $secondary; }
    #columns { height: 1; color: $text-muted; }
    #status { height: 1; background: $boost; }
    FilterBar.-invalid { border: tall $error; }
    .page { padding: 1 2; }
    """
    BINDINGS = [
        Binding("q", "quit", "quit"),
        Binding("question_mark", "help", "help"),
        Binding("slash", "edit_filter", "filter"),
        Binding("n", "match(1)", "next match"),
        Binding("N", "match(-1)", "previous match", show=False),
        Binding("r", "partner", "request↔reply"),
        Binding("c", "connection", "this connection"),
        Binding("v", "view", "matches only / all"),
        Binding("t", "time", "time format"),
        Binding("f", "follow", "follow"),
        Binding("s", "statistics", "statistics"),
        Binding("x", "experts", "expert info"),
        Binding("i", "session", "session"),
        Binding("escape", "leave_filter", "back to the list", show=False),
    ]

    def __init__(self, model: CaptureModel, follow: bool = False) -> None:
        super().__init__()
        self.model = model
        self.follow = follow
        self.filter_text = ""
        self.matches: array | None = None
        self.matches_only = True
        self.progress = ""
        self._seen = (-1, -1)

    def compose(self) -> ComposeResult:
        # Kept as attributes: a modal screen on top must not hide them from updates.
        self.filter_bar, self.messages = FilterBar(), MessageList(self.model)
        self.detail, self.hex = DetailTree("message"), HexPane(id="hex")
        self.status = Static("", id="status")
        yield self.filter_bar
        yield Static(COLUMNS, id="columns")
        yield self.messages
        with Horizontal(id="panes"):
            yield self.detail
            with VerticalScroll(id="hex-scroll"):
                yield self.hex
        yield self.status
        yield Footer()

    def on_mount(self) -> None:
        self.model.start()
        self.set_interval(POLL_SECONDS, self.poll)
        self.messages.focus()
        self.poll()

    def on_unmount(self) -> None:
        self.model.close()

    def poll(self) -> None:
        """New messages or events: grow the list (and follow it)."""
        seen = (self.model.count, len(self.model.events))
        if seen != self._seen:
            first = self._seen[0] <= 0
            self._seen = seen
            if self.matches is None or not self.matches_only:
                self.messages.grown()
            if self.follow:
                self.messages.action_move_to(len(self.messages.rows) - 1)
            elif first and self.model.count:
                self.messages.action_move_to(0)
        self.update_status()

    def update_status(self) -> None:
        total = self.model.count
        shown = len(self.matches) if self.matches is not None else total
        state = "live" if self.model.live else ("reading…" if not self.model.done else "")
        parts = [f"{shown:,}/{total:,} shown", state, self.progress,
                 f"time: {self.messages.time_mode}", "follow: on" if self.follow else "",
                 f"filter: {self.filter_text}" if self.filter_text else "",
                 self.model.damage or ""]
        self.status.update("  ".join(p for p in parts if p))

    # --- selection -----------------------------------------------------------------------

    @on(MessageList.Selected)
    def selected(self, event: MessageList.Selected) -> None:
        if event.entry > 0:
            p = self.model.packet(event.entry)
            self.detail.show(p)
            self.hex.show(p.msg.data)

    @on(Tree.NodeHighlighted)
    def highlight_field(self, event: Tree.NodeHighlighted) -> None:
        item, entry = event.node.data, self.messages.entry()
        if isinstance(item, Item) and entry and entry > 0:
            self.hex.show(self.model.packet(entry).msg.data, item.offset,
                                         item.length)

    @on(Tree.NodeSelected)
    def follow_link(self, event: Tree.NodeSelected) -> None:
        item = event.node.data
        if isinstance(item, Item) and item.field.name in ("vfio_user.response_in",
                                                         "vfio_user.response_to"):
            self.jump(item.value)

    def jump(self, number: int) -> None:
        if not self.messages.go_to_number(number):
            self.notify(f"message {number} is hidden by the filter", severity="warning")
        self.messages.focus()

    # --- filter -------------------------------------------------------------------------

    def action_edit_filter(self) -> None:
        self.filter_bar.focus()

    def action_leave_filter(self) -> None:
        self.messages.focus()

    @on(Input.Changed, "#filter")
    def validate(self, event: Input.Changed) -> None:
        bar = self.filter_bar
        try:
            if event.value.strip():
                compile_filter(event.value)
            bar.remove_class("-invalid")
            bar.tooltip = None
        except FilterError as exc:
            bar.add_class("-invalid")
            bar.tooltip = str(exc)
            self.progress = f"invalid filter: {exc} (at {exc.position})"
            self.update_status()
            return
        self.progress = ""
        self.update_status()

    @on(Input.Submitted, "#filter")
    def submit(self, event: Input.Submitted) -> None:
        self.apply_filter(event.value.strip())

    def apply_filter(self, text: str) -> None:
        bar = self.filter_bar
        bar.remember(text)
        bar.value = text
        if not text:
            self.filter_text, self.matches = "", None
            self.messages.marked = None
            self._show_rows()
            return
        try:
            display = compile_filter(text)
        except FilterError as exc:
            self.progress = f"invalid filter: {exc} (at {exc.position})"   # list unchanged
            self.update_status()
            return
        self.run_filter(text, display)

    @work(thread=True, exclusive=True, group="filter")
    def run_filter(self, text: str, display: Any) -> None:
        worker, started = get_current_worker(), time.monotonic()
        total = self.model.count

        def progress(number: int) -> bool:
            self.call_from_thread(self._progress, f"filtering {number * 100 // max(total, 1)}%")
            return not worker.is_cancelled

        found = self.model.matches(display, progress)
        if found is not None:
            self.call_from_thread(self._filtered, text, found, time.monotonic() - started)

    def _progress(self, text: str) -> None:
        self.progress = text
        self.update_status()

    def _filtered(self, text: str, found: array, seconds: float) -> None:
        self.filter_text, self.matches = text, found
        self.progress = f"filtered in {seconds:.1f} s"
        self._show_rows()
        self.messages.focus()

    def _show_rows(self) -> None:
        entry = self.messages.entry()
        keep = entry if entry and entry > 0 else None
        if self.matches is not None and self.matches_only:
            self.messages.marked = None
            self.messages.set_rows(self.matches)
            if keep:
                self.messages.go_to_number(keep) or self.messages.action_move_to(
                    bisect.bisect_left(self.matches, keep))
        else:
            self.messages.marked = self.matches
            self.messages.set_rows(AllRows(self.model), keep=keep)
        self.update_status()

    # --- navigation ---------------------------------------------------------------------

    def action_match(self, step: int) -> None:
        """Next/previous message the filter selects, also when all are shown."""
        entry = self.messages.entry()
        if self.matches is None or not len(self.matches) or entry is None:
            self.notify("no filter applied", severity="warning")
            return
        number = entry if entry > 0 else 0
        i = bisect.bisect_right(self.matches, number) if step > 0 else \
            bisect.bisect_left(self.matches, number) - 1
        if 0 <= i < len(self.matches):
            self.messages.go_to_number(self.matches[i])

    def action_partner(self) -> None:
        entry = self.messages.entry()
        if not entry or entry < 0:
            return
        partner = self.model.request_of[entry - 1] or self.model.response_of[entry - 1]
        if partner:
            self.jump(partner)
        else:
            self.notify("no matching request or reply", severity="warning")

    def action_connection(self) -> None:
        entry = self.messages.entry()
        limit = f"frame.conn == {self.model.columns['conn'][entry - 1]}" \
            if entry and entry > 0 else ""
        self.apply_filter("" if self.filter_text == limit else limit)

    def action_view(self) -> None:
        self.matches_only = not self.matches_only
        self._show_rows()

    def action_time(self) -> None:
        self.messages.time_mode = TIME_MODES[(TIME_MODES.index(self.messages.time_mode) + 1)
                                             % len(TIME_MODES)]
        self.messages.refresh()
        self.update_status()

    def action_follow(self) -> None:
        self.follow = not self.follow
        if self.follow:
            self.messages.action_last()
        self.update_status()

    # --- screens ------------------------------------------------------------------------

    def action_help(self) -> None:
        lines = [f"{b.key.replace(',', ' / '):<22} {b.description or b.action}"
                 for b in [*MessageList.BINDINGS, *self.BINDINGS]]
        lines += ["", "In the filter bar: Enter applies, up/down walk the history, "
                      "Esc returns to the list.",
                  "In the detail tree: Enter on 'Response in' / 'Request in' jumps there.",
                  "The mouse selects messages and tree nodes."]
        self.push_screen(TextScreen("Keys", "\n".join(lines)))

    def action_statistics(self) -> None:
        st = self.model.stats
        rows = []
        for cmd in sorted(st.count):
            lat = st.latency_row(cmd)
            cells = ["-"] * 4 if lat is None else [f"{v * 1e6:.0f} µs" for v in lat]
            rows.append((proto.COMMANDS.get(cmd, f"CMD_{cmd}"), st.count[cmd], st.bytes[cmd],
                         sum(n for (c, _), n in st.errors.items() if c == cmd), *cells))
        errors = [(proto.COMMANDS.get(cmd, cmd), proto.ERRNO_NAMES.get(err, err), n)
                  for (cmd, err), n in sorted(st.errors.items())]
        self.push_screen(TableScreen(f"Statistics: {self.model.count:,} messages", [
            ("Per command (and its replies); latency = Service Response Time",
             ("Command", "Messages", "Bytes", "Errors", "Min", "Median", "p99", "Max"), rows),
            ("Error replies by errno", ("Command", "Errno", "Count"), errors)]))

    def action_experts(self) -> None:
        st = self.model.stats
        rows = [(severity, EXPERTS[eid].group, eid, n, EXPERTS[eid].summary,
                 st.first_expert[eid], st.first_expert[eid])
                for (severity, eid), n in sorted(st.experts.items(),
                                                 key=lambda kv: SEVERITIES.index(kv[0][0]))]
        self.push_screen(TableScreen("Expert information (Enter jumps to the first)", [
            ("", ("Severity", "Group", "Id", "Count", "Summary", "First"), rows)]), self._jump_to)

    def _jump_to(self, number: int | None) -> None:
        if number:
            self.jump(number)

    def action_session(self) -> None:
        entry = self.messages.entry()
        if not entry or entry < 0:
            return
        snapshot = self.model.session_at(entry)
        conn = self.model.columns["conn"][entry - 1]
        text = Text()
        for c, state in sorted(snapshot.connections.items(), key=lambda kv: kv[0] != conn):
            text.append(f"Connection {c}{' (closed)' if state.closed else ''}\n", style="bold")
            for title, lines in state.sections(snapshot.ts_ns):
                text.append(f"  {title}\n", style="underline")
                text.append("".join(f"    {line}\n" for line in lines))
        self.push_screen(TextScreen(f"Session state after message {entry}", text))
