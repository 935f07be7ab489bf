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
from typing import Any, Callable, TextIO

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
    """One summary line per message, as `vfu-inspect read` prints it.

    Dissection and session analysis run on a thread of their own, behind a
    bounded queue: a slow terminal or a costly message delays the lines,
    never the relay.
    """

    QUEUE_RECORDS = 100000

    def __init__(self, out: TextIO = sys.stdout, color: bool = False) -> None:
        self.out = out
        self.color = color
        self.analyzer = Analyzer()
        self.worker = Worker(self._print, self.QUEUE_RECORDS)

    def record(self, record: Message | Event) -> None:
        self.worker.offer(record)

    def _print(self, item: Message | Event | int) -> None:
        if isinstance(item, int):
            line = f"# {item} records not printed: the printer fell behind the relay"
        elif isinstance(item, Message):
            line = summary_line(self.analyzer.feed(item), self.color)
        else:
            if item.kind == CLOSE:
                self.analyzer.sessions.close(item.conn)
            line = describe_event(item)
        print(line, file=self.out, flush=self.worker.idle)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.worker.finish()
        self.out.flush()


class Worker:
    """Consumes items on its own thread, behind a bounded queue.

    When the queue is full, items are counted, not queued, and the consumer
    later receives the count (an int) in their place.
    """

    def __init__(self, consume: Callable[[Any], None], size: int,
                 on_exit: Callable[[], None] = lambda: None) -> None:
        self.consume = consume
        self.on_exit = on_exit
        self.queue: queue.Queue[Any] = queue.Queue(size)
        self.skipped = 0
        self.alive = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    @property
    def idle(self) -> bool:
        return self.queue.empty()

    def offer(self, item: Any) -> None:
        try:
            if self.skipped:
                self.queue.put_nowait(self.skipped)
                self.skipped = 0
            self.queue.put_nowait(item)
        except queue.Full:
            self.skipped += 1

    def finish(self, timeout: float = 10) -> None:
        """Consume what is queued, then stop."""
        self.offer(_STOP)
        self.thread.join(timeout)

    def _loop(self) -> None:
        try:
            while (item := self.queue.get()) is not _STOP:
                self.consume(item)
        except OSError:
            pass
        finally:
            self.alive = False
            self.on_exit()


_STOP = object()


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
        self.worker = Worker(self._send, size, on_exit=sock.close)
        self.worker.offer(header)

    @property
    def alive(self) -> bool:
        return self.worker.alive

    def offer(self, packed: bytes | None) -> None:
        self.worker.offer(_STOP if packed is None else packed)

    def _send(self, item: bytes | int) -> None:
        self.sock.sendall(_skipped_note(item) if isinstance(item, int) else item)
