"""The terminal UI: Wireshark's three panes, mitmproxy's keys, textual's widgets.

The message list is one widget that renders only the lines on screen
(textual's line API), whatever the capture's size; the detail tree and the
hex pane show the selected message.  Filters, the session screen, saving and
replay run on worker threads and can be cancelled; a filter stays live as
messages arrive.
"""

from __future__ import annotations

import asyncio
import bisect
import io
import json
import time
from array import array
from dataclasses import dataclass
from typing import Any, Sequence

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import on, work
from textual.actions import SkipAction
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.geometry import Size
from textual.message import Message as TextualMessage
from textual.reactive import reactive
from textual.screen import ModalScreen
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.theme import BUILTIN_THEMES, Theme
from textual.widgets import DataTable, Footer, Input, Static, Tree
from textual.worker import get_current_worker

from ..dfilter import FilterError, compile_filter
from ..dissectors import vfio_user as proto
from ..events import describe_event
from ..fields import BOOL, BYTES, EXPERTS, FLOAT, PROTOCOL, SEVERITIES, STRING
from ..output import hex_rows, row_kind, summary_columns
from ..packet import Dissected
from ..records import EVENT_NAMES, Event
from ..tree import Item
from .model import CaptureModel, Cancelled, LiveFilter

TIME_MODES = ("relative", "delta", "absolute")
COLUMNS = (f"{'No.':>7} {'Time':>15} {'Conn':>6} {'Dir':3} {'Msg-ID':>6} {'Command':<24} "
           f"{'Type':<7} {'Len':>6} {'Fds':>3}  Info")
ROW_WIDTH = 320             # how far the list scrolls right: long Info columns
POLL_SECONDS = 0.25
FIRST_POLL = 0.05
KEYS_SETTLE = 0.5          # seconds a focus-moving key waits for the keys before it
PREFETCH_SPAN = 2048        # a filtered screen spread wider is dissected row by row
WIDE_HEX = 150              # from this terminal width the hex pane shows 16 bytes a row
DETACH, STOP = "detach", "stop"


def row_palette(theme: Theme) -> dict[str, Style]:
    """Row and expert styles from the theme's colours, so a light theme works too."""
    background = theme.background or ("#000000" if theme.dark else "#ffffff")
    return {"error": Style(color=background, bgcolor=theme.error, bold=True),
            "warning": Style(color=theme.warning, bold=True),
            "note": Style(italic=True), "chat": Style(dim=True),
            "error_reply": Style(color=theme.error),
            "server": Style(color=theme.primary, bold=True),
            "event": Style(color=theme.success, italic=True),
            "reply": Style(dim=True), "normal": Style(),
            "mark": Style(underline=True)}


def clock_time(ts_ns: int) -> str:
    """Local wall-clock time with microseconds."""
    return time.strftime("%H:%M:%S", time.localtime(ts_ns // 1_000_000_000)) + \
        f".{ts_ns // 1000 % 1_000_000:06d}"


class AllRows(Sequence[int]):
    """Every message and connection event, in order, without building a list:
    a message is its number, an event is -(its index + 1)."""

    def __init__(self, model: CaptureModel) -> None:
        self.model = model
        self._positions: list[int] = []

    def __len__(self) -> int:
        return self.model.count + len(self.model.events)

    def __getitem__(self, index: int) -> int:        # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(index)
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
        Binding("h,left", "sideways(-8)", "scroll left", show=False),
        Binding("l,right", "sideways(8)", "scroll right", show=False),
    ]
    cursor = reactive(0)

    class Selected(TextualMessage):
        def __init__(self, entry: int, by_user: bool) -> None:
            super().__init__()
            self.entry, self.by_user = entry, by_user

    def __init__(self, model: CaptureModel, header: Static) -> None:
        super().__init__()
        self.model, self.header = model, header
        self.rows: Sequence[int] = AllRows(model)
        self.time_mode = TIME_MODES[0]
        self.matched: array | None = None      # filter matches, shown ▶ in the full list
        self.marks: set[int] = set()           # the user's marks (m)
        self.palette = row_palette(BUILTIN_THEMES["textual-dark"])

    def set_rows(self, rows: Sequence[int], keep: int | None = None) -> None:
        self.rows = rows
        self.virtual_size = Size(ROW_WIDTH, len(rows))
        self.cursor = min(self.cursor, max(len(rows) - 1, 0))
        if keep is None or not self.go_to_number(keep, by_user=False):
            self.select(self.cursor, by_user=False)
        self.refresh()

    def grown(self) -> None:
        self.virtual_size = Size(ROW_WIDTH, len(self.rows))
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
        self.select(index, by_user=True)

    def action_sideways(self, columns: int) -> None:
        self.scroll_to(x=max(0, self.scroll_offset.x + columns), animate=False)

    def watch_scroll_x(self, old: float, new: float) -> None:
        super().watch_scroll_x(old, new)
        self.header.update(COLUMNS[int(new):])

    def select(self, index: int, by_user: bool) -> None:
        if not len(self.rows):
            return
        self.cursor = max(0, min(index, len(self.rows) - 1))
        top, height = int(self.scroll_offset.y), self.scrollable_content_region.height
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False)
        elif self.cursor >= top + height:
            self.scroll_to(y=self.cursor - height + 1, animate=False)
        self.refresh()
        entry = self.entry()
        if entry is not None:
            self.post_message(self.Selected(entry, by_user))

    def go_to_number(self, number: int, by_user: bool = True) -> bool:
        """Select message `number` if the list shows it."""
        if isinstance(self.rows, AllRows):
            if not 0 < number <= self.model.count:
                return False
            self.select(self.rows.index_of(number), by_user)
            return True
        i = bisect.bisect_left(self.rows, number)
        if i < len(self.rows) and self.rows[i] == number:
            self.select(i, by_user)
            return True
        return False

    def on_click(self, event: Any) -> None:
        self.action_move_to(int(self.scroll_offset.y) + event.y)

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        top = int(self.scroll_offset.y)
        index = top + y
        if index >= len(self.rows):
            text = "  (no messages yet)" if y == 0 and not self.model.count else ""
            return Strip([Segment(text.ljust(width))], width)
        if y == 0:
            self._prefetch(top, self.scrollable_content_region.height)
        text, style = self.row(self.rows[index])
        if index == self.cursor:
            style += Style(reverse=True)
        left = int(self.scroll_offset.x)
        return Strip([Segment(text[left:left + width].ljust(width), style)], width)

    def _prefetch(self, top: int, height: int) -> None:
        """Dissect the screenful in one go: one replay from the nearest checkpoint."""
        numbers = [e for e in (self.rows[i] for i in range(top, min(top + height, len(self.rows))))
                   if e > 0]
        if numbers and numbers[-1] - numbers[0] < PREFETCH_SPAN:
            self.model.packets(numbers[0], numbers[-1])

    def visible(self, number: int) -> bool:
        top = int(self.scroll_offset.y)
        return any(self.rows[i] == number for i in range(
            top, min(top + self.scrollable_content_region.height, len(self.rows))))

    def row(self, entry: int) -> tuple[str, Style]:
        if entry < 0:
            _, event = self.model.events[-entry - 1]
            return f"{'':>7} {describe_event(event)}", self.palette["event"]
        p = self.model.packet(entry)
        style = self.row_style(p)
        if entry in self.marks:
            style += self.palette["mark"]
        return self.row_text(p), style

    def row_text(self, p: Dissected) -> str:
        when = {"relative": f"{p.time_relative:>15.6f}", "delta": f"{p.time_delta:>15.6f}",
                "absolute": clock_time(p.msg.ts_ns)}[self.time_mode]
        mark = "▶" if self.matched is not None and _contains(self.matched, p.number) else \
            ("●" if p.number in self.marks else " ")
        return f"{mark}{p.number:>6} {when:>15} {summary_columns(p)}"

    def row_style(self, p: Dissected) -> Style:
        return self.palette[row_kind(p)]


def _contains(numbers: array, number: int) -> bool:
    i = bisect.bisect_left(numbers, number)
    return i < len(numbers) and numbers[i] == number


def filter_expression(item: Item) -> str:
    """The display filter that selects messages with this field's value."""
    fd, value, name = item.field, item.value, item.field.name
    if fd.type == PROTOCOL or value is None or (fd.type == BOOL and value):
        return name
    if fd.type == BOOL:
        return f"!{name}"
    if fd.type == STRING:
        return f"{name} == {json.dumps(str(value), ensure_ascii=False)}"
    if fd.type == BYTES:
        return f"{name} == {bytes(value).hex(':')}" if value else name
    if fd.type == FLOAT:
        return f"{name} == {value!r}"
    symbol = fd.values.get(value) if fd.values else None
    return f"{name} == {symbol if symbol and ' ' not in symbol else value}"


class DetailTree(Tree[Item]):
    """Every field of the selected message; links and expert items included."""

    BINDINGS = [
        Binding("y", "copy(False)", "copy value"),
        Binding("Y", "copy(True)", "copy as filter"),
        Binding("a", "apply(False)", "apply as filter"),
        Binding("A", "apply(True)", "and-apply as filter"),
    ]

    class ApplyFilter(TextualMessage):
        def __init__(self, expression: str, combine: bool) -> None:
            super().__init__()
            self.expression, self.combine = expression, combine

    def show(self, p: Dissected, palette: dict[str, Style]) -> None:
        self.clear()
        self.root.set_label(f"Message {p.number}")
        for item in p.tree.items:
            self._add(self.root, item)
        if p.tree.experts:
            node = self.root.add("Expert Info", expand=True)
            for e in p.tree.experts:
                node.add_leaf(Text(f"{e.severity}: {e.message} [{e.id}]",
                                   style=palette[e.severity]))
        self.root.expand()

    def show_event(self, event: Event) -> None:
        self.clear()
        self.root.set_label(f"Event: connection {event.conn} {EVENT_NAMES[event.kind]}")
        self.root.add_leaf(f"Time: {clock_time(event.ts_ns)}")
        for key, value in event.info.items():
            self.root.add_leaf(f"{key}: {value}")
        self.root.expand()

    def _add(self, parent: Any, item: Item) -> None:
        label = item.line()
        if item.children:
            node = parent.add(label, data=item, expand=item.field.type == PROTOCOL)
            for child in item.children:
                self._add(node, child)
        else:
            parent.add_leaf(label, data=item)

    def selected_item(self) -> Item | None:
        node = self.cursor_node
        return node.data if node is not None and isinstance(node.data, Item) else None

    def action_copy(self, as_filter: bool) -> None:
        item = self.selected_item()
        if item is None:
            self.notify("select a field first", severity="warning")
            return
        text = filter_expression(item) if as_filter else item.value_text()
        self.app.copy_to_clipboard(text)
        self.notify(f"copied: {text}")

    def action_apply(self, combine: bool) -> None:
        item = self.selected_item()
        if item is None:
            self.notify("select a field first", severity="warning")
            return
        self.post_message(self.ApplyFilter(filter_expression(item), combine))

    def search(self, text: str) -> bool:
        """Move to the next node whose label contains `text`, wrapping around."""
        nodes = list(_walk(self.root))
        start = self.cursor_line + 1 if self.cursor_node is not None else 0
        needle = text.lower()
        order = [n for n in nodes if n.line >= start] + [n for n in nodes if 0 <= n.line < start]
        for node in order + [n for n in nodes if n.line < 0]:
            if needle in str(node.label).lower():
                parent = node.parent
                while parent is not None:
                    parent.expand()
                    parent = parent.parent
                self.move_cursor(node)
                return True
        return False


def _walk(node: Any) -> Any:
    yield node
    for child in node.children:
        yield from _walk(child)


class HexPane(Static):
    """The bytes of the selected message, the selected field's highlighted."""

    text = Text()
    per_row = 16
    data = b""
    lit = (-1, 0)        # the highlighted bytes: start, length

    def show(self, data: bytes, start: int = -1, length: int = 0) -> None:
        self.data, self.lit = data, (start, length)
        self.text = text = Text()
        width = self.per_row
        for off, cells, chars in hex_rows(data, width):
            text.append(f"{off:04x}  ")
            for i, cell in enumerate(cells):
                text.append(cell, _hex_style(off + i, start, length))
                text.append(" ")
            text.append("   " * (width - len(cells)) + " ")
            for i, char in enumerate(chars):
                text.append(char, _hex_style(off + i, start, length))
            text.append("\n")
        self.update(text)

    def search(self, text: str) -> bool:
        """Highlight the next occurrence of `text` (hex bytes, or else characters)."""
        data = self.data
        try:
            needle = bytes.fromhex(text.replace(":", " "))
        except ValueError:
            needle = text.encode()
        start = self.lit[0] + 1 if self.lit[1] == len(needle) else 0
        found = data.find(needle, start) if needle else -1
        if found < 0 and start:
            found = data.find(needle)
        if found < 0:
            return False
        self.show(data, found, len(needle))
        return True


def _hex_style(offset: int, start: int, length: int) -> Style:
    return Style(reverse=True, bold=True) if start <= offset < start + length else Style()


class FilterBar(Input):
    """The display filter, with history on up/down."""

    BINDINGS = [Binding("up", "history(-1)", "older filter", show=False),
                Binding("down", "history(1)", "newer filter", show=False)]

    def __init__(self) -> None:
        super().__init__(placeholder="/ display filter, e.g. vfio_user.cmd == DMA_MAP "
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
    """A full-screen text page (help, session state); Esc or q closes it."""

    BINDINGS = [Binding("escape,q", "dismiss", "close")]

    def __init__(self, title: str, body: Text | str) -> None:
        super().__init__()
        self.title_text, self.body = title, body

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="page"):
            yield Static(Text(self.title_text, style="bold"), id="title")
            yield Static(self.body, id="body")
        yield Footer()

    def fill(self, title: str, body: Text | str) -> None:
        if not self.is_attached:
            return                # closed before the worker finished
        self.query_one("#title", Static).update(Text(title, style="bold"))
        self.query_one("#body", Static).update(body)


class SessionScreen(TextScreen):
    """The session state, filled in by a worker; closing it cancels the worker."""

    def on_unmount(self) -> None:
        self.app.workers.cancel_group(self.app, "session")


class TableScreen(ModalScreen[int | None]):
    """Tables (statistics, expert info, conversations); Enter on a row with a
    frame jumps to it."""

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
                for i, row in enumerate(rows):     # a frame may have several rows
                    table.add_row(*(str(cell) for cell in row[:len(headers)]),
                                  key=f"{i}:{row[-1]}" if len(row) > len(headers) else None)
                yield table
        yield Footer()

    def on_mount(self) -> None:
        self.query(DataTable).first().focus()

    @on(DataTable.RowSelected)
    def jump(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value is not None:
            self.dismiss(int(event.row_key.value.split(":")[1]))


class PromptScreen(ModalScreen[str | None]):
    """One line of input (go to, search, save, replay); Enter gives it, Esc cancels."""

    BINDINGS = [Binding("escape", "dismiss", "cancel")]

    def __init__(self, label: str, value: str = "") -> None:
        super().__init__()
        self.label, self.value = label, value

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.label)
            yield Input(self.value, id="prompt")

    @on(Input.Submitted, "#prompt")
    def submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)


class QuitScreen(ModalScreen[str | None]):
    """Quitting with a live proxy: keep relaying without the UI, or stop it."""

    BINDINGS = [Binding("d", "choose('detach')", "detach: keep relaying"),
                Binding("s", "choose('stop')", "stop the proxy"),
                Binding("escape,n", "dismiss", "cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(Text("A proxy is relaying through this UI.", style="bold"))
            yield Static("d  detach: quit the UI, keep relaying (Ctrl-C then stops it)\n"
                         "s  stop the proxy: its connections close now\n"
                         "Esc  stay")
        yield Footer()

    def action_choose(self, choice: str) -> None:
        self.dismiss(choice)


@dataclass(frozen=True)
class View:
    """What the list shows: a filter, a connection limit, matches only or all."""

    filter_text: str = ""
    conn: int | None = None
    matches_only: bool = True

    def filters(self) -> tuple[str, str]:
        """(the filter of the rows shown, the filter whose matches are marked ▶)."""
        limit = f"frame.conn == {self.conn}" if self.conn is not None else ""
        text = self.filter_text
        if not text:
            return limit, ""
        if not self.matches_only:
            return limit, text
        return (f"({text}) && {limit}" if limit else text), ""


class InspectApp(App[str | None]):
    """`vfu-inspect tui`: browse a capture or a live proxy."""

    TITLE = "vfu-inspect"
    CSS = """
    FilterBar { border: none; height: 1; padding: 0 1; }
    FilterBar.-invalid { background: $error 25%; }
    #filter-error { height: auto; color: $error; display: none; }
    #filter-error.-shown { display: block; }
    #columns { height: 1; color: $text-muted; }
    MessageList { height: 1fr; }
    #panes { height: 1fr; }
    DetailTree { width: 1fr; border: solid $secondary; }
    #hex-scroll { width: 76; border: solid $secondary; }
    #hex-scroll.-narrow { width: 44; }
    #status { height: 1; background: $boost; }
    .page { padding: 1 2; }
    .dialog { width: 72; height: auto; border: thick $primary; padding: 1 2;
              background: $surface; }
    QuitScreen, PromptScreen { align: center middle; }
    """
    BINDINGS = [
        Binding("q", "quit", "quit"),
        Binding("question_mark", "help", "help"),
        # Priority: the app acts on these keys before it routes the next one, so
        # keys typed in one burst go where the focus moves ("/dma" is a filter).
        Binding("slash", "edit_filter", "filter", priority=True),
        Binding("enter", "submit_filter", "apply the filter", show=False, priority=True),
        Binding("escape", "escape", "back to the list / cancel the filter", show=False,
                priority=True),
        Binding("n", "match(1)", "next match"),
        Binding("N", "match(-1)", "previous match", show=False),
        Binding("colon,ctrl+g", "go_to", "go to message"),
        Binding("m", "mark", "mark", show=False),
        Binding("right_square_bracket", "next_mark(1)", "next mark", show=False),
        Binding("left_square_bracket", "next_mark(-1)", "previous mark", show=False),
        Binding("r", "partner", "request↔reply"),
        Binding("c", "connection", "this connection"),
        Binding("v", "view", "matches only / all"),
        Binding("t", "time", "time format", show=False),
        Binding("f", "follow", "follow"),
        Binding("ctrl+f", "search", "search detail/hex", show=False),
        Binding("w", "save(False)", "save shown", show=False),
        Binding("W", "save(True)", "save marked", show=False),
        Binding("s", "statistics", "statistics"),
        Binding("x", "experts", "expert info"),
        Binding("C", "conversations", "conversations", show=False),
        Binding("i", "session", "session"),
        Binding("R", "replay", "replay", show=False),
        Binding("d", "toggle_pane('detail')", "detail pane on/off", show=False),
        Binding("b", "toggle_pane('hex-scroll')", "bytes pane on/off", show=False),
        Binding("plus,equals_sign", "resize(1)", "larger list", show=False),
        Binding("minus", "resize(-1)", "smaller list", show=False),
    ]

    def __init__(self, model: CaptureModel, follow: bool = False,
                 live_proxy: bool = False) -> None:
        super().__init__()
        self.model = model
        self.follow = follow
        self.live_proxy = live_proxy
        self.view = View()
        self.pending: View | None = None       # being computed; the list shows `view`
        self.live: dict[str, LiveFilter] = {}
        self.progress = ""
        self.last_search = ""
        self.list_share = 2
        self._seen = (0, 0)
        self._filtering = False

    # kept for the tests and the status: the user's filter, and what it selects
    @property
    def filter_text(self) -> str:
        return self.view.filter_text

    @property
    def matches(self) -> array | None:
        live = self.live.get(self.view.filter_text) if self.view.filter_text else None
        return live.matches if live is not None else None

    def compose(self) -> ComposeResult:
        # Kept as attributes: a modal screen on top must not hide them from updates.
        self.filter_bar, self.filter_error = FilterBar(), Static("", id="filter-error")
        header = Static(COLUMNS, id="columns")
        self.messages = MessageList(self.model, header)
        self.detail, self.hex = DetailTree("message", id="detail"), HexPane(id="hex")
        self.status = Static("", id="status")
        yield self.filter_bar
        yield self.filter_error
        yield header
        yield self.messages
        with Horizontal(id="panes"):
            yield self.detail
            with VerticalScroll(id="hex-scroll"):
                yield self.hex
        yield self.status
        yield Footer()

    def on_mount(self) -> None:
        self.theme_changed_signal.subscribe(self, lambda _: self._apply_theme())
        self._apply_theme()
        self.model.start(first_screen=self.size.height)
        self.set_interval(POLL_SECONDS, self.poll)
        self.set_timer(FIRST_POLL, self.poll)   # the first screenful is read by then
        self.messages.focus()
        self.poll()

    def on_unmount(self) -> None:
        self.model.close()

    def on_resize(self) -> None:
        narrow = self.size.width < WIDE_HEX
        self.query_one("#hex-scroll").set_class(narrow, "-narrow")
        per_row = 8 if narrow else 16
        if per_row != self.hex.per_row:
            self.hex.per_row = per_row
            self.hex.show(self.hex.data, *self.hex.lit)

    def _apply_theme(self) -> None:
        self.messages.palette = row_palette(self.current_theme)
        self.messages.refresh()

    def poll(self) -> None:
        """New messages or events: grow the list (and follow it), bring the
        filters up to date, redo what the new replies change."""
        seen = (self.model.count, len(self.model.events))
        if seen != self._seen:
            first = self._seen[0] == 0
            self._relinked(self._seen[0] + 1, seen[0])
            self._seen = seen
            if isinstance(self.messages.rows, AllRows):
                self.messages.grown()
            if self.follow:
                self.messages.select(len(self.messages.rows) - 1, by_user=False)
            elif first and self.model.count:
                self.messages.select(0, by_user=False)
            if first and self.model.count:
                self.call_after_refresh(self.model.shown)
        self._advance_filters()
        self.update_status()

    def _relinked(self, first: int, last: int) -> None:
        """Replies first..last answer earlier requests: their rows and detail
        (links, the 'no reply' warning) are dissected again."""
        if first > last:
            return
        changed = self.model.forget(self.model.answered_before(first, last))
        if any(self.messages.visible(n) for n in changed):
            self.messages.refresh()
        if self.messages.entry() in changed:
            self._show_entry(self.messages.entry())

    def update_status(self) -> None:
        total = self.model.count
        state, damage = self.model.status()
        shown_filter = self.view.filters()[0]
        shown = len(self.live[shown_filter].matches) if shown_filter else total
        marked = self.view.filters()[1]
        parts = [f"{shown:,}/{total:,} shown",
                 f"{len(self.live[marked].matches):,} match ▶" if marked else "",
                 f"{len(self.messages.marks):,} marked" if self.messages.marks else "",
                 state, self.progress, f"time: {self.messages.time_mode}",
                 ("follow: on" if self.follow else "") if self.model.live or self.follow else "",
                 f"filter: {self.view.filter_text}" if self.view.filter_text else "",
                 f"conn {self.view.conn} only" if self.view.conn is not None else "",
                 f"⚠ {damage}" if damage else ""]
        self.status.update("  ".join(p for p in parts if p))

    # --- selection -----------------------------------------------------------------------

    @on(MessageList.Selected)
    def selected(self, event: MessageList.Selected) -> None:
        if event.by_user and self.follow:
            self.follow = False                  # moving pauses following; f resumes
            self.update_status()
        self._show_entry(event.entry)

    def _show_entry(self, entry: int | None) -> None:
        if entry is None:
            return
        if entry > 0:
            p = self.model.packet(entry)
            self.detail.show(p, self.messages.palette)
            self.hex.show(p.msg.data)
        else:
            self.detail.show_event(self.model.events[-entry - 1][1])
            self.hex.show(b"")

    @on(Tree.NodeHighlighted)
    def highlight_field(self, event: Tree.NodeHighlighted) -> None:
        item, entry = event.node.data, self.messages.entry()
        if isinstance(item, Item) and entry and entry > 0:
            self.hex.show(self.model.packet(entry).msg.data, item.offset, item.length)

    @on(Tree.NodeSelected)
    def follow_link(self, event: Tree.NodeSelected) -> None:
        item = event.node.data
        if isinstance(item, Item) and item.field.name in ("vfio_user.response_in",
                                                         "vfio_user.response_to"):
            self.jump(item.value)

    def jump(self, number: int) -> None:
        if not self.messages.go_to_number(number):
            self.notify(f"message {number} is not in the list (hidden by the filter, "
                        "or not read yet)", severity="warning")
        self.messages.focus()

    # --- filter -------------------------------------------------------------------------

    async def _keys_settled(self) -> None:
        """Wait until the focused widget has handled the keys routed to it
        before this one (the app routes each key as it arrives; a priority key
        would otherwise overtake them)."""
        if self.focused is not None:
            handled = asyncio.Event()
            self.focused.call_later(handled.set)      # queued behind those keys
            try:
                await asyncio.wait_for(handled.wait(), KEYS_SETTLE)
            except asyncio.TimeoutError:
                pass

    async def action_edit_filter(self) -> None:
        if self.screen is not self.filter_bar.screen or isinstance(self.focused, Input):
            raise SkipAction()                # "/" is a character of that input
        await self._keys_settled()
        self.set_focus(self.filter_bar)       # now: the keys typed next are the filter's

    async def action_submit_filter(self) -> None:
        if self.focused is not self.filter_bar:
            raise SkipAction()
        await self._keys_settled()            # the filter's last characters
        self.set_focus(self.messages)
        self.apply_filter(self.filter_bar.value.strip())

    async def action_escape(self) -> None:
        if self.screen is not self.filter_bar.screen:
            raise SkipAction()                # a dialog's own escape
        await self._keys_settled()
        if self.focused is not self.messages:
            self.messages.focus()
        elif self.pending is not None:
            self.cancel_filter()

    def cancel_filter(self) -> None:
        self.workers.cancel_group(self, "filter")
        self.pending, self._filtering = None, False
        self.progress = "filter cancelled"
        self.update_status()

    @on(Input.Changed, "#filter")
    def validate(self, event: Input.Changed) -> None:
        error = filter_problem(event.value)
        self.filter_bar.set_class(error is not None, "-invalid")
        self.filter_error.set_class(error is not None, "-shown")
        self.filter_error.update(error or "")

    @on(DetailTree.ApplyFilter)
    def apply_field(self, event: DetailTree.ApplyFilter) -> None:
        current = self.view.filter_text
        text = f"({current}) && {event.expression}" if event.combine and current \
            else event.expression
        self.apply_filter(text)

    def apply_filter(self, text: str) -> None:
        bar = self.filter_bar
        bar.remember(text)
        bar.value = text
        if filter_problem(text):
            self.progress = "invalid filter (the list is unchanged)"
            self.update_status()
            return
        self.change_view(View(text, self.view.conn, self.view.matches_only))

    def change_view(self, view: View) -> None:
        """Show `view` once its filters are computed (at once if they are)."""
        self.workers.cancel_group(self, "filter")
        self._filtering = False
        for text in view.filters():
            if text and text not in self.live:
                self.live[text] = LiveFilter(text, compile_filter(text))
        in_use = {*self.view.filters(), *view.filters(), self.view.filter_text, view.filter_text}
        self.live = {t: lf for t, lf in self.live.items() if t in in_use}
        self.pending = view
        self._advance_filters()

    def _advance_filters(self) -> None:
        """Start a worker on the filters behind the messages indexed, or show
        the pending view when none is."""
        view = self.pending or self.view
        behind = [self.live[t] for t in view.filters() if t and self.live[t].upto < self.model.count]
        if behind:
            if not self._filtering:
                self._filtering = True
                self.run_filters(behind, time.monotonic())
        elif self.pending is not None:
            self._show(self.pending)

    @work(thread=True, exclusive=True, group="filter")
    def run_filters(self, filters: list[LiveFilter], started: float) -> None:
        worker = get_current_worker()
        try:
            for live in filters:
                total = max(self.model.count, 1)

                def progress(number: int) -> bool:
                    self.progress = f"filtering {number * 100 // total}% (Esc cancels)"
                    return not worker.is_cancelled

                self.model.advance(live, progress)
        except Cancelled:
            return
        self.call_from_thread(self._filters_done, time.monotonic() - started)

    def _filters_done(self, seconds: float) -> None:
        """The filters cover what was indexed when they started: show them, and
        go on with what arrived meanwhile."""
        self._filtering = False
        self.progress = f"filtered in {seconds:.1f} s" if self.pending is not None else ""
        self._show(self.pending or self.view)
        self._advance_filters()

    def _show(self, view: View) -> None:
        """Show the rows of `view`, keeping the selected message when it stays."""
        if self.pending == view:
            self.pending = None
        self.view = view
        shown, marked = view.filters()
        entry = self.messages.entry()
        keep = entry if entry and entry > 0 else None
        self.messages.matched = self.live[marked].matches if marked else None
        rows = self.live[shown].matches if shown else AllRows(self.model)
        if self.follow:
            self.messages.set_rows(rows)
            self.messages.select(len(rows) - 1, by_user=False)
        else:
            self.messages.set_rows(rows, keep=keep)
            if keep and shown and not self.messages.go_to_number(keep, by_user=False):
                self.messages.select(bisect.bisect_left(rows, keep), by_user=False)
        self.update_status()

    # --- navigation ---------------------------------------------------------------------

    def action_match(self, step: int) -> None:
        """Next/previous message the filter selects, also when all are shown."""
        entry, matches = self.messages.entry(), self.matches
        if matches is None or not len(matches) or entry is None:
            self.notify("no filter applied", severity="warning")
            return
        self._step_to(matches, entry, step)

    def _step_to(self, numbers: Sequence[int], entry: int, step: int) -> None:
        number = entry if entry > 0 else 0
        i = bisect.bisect_right(numbers, number) if step > 0 else \
            bisect.bisect_left(numbers, number) - 1
        if 0 <= i < len(numbers):
            self.jump(numbers[i])

    def action_go_to(self) -> None:
        def go(text: str | None) -> None:
            if text is None:
                return
            if not text.isdigit():
                self.notify(f"{text!r} is not a message number", severity="warning")
            else:
                self.jump(int(text))
        self.push_screen(PromptScreen(f"Go to message (1-{self.model.count:,}):"), go)

    def action_mark(self) -> None:
        entry = self.messages.entry()
        if entry and entry > 0:
            self.messages.marks ^= {entry}
            self.messages.refresh()
            self.update_status()

    def action_next_mark(self, step: int) -> None:
        entry = self.messages.entry()
        if not self.messages.marks or entry is None:
            self.notify("no marked message (m marks one)", severity="warning")
            return
        self._step_to(sorted(self.messages.marks), entry, step)

    def action_partner(self) -> None:
        entry = self.messages.entry()
        if not entry or entry < 0:
            return
        partner = self.model.request_of[entry - 1] or self.model.response_of[entry - 1]
        if partner:
            self.jump(partner)
        else:
            self.notify("no matching request or reply", severity="warning")

    def _entry_conn(self) -> int | None:
        entry = self.messages.entry()
        if entry is None:
            return None
        if entry < 0:
            return self.model.events[-entry - 1][1].conn
        return self.model.columns["conn"][entry - 1]

    def action_connection(self) -> None:
        """Limit the list to the selected row's connection; again: all of them.
        The filter stays as it is."""
        conn = None if self.view.conn is not None else self._entry_conn()
        if conn is None and self.view.conn is None:
            return
        self.change_view(View(self.view.filter_text, conn, self.view.matches_only))

    def action_view(self) -> None:
        if not self.view.filter_text:
            self.notify("no filter applied", severity="warning")
            return
        self.change_view(View(self.view.filter_text, self.view.conn, not self.view.matches_only))

    def action_time(self) -> None:
        self.messages.time_mode = TIME_MODES[(TIME_MODES.index(self.messages.time_mode) + 1)
                                             % len(TIME_MODES)]
        self.messages.refresh()
        self.update_status()

    def action_follow(self) -> None:
        self.follow = not self.follow
        if self.follow:
            self.messages.select(len(self.messages.rows) - 1, by_user=False)
        self.update_status()

    def action_search(self) -> None:
        def search(text: str | None) -> None:
            if not text:
                return
            self.last_search = text
            in_tree, in_hex = self.detail.search(text), self.hex.search(text)
            if in_tree:
                self.detail.focus()
            if not (in_tree or in_hex):
                self.notify(f"{text!r} is not in this message", severity="warning")
        self.push_screen(PromptScreen("Search the detail tree and the bytes (hex like "
                                      "'de ad' or text):", self.last_search), search)

    def action_toggle_pane(self, pane: str) -> None:
        widget = self.query_one(f"#{pane}")
        widget.display = not widget.display
        self.query_one("#panes").display = self.detail.display or \
            self.query_one("#hex-scroll").display

    def action_resize(self, step: int) -> None:
        self.list_share = max(1, min(self.list_share + step, 8))
        self.messages.styles.height = f"{self.list_share}fr"
        self.query_one("#panes").styles.height = "2fr"

    # --- quitting -----------------------------------------------------------------------

    async def action_quit(self) -> None:
        if isinstance(self.screen, ModalScreen):
            self.screen.dismiss(None)
        elif self.live_proxy:
            self.push_screen(QuitScreen(), self._quit_as)
        else:
            self.exit(STOP)

    def _quit_as(self, choice: str | None) -> None:
        if choice:
            self.exit(choice)

    # --- screens ------------------------------------------------------------------------

    def action_help(self) -> None:
        """The keys, those of the focused pane first, as the terminal names them."""
        sections = [("List", MessageList), ("Detail tree", DetailTree),
                    ("Filter bar", FilterBar), ("Everywhere", type(self))]
        sections.sort(key=lambda s: not isinstance(self.focused, s[1]))
        text = Text()
        for title, owner in sections:
            text.append(f"{title}\n", style="bold underline")
            for b in owner.BINDINGS:
                keys = " / ".join(self.get_key_display(Binding(k.strip(), ""))
                                  for k in b.key.split(","))
                text.append(f"  {keys:<20} {b.description or b.action}\n")
        text.append("\nIn the filter bar Enter applies and Esc returns to the list; in the "
                    "detail tree Enter on 'Response in' / 'Request in' jumps there; the mouse "
                    "selects messages and tree nodes.\n")
        self.push_screen(TextScreen("Keys", text))

    def action_statistics(self) -> None:
        st = self.model.stats
        rows = []
        for cmd in sorted(st.count):
            lat = st.latency_row(cmd)
            cells = ["-"] * 4 if lat is None else [f"{v * 1e6:.0f} µs" for v in lat]
            rows.append((proto.command_name(cmd), st.count[cmd], st.bytes[cmd],
                         sum(n for (c, _), n in st.errors.items() if c == cmd), *cells))
        errors = [(proto.COMMANDS.get(cmd, cmd), proto.ERRNO_NAMES.get(err, err), n)
                  for (cmd, err), n in sorted(st.errors.items())]
        self.push_screen(TableScreen(f"Statistics: {self.model.count:,} messages", [
            ("Per command (and its replies); latency = Service Response Time",
             ("Command", "Messages", "Bytes", "Errors", "Min", "Median", "p99", "Max"), rows),
            ("Error replies by errno", ("Command", "Errno", "Count"), errors)]))

    def action_experts(self) -> None:
        rows = [(severity, EXPERTS[eid].group, eid, n, EXPERTS[eid].summary, first, first)
                for severity, eid, n, first in sorted(
                    self.model.stats.expert_rows(), key=lambda r: SEVERITIES.index(r[0]))]
        self.push_screen(TableScreen("Expert information (Enter jumps to the first)", [
            ("", ("Severity", "Group", "Id", "Count", "Summary", "First"), rows)]), self._jump_to)

    def action_conversations(self) -> None:
        unanswered: dict[int, int] = {}
        conns = self.model.columns["conn"]
        for number in list(self.model.stats.unanswered):
            unanswered[conns[number - 1]] = unanswered.get(conns[number - 1], 0) + 1
        rows = [(conn, c.endpoints or "-", clock_time(c.first_ns),
                 f"{(c.last_ns - c.first_ns) / 1e9:.6f}", c.messages, c.bytes, c.errors,
                 c.problems, unanswered.get(conn, 0), c.first)
                for conn, c in sorted(self.model.stats.conversations.items())]
        self.push_screen(TableScreen("Conversations (Enter jumps to the first message)", [
            ("", ("Conn", "Endpoints", "Start", "Duration (s)", "Messages", "Bytes",
                  "Error replies", "Errors/warnings", "Unanswered"), rows)]), self._jump_to)

    def _jump_to(self, number: int | None) -> None:
        if number:
            self.jump(number)

    def action_session(self) -> None:
        entry = self.messages.entry()
        if not entry or entry < 0:
            self.notify("select a message: the session is shown as of it", severity="warning")
            return
        conn = self.model.columns["conn"][entry - 1]
        screen = SessionScreen(f"Connection {conn} after message {entry}",
                               "computing from the nearest checkpoint… (Esc cancels)")
        self.push_screen(screen)
        self.session_state(screen, entry, conn)

    @work(thread=True, exclusive=True, group="session")
    def session_state(self, screen: TextScreen, entry: int, conn: int) -> None:
        worker, started = get_current_worker(), time.monotonic()
        snapshot = self.model.session_at(entry)
        state = snapshot.connections.get(conn)
        text = Text()
        if state is None:
            text.append("nothing known of this connection yet")
        else:
            for title, lines in state.sections(snapshot.ts_ns):
                text.append(f"{title}\n", style="underline")
                text.append("".join(f"  {line}\n" for line in lines))
        title = (f"Connection {conn}{' (closed)' if state and state.closed else ''} "
                 f"after message {entry} ({time.monotonic() - started:.2f} s)")
        if not worker.is_cancelled:
            self.call_from_thread(screen.fill, title, text)

    def action_save(self, marked: bool) -> None:
        if marked:
            numbers: Sequence[int] = sorted(self.messages.marks)
            if not numbers:
                self.notify("no marked message (m marks one)", severity="warning")
                return
        else:
            numbers = self.messages.rows
        what = "marked" if marked else "shown"

        def save(path: str | None) -> None:
            if path:
                self.save_messages(path, numbers, what)
        self.push_screen(PromptScreen(f"Save the {len(numbers):,} {what} rows to (.vfucap, "
                                      "or .pcapng for Wireshark):", "saved.vfucap"), save)

    @work(thread=True, exclusive=True, group="save")
    def save_messages(self, path: str, numbers: Sequence[int], what: str) -> None:
        from ..save import open_writer
        try:
            count = self.model.save(path, list(numbers), open_writer(path, "vfu-inspect tui"))
        except OSError as exc:
            self.call_from_thread(self.notify, f"cannot write {path}: {exc.strerror}",
                                  severity="error")
            return
        self.call_from_thread(self.notify, f"wrote {count:,} {what} messages to {path}")

    def action_replay(self) -> None:
        conn = self._entry_conn()
        if conn is None:
            return

        def replay(server: str | None) -> None:
            if server:
                self.notify(f"replaying connection {conn} against {server}…")
                self.replay_connection(conn, server)
        self.push_screen(PromptScreen(f"Replay connection {conn}'s client commands against "
                                      "the server socket:"), replay)

    @work(thread=True, exclusive=True, group="replay")
    def replay_connection(self, conn: int, server: str) -> None:
        from ..replay import Recording, Replayer, ReplayError, show_values
        conns = self.model.columns["conn"]
        recorded = [(n, self.model.message(n)) for n in range(1, self.model.count + 1)
                    if conns[n - 1] == conn]
        try:
            outcome = Replayer(Recording(conn, recorded), server, [], io.StringIO(), None).run()
        except (ReplayError, OSError) as exc:
            self.call_from_thread(self.notify, f"replay failed: {exc}", severity="error")
            return
        rows = [(d.frame, d.what, name, show_values(recorded_value), show_values(live), d.frame)
                for d in outcome.divergences for name, recorded_value, live in d.fields or
                [("", None, None)]]
        title = (f"Replay of connection {conn} against {server}: {outcome.sent} requests sent, "
                 f"{outcome.matched} answers matched, {len(outcome.divergences)} diverged "
                 "(Enter jumps to the recorded message)")
        self.call_from_thread(self.push_screen, TableScreen(title, [
            ("Divergences", ("Frame", "What", "Field", "Recorded", "Live"), rows)]),
            self._jump_to)


def filter_problem(text: str) -> str | None:
    """Why `text` is not a filter, with a caret under where it goes wrong."""
    if not text.strip():
        return None
    try:
        compile_filter(text)
    except FilterError as exc:
        return f"{' ' * (exc.position + 1)}^ {exc.message}"     # the bar's padding: 1
    return None

