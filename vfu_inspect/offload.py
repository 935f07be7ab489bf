"""Work taken off the relay thread, behind bounded queues that drop, never block.

`Dissection` runs an addon that asks for dissected messages
(`wants_dissection`) on a thread of its own: the relay only queues the
events; there the Analyzer decodes each message and the addon gets it
dissected.  When the addon falls behind, events are dropped and counted, and
the addon is told how many: decoding never holds up or alters the relay.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

from .dissect import Analyzer
from .proxy_events import MessageDissected, MessageRelayed, Note, ProxyEvent, hooks
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

    def offer(self, item: Any) -> None:
        try:
            if self.skipped:
                self.queue.put_nowait(self.skipped)
                self.skipped = 0
            self.queue.put_nowait(item)
        except queue.Full:
            self.skipped += 1
            self.dropped += 1

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
    """Stands in the proxy for an addon with `wants_dissection`: takes every
    event on the relay thread and calls the addon's hooks on a worker's."""

    QUEUE_EVENTS = 10000
    STOP_SECONDS = 30.0

    def __init__(self, addon: Any) -> None:
        self.addon = addon
        self.analyzer = Analyzer(sessions=SessionTracker(checkpoint_every=0))
        self._hooks = hooks(addon)
        self._flush = getattr(addon, "flush", None)
        self.worker = Worker(self._consume, self.QUEUE_EVENTS)

    @property
    def name(self) -> str:
        return type(self.addon).__name__

    @property
    def dropped(self) -> int:
        """Events the addon never got: its queue was full."""
        return self.worker.dropped

    def event(self, event: ProxyEvent) -> None:
        self.worker.offer(event)

    def done(self) -> None:
        self.worker.stop(self.STOP_SECONDS)
        done = getattr(self.addon, "done", None)
        if done is not None:
            done()

    def _consume(self, item: ProxyEvent | int) -> None:
        if isinstance(item, int):
            self._deliver(Note(time.time_ns(), -1, f"{item} events not dissected: "
                                                   f"{self.name} fell behind the relay"))
        elif item.__class__ is MessageRelayed:
            self._deliver(MessageDissected(self.analyzer.feed(item)))
        else:
            self.analyzer.event(item.record())
            self._deliver(item)
        if self._flush is not None and self.worker.queue.empty():
            self._flush()               # caught up: show what it has

    def _deliver(self, event: Any) -> None:
        hook = self._hooks.get(event.__class__)
        if hook is not None:
            hook(event)
