"""Random and mutated messages: the dissector and the framer never raise."""

from __future__ import annotations

import gc
import random
from pathlib import Path

from hypothesis import given, settings, strategies as st

from vfu_inspect.dissect import Analyzer, find_responses
from vfu_inspect.dissectors.vfio_user import Context, dissect_message
from vfu_inspect.fields import BYTES, PROTOCOL
from vfu_inspect.framing import Framer
from vfu_inspect.importers.trace_jsonl import import_trace
from vfu_inspect.output import detail_text, json_packet
from vfu_inspect.records import Message
from vfu_inspect.tree import SEVERITIES, Item

TRACE = Path(__file__).resolve().parent.parent / "captures" / "libvfio-user-samples.jsonl"
SAMPLES = [m.data for m in import_trace(str(TRACE)).records]


def check(data: bytes, request: bytes | None = None) -> None:
    tree, _ = dissect_message(data, Context("s2c", [{"kind": "memfd"}], request))
    for e in tree.experts:
        assert e.severity in SEVERITIES
        assert e.id != "dissector.bug", e.message     # the dissector raised: a bug
    for item in tree.walk():
        if item.offset >= 0:
            assert item.offset + item.length <= max(len(data), 16), item


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.4 and out:
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif choice < 0.55:
            out = out[:rng.randrange(len(out) + 1)]
        elif choice < 0.7:
            out += rng.randbytes(rng.randint(1, 64))
        elif choice < 0.85 and len(out) >= 4:
            out[2:4] = rng.randrange(20).to_bytes(2, "little")        # another command
        elif len(out) >= 12:
            out[8:12] = rng.choice([0, 1, 0x10, 0x21, 0x11, 7]).to_bytes(4, "little")
    return bytes(out)


def test_thousands_of_mutated_real_messages():
    rng = random.Random(1234)
    for _ in range(5000):
        data = rng.choice(SAMPLES)
        check(mutate(rng, data), request=rng.choice([None, rng.choice(SAMPLES)]))


def test_mutated_sessions_through_the_stateful_analysis():
    """Session tracking, stateful checks and device layers on damaged sessions:
    no exception, no dissector.bug."""
    rng = random.Random(4321)
    session = import_trace(str(TRACE)).records
    for _ in range(30):
        damaged = [Message(m.ts_ns, m.conn, m.channel, m.direction,
                           mutate(rng, m.data) if rng.random() < 0.2 else m.data, m.fds)
                   for m in session if isinstance(m, Message) and rng.random() < 0.95]
        for p in Analyzer(find_responses(damaged)).run(damaged):
            bugs = [e.message for e in p.tree.experts if e.id == "dissector.bug"]
            assert not bugs, (p.number, bugs)


def test_a_dissected_message_is_freed_without_the_garbage_collector():
    """Nothing a dissection builds refers back to its packet: garbage in a
    cycle waits for the collector, whose scans once cost `read` a third of
    its time.  With -V's and JSON's rendering, on the whole session and on
    damaged copies of it."""
    rng = random.Random(7)
    session = [m for m in import_trace(str(TRACE)).records if isinstance(m, Message)]
    gc.collect()
    gc.disable()
    try:
        for round_ in range(5):
            messages = [Message(m.ts_ns, m.conn, m.channel, m.direction,
                                mutate(rng, m.data) if round_ and rng.random() < 0.3 else m.data,
                                m.fds) for m in session]
            for p in Analyzer(find_responses(messages)).run(messages):
                detail_text(p), json_packet(p)
            del p
            assert gc.collect() == 0, round_
    finally:
        gc.enable()


def test_detail_text_and_json_render_the_tree_the_tui_shows():
    """-V and -T json read the tree's rows; the TUI walks its Items: on
    whole and damaged sessions, both show the same fields, nested alike."""
    rng = random.Random(99)
    session = [m for m in import_trace(str(TRACE)).records if isinstance(m, Message)]
    for round_ in range(20):
        messages = [Message(m.ts_ns, m.conn, m.channel, m.direction,
                            mutate(rng, m.data) if round_ and rng.random() < 0.3 else m.data,
                            m.fds) for m in session]
        for p in Analyzer(find_responses(messages)).run(messages):
            lines = [line for item in p.tree.items for line in _item_lines(item, "")]
            assert detail_text(p).split("\n")[:len(lines)] == lines, p.number
            assert json_packet(p)["layers"] == _item_json(p.tree.items), p.number


def _item_lines(item: Item, pad: str) -> list[str]:
    return [pad + item.line(), *(line for child in item.children
                                 for line in _item_lines(child, pad + "    "))]


def _item_json(items: list[Item]) -> dict:
    grouped: dict[str, list] = {}
    for item in items:
        name = item.field.name
        if item.field.type == PROTOCOL:
            grouped.setdefault(name, []).append(_item_json(item.children))
            continue
        grouped.setdefault(name, []).append(
            item.value.hex() if item.field.type == BYTES else item.value)
        if item.children:
            grouped.setdefault(f"{name}_tree", []).append(_item_json(item.children))
    return {key: values[0] if len(values) == 1 else values for key, values in grouped.items()}


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes(data):
    check(data)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(SAMPLES), min_size=1, max_size=30), st.randoms())
def test_framer_accounts_for_every_byte_and_fd(messages, rnd):
    stream = b"".join(messages)
    framer, frames, pos, fds_given = Framer(), [], 0, []
    while pos < len(stream):
        size = rnd.randint(1, 300)
        fds = [object() for _ in range(rnd.choice([0, 0, 0, 1, 2]))]
        fds_given += fds
        frames += framer.feed(stream[pos:pos + size], fds)
        pos += size
    tail = framer.close()
    frames += [tail] if tail else []
    assert b"".join(f.data for f in frames) == stream
    assert [f.data for f in frames] == messages
    got = [fd for f in frames for fd in f.fds]
    assert sorted(map(id, got)) == sorted(map(id, fds_given))     # none lost or doubled


def test_framer_memory_is_bounded_on_absurd_sizes():
    framer = Framer(keep=4096)
    header = (1).to_bytes(2, "little") + (10).to_bytes(2, "little") + (0xFFFFFFFF).to_bytes(
        4, "little") + bytes(8)
    assert framer.feed(header) == []
    for _ in range(256):                                  # 64 MiB of body
        assert framer.feed(bytes(1 << 18)) == []
        assert framer.pending == 0
    frame = framer.close()
    assert frame.truncated and len(frame.data) <= 4096 and frame.size == 0xFFFFFFFF


def test_framer_reports_lost_framing():
    framer = Framer()
    frames = framer.feed(bytes(4) + (3).to_bytes(4, "little") + bytes(20))
    assert frames[0].error and "framing lost" in frames[0].error
    assert framer.feed(b"more")[0].error.startswith("unframed bytes")
