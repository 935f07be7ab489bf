"""Work taken off the relay, behind bounded queues that drop, never block.

`Dissection` runs an addon that asks for dissected messages
(`wants_dissection`) in a child process: the relay only packs each event's
record, as the capture does, and a thread writes them down a pipe; there the
child's Analyzer decodes each message and the addon gets it dissected.  The
child has an interpreter of its own, so decoding does not compete with the
relay for one.  When the addon falls behind, events are dropped and counted,
and the addon is told how many: decoding never holds up or alters the relay.
"""

from __future__ import annotations

import fcntl
import os
import queue
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable

import msgpack

from .capture import parse_record
from .dissect import Analyzer
from .proxy_events import MessageDissected, Note, ProxyEvent, event_from_record, hooks
from .records import Burst, Message, unbundle
from .session import SessionTracker


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
        self.skipped = 0                 # not yet reported to the consumer
        self.dropped = 0                 # in all
        self.alive = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def offer(self, item: Any, count: int = 1) -> None:
        """Queue `item`, which stands for `count` of what the consumer counts."""
        if not self.alive:              # the consumer failed: nothing will take it
            self.dropped += count
            return
        try:
            if self.skipped:
                self.queue.put_nowait(self.skipped)
                self.skipped = 0
            self.queue.put_nowait(item)
        except queue.Full:
            self.skipped += count
            self.dropped += count

    def close(self) -> None:
        """End once the queued items are consumed; without waiting, and
        (when the queue is full) perhaps never: the thread is a daemon."""
        self.offer(_STOP)

    def stop(self, timeout: float) -> None:
        """Consume what is queued and report what was skipped, then end;
        waits at most about `timeout` seconds for each."""
        try:
            if self.skipped:
                self.queue.put(self.skipped, timeout=timeout)
                self.skipped = 0
            self.queue.put(_STOP, timeout=timeout)
        except queue.Full:
            return
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


class Dissection:
    """Stands in the proxy for an addon with `wants_dissection`: forks the
    process that runs it, and sends it every event's record.

    The relay packs the events and queues them in batches of BATCH_BYTES, and
    what a loop turn leaves at `flush`; a writer thread writes the batches
    down the pipe.  What waits is bounded in bytes: QUEUE_BATCHES batches, the
    pipe's PIPE_BYTES.  The addon's output comes from the child (it shares the
    proxy's stdout and stderr).
    """

    BATCH_BYTES = 1 << 16
    QUEUE_BATCHES = 256
    PIPE_BYTES = 1 << 20
    STOP_SECONDS = 30.0

    def __init__(self, addon: Any) -> None:
        self.addon = addon
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._batch_events = 0          # a burst counts as its messages
        read_end, write_end = os.pipe()
        sys.stdout.flush()              # else the child would print what is buffered again
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(write_end)
            _run_child(addon, read_end)
        os.close(read_end)
        try:
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, self.PIPE_BYTES)
        except OSError:
            pass                        # a smaller pipe only makes drops likelier
        self._pipe = write_end
        self.exit_code: int | None = None      # the child's, once done
        self.worker = Worker(self._write, self.QUEUE_BATCHES, on_exit=self._close_pipe)

    @property
    def name(self) -> str:
        return type(self.addon).__name__

    @property
    def dropped(self) -> int:
        """Events the addon never got: the child had fallen behind."""
        return self.worker.dropped

    def event(self, event: ProxyEvent) -> None:
        packed = msgpack.packb(event.record().to_record(), use_bin_type=True)
        self._batch.append(packed)
        self._batch_bytes += len(packed)
        self._batch_events += len(event.sizes) if isinstance(event, Burst) else 1
        if self._batch_bytes >= self.BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._batch:
            self.worker.offer(b"".join(self._batch), self._batch_events)
            self._batch, self._batch_bytes, self._batch_events = [], 0, 0

    def done(self) -> None:
        """Send what is left, close the pipe and wait for the child to finish
        (at most about STOP_SECONDS for each)."""
        self.flush()
        self.worker.stop(self.STOP_SECONDS)
        if self.worker.alive:           # still writing: the child is stuck
            os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + self.STOP_SECONDS
        while (waited := os.waitpid(self.pid, os.WNOHANG)) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
            time.sleep(0.01)
        self.exit_code = os.waitstatus_to_exitcode(waited[1])

    def _write(self, item: bytes | int) -> None:
        data = memoryview(msgpack.packb(item) if isinstance(item, int) else item)
        while data:
            data = data[os.write(self._pipe, data):]

    def _close_pipe(self) -> None:
        os.close(self._pipe)


def _run_child(addon: Any, pipe: int) -> None:
    """The child's life: deliver what comes down the pipe until it closes."""
    code = 0
    try:
        # The proxy stops the child by closing the pipe, after the relay ends.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _Delivery(addon).run(pipe)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)      # not the parent's atexit handlers or buffers


class _Delivery:
    """In the child: records in, the addon's hooks called with typed events."""

    def __init__(self, addon: Any) -> None:
        self.addon = addon
        self.analyzer = Analyzer(sessions=SessionTracker(checkpoint_every=0))
        self._hooks = hooks(addon)
        self._flush = getattr(addon, "flush", None)

    def run(self, pipe: int) -> None:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        while chunk := os.read(pipe, 1 << 16):
            unpacker.feed(chunk)
            for obj in unpacker:
                self._consume(obj)
            if self._flush is not None:
                self._flush()           # caught up with what has come: show it
        done = getattr(self.addon, "done", None)
        if done is not None:
            done()

    def _consume(self, obj: Any) -> None:
        if isinstance(obj, int):
            self._deliver(Note(time.time_ns(), -1, f"{obj} events not dissected: "
                                                  f"{type(self.addon).__name__} fell behind "
                                                  "the relay"))
            return
        for record in unbundle(parse_record(obj)):
            if isinstance(record, Message):
                self._deliver(MessageDissected(self.analyzer.feed(record)))
            elif record is not None:
                self.analyzer.event(record)
                self._deliver(event_from_record(record))

    def _deliver(self, event: Any) -> None:
        hook = self._hooks.get(event.__class__)
        if hook is not None:
            hook(event)
