"""Proxy addons: each consumes the records the relay emits.

The relay calls `record()` for every message and connection event, and
`flush()` once per loop turn; an addon must never block the relay.
"""

from __future__ import annotations

import queue
import socket
import sys
import threading
import time
from typing import TextIO

import msgpack

from .capture import CLOSE, EVENT_NAMES, NOTE, CaptureWriter, Event, Message, header_record
from .dissect import Analyzer
from .output import summary_line
from .proxy import listen_unix, unlink_socket


class SaveAddon:
    """Writes every record to a capture file (lossless), flushed each loop turn."""

    def __init__(self, path: str, source: str) -> None:
        self.writer = CaptureWriter(path, source=source, autoflush=False)

    def record(self, record: Message | Event) -> None:
        self.writer.write(record)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class PrintAddon:
    """One summary line per message, as `vfu-inspect read` prints it."""

    def __init__(self, out: TextIO = sys.stdout, color: bool = False) -> None:
        self.out = out
        self.color = color
        self.analyzer = Analyzer()

    def record(self, record: Message | Event) -> None:
        if isinstance(record, Message):
            line = summary_line(self.analyzer.feed(record), self.color)
        else:
            line = describe_event(record)
        print(line, file=self.out)

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        self.out.flush()


def describe_event(event: Event) -> str:
    info = event.info
    text = info.get("text") or info.get("reason") or info.get("server", "")
    line = f"# conn {event.conn} {EVENT_NAMES[event.kind]}: {text}"
    if event.kind == CLOSE and info.get("unanswered"):
        pending = ", ".join(f"{u['cmd']} id {u['msg_id']:#x}" for u in info["unanswered"])
        line += f" (unanswered: {pending})"
    return line


class MonitorAddon:
    """Serves the live record stream (a capture file's bytes) to viewers.

    Each viewer gets its own bounded queue and sender thread: a slow viewer
    loses records from its display, never from the relay or the capture.
    """

    QUEUE_RECORDS = 10000

    def __init__(self, path: str, source: str, mode: int = 0o600) -> None:
        self.path = path
        self.header = msgpack.packb(header_record(source), use_bin_type=True)
        self._listener = listen_unix(path, mode)
        self._viewers: list[_Viewer] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def record(self, record: Message | Event) -> None:
        packed = msgpack.packb(record.to_record(), use_bin_type=True)
        with self._lock:
            viewers = list(self._viewers)
        for viewer in viewers:
            viewer.offer(packed)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._listener.close()
        unlink_socket(self.path)
        with self._lock:
            for viewer in self._viewers:
                viewer.offer(None)

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
    note = Event(NOTE, time.time_ns(), -1,
                 {"text": f"{count} records skipped: this viewer reads too slowly"})
    return msgpack.packb(note.to_record(), use_bin_type=True)


class _Viewer:
    def __init__(self, sock: socket.socket, header: bytes, size: int) -> None:
        self.sock = sock
        self.queue: queue.Queue[bytes | None] = queue.Queue(size)
        self.skipped = 0
        self.alive = True
        self.queue.put(header)
        threading.Thread(target=self._send_loop, daemon=True).start()

    def offer(self, packed: bytes | None) -> None:
        try:
            if self.skipped:
                self.queue.put_nowait(_skipped_note(self.skipped))
                self.skipped = 0
            self.queue.put_nowait(packed)
        except queue.Full:
            self.skipped += 1

    def _send_loop(self) -> None:
        try:
            while (packed := self.queue.get()) is not None:
                self.sock.sendall(packed)
        except OSError:
            pass
        finally:
            self.alive = False
            self.sock.close()
