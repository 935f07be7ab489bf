"""Proxy addons, and the one list the proxy's command line and the demo load.

Each addon declares its command-line options and makes itself from them
(`from_options`, None when they leave it off); the proxy then calls its
hooks with the typed events of proxy_events (see `proxy.Addon`).  An addon
must never block the relay: one that needs time asks for dissected messages
and runs in a process of its own (offload.Dissection).
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, TextIO

import msgpack

from . import pcapng
from .capture import CaptureWriter, header_record
from .events import describe_event
from .offload import Worker
from .output import SUMMARY_HEADER, summary_line, use_color
from .proxy_events import BurstRelayed, MessageDissected, MessageRelayed, Note, ProxyEvent
from .sockio import listen_unix, unlink_socket


@dataclass
class Option:
    """A command-line option of an addon: argparse's flags and settings."""

    flags: tuple[str, ...]
    settings: dict[str, Any]


def option(*flags: str, **settings: Any) -> Option:
    return Option(flags, settings)


@dataclass
class AddonContext:
    """What the addons of one proxy are made with, besides their options."""

    source: str                 # the proxy, as capture headers name it
    out: TextIO = sys.stdout    # where they print
    mode: int = 0o600           # permissions of the sockets they create


class SaveAddon:
    """Writes every event to a capture file (lossless), flushed each loop turn."""

    options = [option("-w", dest="write", metavar="FILE", help="write a capture file")]

    @classmethod
    def from_options(cls, options: argparse.Namespace, context: AddonContext
                     ) -> SaveAddon | None:
        return cls(options.write, context.source) if options.write else None

    def __init__(self, path: str, source: str) -> None:
        # pcapng by extension: fds in comments; expert items need `export`,
        # whose analysis would take the relay's time here.
        if path.endswith(pcapng.SUFFIX):
            self.writer = pcapng.PcapngFileWriter(path, source)
        else:
            self.writer = CaptureWriter(path, source=source, autoflush=False, bursts=True)
        # a relayed message or burst is its own record: the hooks are the writer's own
        self.message: Callable[[MessageRelayed], None] = self.writer.write
        self.burst: Callable[[BurstRelayed], None] = self.writer.write

    def event(self, event: ProxyEvent) -> None:
        self.writer.write(event.record())

    def flush(self) -> None:
        self.writer.flush()

    def done(self) -> None:
        self.writer.close()


class PrintAddon:
    """One summary line per message, as `vfu-inspect read --events` prints it.

    Dissection and analysis run in the addon's own process; when it falls
    behind, a '#' line says how many events it missed.
    """

    wants_dissection = True
    options = [option("--print", action="store_true", help="print one line per message"),
               option("--color", choices=("auto", "always", "never"), default="auto",
                      help="colour the --print lines (default: auto, on a terminal)")]

    @classmethod
    def from_options(cls, options: argparse.Namespace, context: AddonContext
                     ) -> PrintAddon | None:
        if not options.print:
            return None
        return cls(context.out, use_color(options.color, context.out))

    def __init__(self, out: TextIO = sys.stdout, color: bool = False) -> None:
        self.out = out
        self.color = color
        if out.isatty():
            out.write(SUMMARY_HEADER + "\n")

    def message_dissected(self, event: MessageDissected) -> None:
        self.out.write(summary_line(event.packet, self.color) + "\n")

    def event(self, event: ProxyEvent) -> None:
        self.out.write(describe_event(event.record()) + "\n")

    def flush(self) -> None:
        self.out.flush()

    done = flush


class MonitorAddon:
    """Serves the live record stream (a capture file's bytes) to viewers.

    Each viewer gets its own bounded queue and sender thread: a slow viewer
    loses records from its display, never from the relay or the capture.
    """

    QUEUE_RECORDS = 10000
    options = [option("--monitor", metavar="PATH", help="serve the live record stream here "
                      "(vfu-inspect read --live PATH)")]

    @classmethod
    def from_options(cls, options: argparse.Namespace, context: AddonContext
                     ) -> MonitorAddon | None:
        return cls(options.monitor, context.source, context.mode) if options.monitor else None

    def __init__(self, path: str, source: str, mode: int = 0o600) -> None:
        self.path = path
        self.header = msgpack.packb(header_record(source, bursts=True), use_bin_type=True)
        self._listener = listen_unix(path, mode)
        self._viewers: list[_Viewer] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def event(self, event: ProxyEvent) -> None:
        packed = msgpack.packb(event.record().to_record(), use_bin_type=True)
        with self._lock:
            viewers = list(self._viewers)
        for viewer in viewers:
            viewer.offer(packed)

    def done(self) -> None:
        self._listener.close()
        unlink_socket(self.path)
        with self._lock:
            for viewer in self._viewers:
                viewer.worker.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            viewer = _Viewer(sock, self.header, self.QUEUE_RECORDS)
            with self._lock:
                self._viewers = [v for v in self._viewers if v.alive] + [viewer]


def _skipped_note(count: int) -> bytes:
    note = Note(time.time_ns(), -1, f"{count} records skipped: this viewer reads too slowly")
    return msgpack.packb(note.record().to_record(), use_bin_type=True)


class _Viewer:
    def __init__(self, sock: socket.socket, header: bytes, size: int) -> None:
        self.sock = sock
        self.worker = Worker(self._send, size, on_exit=sock.close)
        self.worker.offer(header)

    @property
    def alive(self) -> bool:
        return self.worker.alive

    def offer(self, packed: bytes) -> None:
        self.worker.offer(packed)

    def _send(self, item: bytes | int) -> None:
        self.sock.sendall(_skipped_note(item) if isinstance(item, int) else item)


ADDONS = [SaveAddon, PrintAddon, MonitorAddon]


def add_options(parser: argparse.ArgumentParser) -> None:
    """Every addon's options, for the proxy's command line."""
    for addon in ADDONS:
        for opt in addon.options:
            parser.add_argument(*opt.flags, **opt.settings)


def parse_options(argv: list[str]) -> argparse.Namespace:
    """The addon options that `proxy ARGV` would give, defaults included."""
    parser = argparse.ArgumentParser(add_help=False)
    add_options(parser)
    return parser.parse_args(argv)


def load_addons(options: argparse.Namespace, context: AddonContext) -> list[Any]:
    """The addons the options turn on, in ADDONS order."""
    addons: list[Any] = []
    try:
        for cls in ADDONS:
            addon = cls.from_options(options, context)
            if addon is not None:
                addons.append(addon)
    except BaseException:
        for addon in addons:
            addon.done()
        raise
    return addons
