"""Addons: the typed events the proxy core gives them, the options they
declare, and the worker that dissects for them off the relay thread."""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
from pathlib import Path

import pytest

from helpers import run_vfu, stop, vfu, wait_for_socket
from vfu_inspect import addons
from vfu_inspect.addons import AddonContext, SaveAddon, load_addons, option
from vfu_inspect.capture import read_all
from vfu_inspect.records import C2S, MAIN, S2C, Message
from vfu_inspect.cli import build_parser
from vfu_inspect.faults import FaultInjector, load_rules
from vfu_inspect.offload import Dissection
from vfu_inspect.proxy import Proxy
from vfu_inspect.proxy_events import (BurstRelayed, ConnectionClosed, ConnectionOpened,
                                      Doorbell, FaultInjected, Interrupt, MessageDissected,
                                      MessageRelayed, Note, event_from_record, hooks)

DELAY_VERSION = "vfio_user.cmd == VERSION && frame.dir == c2s: delay 1ms"


class Recorder:
    """Every event, as the proxy hands it over."""

    def __init__(self) -> None:
        self.events: list = []

    def event(self, event) -> None:
        self.events.append(event)


@contextlib.contextmanager
def proxy_in_process(tmp_path: Path, addon_list: list, **options):
    """The sample server behind a Proxy relaying on a thread here: yields the
    socket to connect to and the proxy's log."""
    real, listen = tmp_path / "server.sock", tmp_path / "proxy.sock"
    server = vfu("sample-server", "--listen", str(real))
    log: list[str] = []
    try:
        wait_for_socket(real, server)
        proxy = Proxy(str(listen), str(real), addon_list, log=log.append, **options)
        proxy.start()
        relay = threading.Thread(target=proxy.run)
        relay.start()
        try:
            yield listen, log
        finally:
            proxy.stop()
            relay.join()
    finally:
        stop(server)


def sample_client(listen: Path) -> None:
    result = run_vfu("sample-client", "--server", str(listen))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_the_proxy_core_emits_typed_events_that_are_the_capture(tmp_path):
    recorder, capture = Recorder(), tmp_path / "proxy.vfucap"
    faults = FaultInjector(load_rules([DELAY_VERSION]))
    with proxy_in_process(tmp_path, [recorder, SaveAddon(str(capture), "test")],
                          trace_irqs=True, faults=faults) as (listen, _):
        sample_client(listen)
    seen = recorder.events
    kinds = {type(e) for e in seen}
    assert kinds == {ConnectionOpened, MessageRelayed, Note, Interrupt, Doorbell,
                     FaultInjected, ConnectionClosed}
    opened, closed = seen[0], seen[-1]
    assert isinstance(opened, ConnectionOpened) and opened.trace_irqs
    assert opened.faults == [DELAY_VERSION]
    assert isinstance(closed, ConnectionClosed) and closed.by == "client"
    messages = [e for e in seen if isinstance(e, MessageRelayed)]
    assert {m.direction for m in messages} == {C2S, S2C}
    assert {m.channel for m in messages} == {0, 1}          # main and the twin socket
    assert any(fd["kind"] == "memfd" for m in messages for fd in m.fds)
    assert all(m.ts_ns and m.data for m in messages)
    assert any("twin socket" in e.text for e in seen if isinstance(e, Note))
    # what the capture holds is what the addons were told, record for record
    records, damage = read_all(capture)
    assert damage is None
    assert [r.to_record() for r in records] == [e.record().to_record() for e in seen]
    # and each event comes back from its record (for an addon in its own process)
    events = [e for e in seen if not isinstance(e, MessageRelayed)]
    assert [event_from_record(e.record()) for e in events] == events


def test_a_burst_reaches_a_message_hook_message_by_message():
    class OneByOne:
        def __init__(self) -> None:
            self.got: list = []

        def message(self, event) -> None:
            self.got.append(event)

    burst = BurstRelayed(5, 0, MAIN, S2C, bytes(range(16)) + bytes(range(16, 40)), [16, 24])
    addon, recorder = OneByOne(), Recorder()
    hooks(addon)[BurstRelayed](burst)
    hooks(recorder)[BurstRelayed](burst)
    assert addon.got == [MessageRelayed(5, 0, MAIN, S2C, bytes(range(16))),
                         MessageRelayed(5, 0, MAIN, S2C, bytes(range(16, 40)))]
    assert all(type(event) is MessageRelayed for event in addon.got)
    assert recorder.events == [burst]           # an addon without `message` gets it whole


class SlowPrinter:
    """Dissects (in the proxy's child process), and stays stuck in its first
    message until the file `release` exists; writes what it got to `out`."""

    wants_dissection = True

    def __init__(self, release: Path, out: Path) -> None:
        self.release, self.out = release, out

    def message_dissected(self, event: MessageDissected) -> None:
        while not self.release.exists():
            time.sleep(0.01)
        p = event.packet
        self._write(f"message {p.number} {p.header.command_name}")

    def note(self, event: Note) -> None:
        self._write(f"note {event.conn} {event.text}")

    def _write(self, line: str) -> None:
        with open(self.out, "a") as out:
            out.write(line + "\n")


def test_a_stuck_dissecting_addon_neither_stalls_nor_alters_the_relay(tmp_path, monkeypatch):
    # at most about 10 KiB wait for the child, of the session's ~56 KiB of records
    monkeypatch.setattr(Dissection, "BATCH_BYTES", 1024)
    monkeypatch.setattr(Dissection, "QUEUE_BATCHES", 1)
    monkeypatch.setattr(Dissection, "PIPE_BYTES", 4096)
    printer = SlowPrinter(tmp_path / "release", tmp_path / "printed")
    capture = tmp_path / "proxy.vfucap"
    with proxy_in_process(tmp_path, [printer, SaveAddon(str(capture), "test")]) as (listen, log):
        sample_client(listen)           # every round trip while the addon is stuck
        printer.release.touch()
    records, _ = read_all(capture)
    relayed = sum(isinstance(r, Message) for r in records)
    lines = printer.out.read_text().splitlines()
    got = [line for line in lines if line.startswith("message ")]
    assert 0 < len(got) < relayed
    notes = [line.split(" ", 2)[2] for line in lines if line.startswith("note -1 ")]
    dropped = [int(text.split()[0]) for text in notes]
    assert dropped and "fell behind" in notes[-1]
    assert any(f"{sum(dropped)} events not dissected" in line for line in log)
    # what it got is dissected: the first message is the client's VERSION
    assert got[0] == "message 1 VERSION"


def test_print_shows_what_read_events_shows_of_the_capture(tmp_path):
    real, listen, capture = tmp_path / "s.sock", tmp_path / "p.sock", tmp_path / "c.vfucap"
    server = vfu("sample-server", "--listen", str(real))
    wait_for_socket(real, server)
    proxy = vfu("proxy", "--listen", str(listen), "--server", str(real), "-w", str(capture),
                "--print", "--trace-irqs")
    try:
        wait_for_socket(listen, proxy)
        sample_client(listen)
    finally:
        assert stop(proxy) == 0
        stop(server)
    printed = proxy.stdout.read()
    read = run_vfu("read", str(capture), "--events")
    assert read.returncode == 0, read.stderr
    assert printed == read.stdout and printed.count("\n") > 200


class Tagger:
    """An addon known only by the list: its option and its instance."""

    options = [option("--tag", metavar="TEXT", help="tag every event (test addon)")]

    @classmethod
    def from_options(cls, options: argparse.Namespace, context: AddonContext):
        return cls(options.tag) if options.tag else None

    def __init__(self, tag: str) -> None:
        self.tag = tag


def proxy_help(capsys) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["proxy", "--help"])
    return capsys.readouterr().out


def test_an_addon_in_the_list_gets_its_options_on_the_command_line(tmp_path, monkeypatch,
                                                                   capsys):
    argv = ["proxy", "--listen", "p", "--server", "s", "-w", str(tmp_path / "c.vfucap"),
            "--tag", "x"]
    assert "--tag" not in proxy_help(capsys)          # not listed: not an option
    monkeypatch.setattr(addons, "ADDONS", [*addons.ADDONS, Tagger])
    assert "tag every event (test addon)" in proxy_help(capsys)
    args = build_parser().parse_args(argv)
    loaded = load_addons(args, AddonContext("test"))
    try:
        assert [type(a) for a in loaded] == [SaveAddon, Tagger] and loaded[1].tag == "x"
    finally:
        loaded[0].done()


def test_proxy_help_keeps_the_addon_options():
    result = run_vfu("proxy", "--help")
    assert result.returncode == 0
    for flag in ("-w FILE", "--print", "--monitor PATH", "--color {auto,always,never}",
                 "--mode MODE", "--tui", "--trace-irqs", "--fault"):
        assert flag in result.stdout, flag


class CrashingPrinter:
    """Dissects, and raises on the third message (in the proxy's child process)."""

    wants_dissection = True

    def message_dissected(self, event: MessageDissected) -> None:
        if event.packet.number == 3:
            raise RuntimeError("addon bug")


def test_a_crashing_dissecting_addon_leaves_the_relay_and_the_capture_whole(tmp_path, capfd):
    capture = tmp_path / "proxy.vfucap"
    with proxy_in_process(tmp_path, [CrashingPrinter(), SaveAddon(str(capture), "test")]) \
            as (listen, log):
        sample_client(listen)           # every round trip answered, after the child died
    records, damage = read_all(capture)
    assert damage is None and sum(isinstance(r, Message) for r in records) == 220
    assert "RuntimeError: addon bug" in capfd.readouterr().err     # the child's traceback
    assert any(line.startswith("CrashingPrinter: its process ended with status 1") for line in log)
