"""The framer gives each message the fds the kernel delivers with it: checked
against Linux itself, over a real socketpair, with real fds."""

from __future__ import annotations

import os
import socket

from hypothesis import given, settings, strategies as st

from vfu_inspect.framing import Framer
from vfu_inspect.sockio import recv_chunk, send_all

from test_fuzz import SAMPLES


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(SAMPLES), st.integers(0, 2)), min_size=1, max_size=25),
       st.lists(st.integers(1, 400), min_size=1, max_size=8))
def test_each_message_gets_the_fds_it_was_written_with(writes, read_sizes):
    """One sendmsg a message, as peers write; reads of any size, which the
    kernel ends after the first skb that carries fds."""
    sender, receiver = socket.socketpair()
    eventfd = os.eventfd(0)
    try:
        for data, nfds in writes:
            send_all(sender, data, [eventfd] * nfds)
        sender.close()
        framer, frames, i = Framer(), [], 0
        while True:
            data, fds = recv_chunk(receiver, read_sizes[i % len(read_sizes)])
            i += 1
            for fd in fds:
                os.close(fd)
            if not data:
                break
            frames += framer.feed(data, ["fd"] * len(fds))
        assert [(f.data, len(f.fds)) for f in frames] == list(writes)
    finally:
        os.close(eventfd)
        receiver.close()
