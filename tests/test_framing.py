"""The framer gives each message the fds the kernel delivers with it: checked
against Linux itself, over a real socketpair, with real fds."""

from __future__ import annotations

import os
import socket
import struct

import pytest
from hypothesis import given, settings, strategies as st

from vfu_inspect.framing import Frame, Framer, answered_early
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


def _header(msg_id: int, size: int, flags: int = 0, cmd: int = 10) -> bytes:
    return struct.pack("<HHIII", msg_id, cmd, size, flags, 0)


def _reply(msg_id: int) -> Frame:
    return Frame(_header(msg_id, 16, flags=0x21), 16)


def test_a_request_answered_after_its_header_is_cut_there_and_framing_goes_on():
    framer = Framer()
    assert framer.feed(_header(7, 1 << 20) + b"\x01\x02", ["fd"]) == []
    cut = answered_early(_reply(7), framer, waiting=lambda msg_id: False)
    assert [(f.data, f.size, f.fds) for f in cut] == [(_header(7, 1 << 20), 16, ["fd"])]
    assert "answered msg_id 0x7 after its header" in cut[0].error
    # the two bytes after the header start the next message (msg_id 0x0201)
    assert [f.data for f in framer.feed(_header(0x0201, 16)[2:])] == [_header(0x0201, 16)]


@pytest.mark.parametrize("pending, reply_id, waiting", [
    (_header(7, 64), 8, False),                  # another request's reply
    (_header(7, 64), 7, True),                   # a whole request with that id is in flight
    (_header(7, 64, flags=0x10), 7, False),      # NO_REPLY: it gets no answer
    (_header(7, 64, flags=0x1), 7, False),       # a reply being assembled answers nothing
], ids=["other-id", "whole-one-waits", "no-reply", "a-reply"])
def test_only_the_request_a_reply_answers_is_cut(pending, reply_id, waiting):
    framer = Framer()
    framer.feed(pending)
    assert answered_early(_reply(reply_id), framer, waiting=lambda msg_id: waiting) == []
    assert framer.pending == len(pending)


def test_an_oversized_request_answered_early_is_cut_too():
    framer = Framer(max_message=1024, keep=64)
    assert framer.feed(_header(3, 1 << 32 - 1)) == []
    cut = framer.cut_answered(3)
    assert [(len(f.data), f.truncated) for f in cut] == [(16, False)]
    assert [f.data for f in framer.feed(_header(4, 16))] == [_header(4, 16)]
