"""Proxy addons: each consumes the records the relay emits.

The relay calls `record()` for every message and connection event, and
`flush()` once per loop turn; an addon must never block the relay.
"""

from __future__ import annotations

import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, TextIO

import msgpack

from . import pcapng
from .capture import CaptureWriter, header_record
from .records import NOTE, Event, Message
from .sockio import listen_unix, unlink_socket


class SaveAddon:
    """Writes every record to a capture file (lossless), flushed each loop turn."""

    def __init__(self, path: str, source: str) -> None:
        # pcapng by extension: fds in comments; expert items need `export`,
        # whose analysis would take the relay's time here.
        if path.endswith(pcapng.SUFFIX):
            self.writer = pcapng.PcapngFileWriter(path, source)
        else:
            self.writer = CaptureWriter(path, source=source, autoflush=False)

    def record(self, record: Message | Event) -> None:
        self.writer.write(record)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class PrintAddon:
    """One summary line per message, as `vfu-inspect read` prints it.

    The lines come from a child `vfu-inspect read --live` on a private
    monitor stream: dissection and analysis run in another interpreter, so
    they never take the relay's time (nor its GIL).  A child that falls
    behind is told how many records it missed.
    """

    STARTUP_SECONDS = 10.0

    def __init__(self, out: TextIO = sys.stdout, color: bool = False) -> None:
        self._dir = tempfile.mkdtemp(prefix="vfu-print-")
        path = os.path.join(self._dir, "print.sock")
        self.monitor = MonitorAddon(path, "print")
        self.child = subprocess.Popen(
            [sys.executable, "-m", "vfu_inspect", "read", "--live", path, "--events",
             "--color", "always" if color else "never"], stdout=out)
        deadline = time.monotonic() + self.STARTUP_SECONDS
        while not self.monitor.viewers() and time.monotonic() < deadline \
                and self.child.poll() is None:
            time.sleep(0.01)             # lines start with the first record

    def record(self, record: Message | Event) -> None:
        self.monitor.record(record)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.monitor.close()             # the child prints what it has, then ends
        try:
            self.child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.child.kill()
        shutil.rmtree(self._dir, ignore_errors=True)


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

    def offer(self, item: Any) -> None:
        try:
            if self.skipped:
                self.queue.put_nowait(self.skipped)
                self.skipped = 0
            self.queue.put_nowait(item)
        except queue.Full:
            self.skipped += 1

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

    def viewers(self) -> int:
        with self._lock:
            return sum(v.alive for v in self._viewers)

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
