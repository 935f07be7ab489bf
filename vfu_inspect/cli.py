"""The `vfu-inspect` command line: one sub-command per tool."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from typing import Callable, Iterable, Iterator, TextIO

from . import __version__, registry
from .capture import CaptureReader, CaptureWriter
from .dissect import Analyzer, find_responses
from .errors import CaptureError, ListenError, UserError
from .output import (SUMMARY_HEADER, detail_text, field_values, filter_values, hex_dump,
                     json_event, json_packet, summary_line, use_color)
from .packet import Dissected
from .records import Event, Message, Record
from .save import is_pcapng_name, open_writer, write_one
from .session import DEFAULT_TIMEOUT, SessionTracker

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return EXIT_USAGE
    registry.load()
    # What imports and load() built (scapy's layers, the registries) lives as
    # long as the process: keep it out of the collector's scans of the
    # per-message garbage.
    gc.freeze()
    try:
        return args.run(args)
    except UserError as exc:
        print(f"vfu-inspect: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CaptureError as exc:
        print(f"vfu-inspect: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # `vfu-inspect read … | head`: stop quietly, like other filters do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfu-inspect", description="Analyzer and proxy for the vfio-user protocol.")
    parser.add_argument("--version", action="version", version=f"vfu-inspect {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    _demo_parser(sub)
    _read_parser(sub)
    _check_parser(sub)
    _proxy_parser(sub)
    _import_parser(sub)
    _export_parser(sub)
    _wireshark_parser(sub)
    _replay_parser(sub)
    _serve_parser(sub)
    from .endpoints import add_commands
    add_commands(sub)
    from .tui import add_commands as add_tui
    add_tui(sub)
    return parser


# --- demo ----------------------------------------------------------------------

def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the sample server and client through the proxy",
                       description="Start the sample device server, the proxy and the sample "
                                   "client, show the session live and save it.")
    p.add_argument("-w", dest="write", default="vfu-demo.vfucap", metavar="FILE",
                   help="capture file to write (default: %(default)s)")
    p.add_argument("--no-twin", action="store_true", help="do not negotiate a twin socket")
    p.add_argument("--no-tui", action="store_true",
                   help="print lines even on a terminal (the TUI is the default there)")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    p.set_defaults(run=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    tui = not args.no_tui and sys.stdout.isatty() and sys.stdin.isatty()
    return run_demo(args.write, sys.stdout, use_color(args.color), twin=not args.no_twin,
                    tui=tui)


# --- read ----------------------------------------------------------------------

def _read_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("read", help="decode a capture file (like tshark -r)",
                       description="Print the messages of a capture, one line each, "
                                   "or decoded in full.")
    p.add_argument("file", nargs="?", help="capture file (.vfucap)")
    p.add_argument("--live", metavar="MONITOR",
                   help="read the live stream of a running proxy (its --monitor socket)")
    p.add_argument("-V", dest="verbose", action="store_true", help="print the detail tree")
    p.add_argument("-x", dest="hex", action="store_true", help="print a hex dump of each message")
    p.add_argument("-Y", dest="filter", metavar="FILTER", help="display filter, e.g. "
                   "'vfio_user.cmd == DMA_MAP && dma_map.size > 0x1000'")
    p.add_argument("-T", dest="format", choices=("text", "json", "fields"), default="text")
    p.add_argument("-e", dest="fields", action="append", default=[], metavar="FIELD",
                   help="field to print with -T fields (repeatable)")
    p.add_argument("-c", dest="count", type=int, metavar="N", help="stop after N messages shown")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep reading records appended to the file (Ctrl-C to stop)")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    p.add_argument("-2", dest="two_pass", action="store_true",
                   help="two passes: link requests to later replies, flag requests never answered")
    p.add_argument("-z", dest="stats", action="append", default=[], metavar="STAT",
                   help="statistics after the messages: 'expert' (expert info table), "
                        "'session,N' (each connection's state after message N) or 'irq' "
                        "(interrupts per vector, time from each MMIO write or doorbell to the "
                        "next interrupt)")
    p.add_argument("-q", dest="quiet", action="store_true",
                   help="print only the -z statistics, not the messages")
    p.add_argument("--events", action="store_true",
                   help="also print connection open/close/note, interrupt, doorbell and fault "
                        "events ('# …' lines; -T json: objects with \"event\"; -T fields: "
                        "a row per interrupt, doorbell or fault)")
    p.add_argument("-w", dest="write", metavar="OUT",
                   help="write the messages shown (the -Y matches) to OUT instead of "
                        "printing them: a capture, or pcapng when OUT ends in .pcapng")
    _add_timeout(p)
    p.set_defaults(run=cmd_read)


def _add_timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="flag requests unanswered for longer (default %(default)s s, QEMU's)")


def cmd_read(args: argparse.Namespace) -> int:
    if (args.file is None) == (args.live is None):
        raise UserError("give a capture FILE or --live MONITOR")
    if args.live:
        args.file, args.follow = args.live, True
    display = _compile(args.filter) if args.filter else None
    if args.format == "fields":
        if not args.fields:
            raise UserError("-T fields needs at least one -e FIELD")
        _check_fields(args.fields)
    needs_links = args.two_pass or args.verbose or args.format == "json" or (
        display is not None and "vfio_user.response_in" in display.fields) or (
        args.write is not None and is_pcapng_name(args.write))
    analyzer = _analyzer(args, two_pass=needs_links and not args.follow)
    stats = _stats(args.stats, analyzer)
    from .events import names_events
    events = args.events or display is not None and names_events(display.fields)
    with CaptureReader(args.file, follow=args.follow) as reader:
        packets = _tapped(analyzer.run(reader, events=True), stats)
        if args.write:
            _write_selection(args.write, f"read {args.file}", args.file,
                             _select(packets, display, args.count, events=True))
        elif args.quiet:
            _drain(_select(packets, display, args.count, events))
        else:
            _print_packets(args, _select(packets, display, args.count, events), sys.stdout)
        _report_damage(args.file, reader)
    for stat in stats:
        stat.render(sys.stdout)
    return EXIT_OK


def _write_selection(path: str, source: str, input_path: str,
                     records: Iterator[Dissected | Event]) -> None:
    """The selected messages (and, without a filter, the events) to a capture or pcapng."""
    with _output(open_writer, path, source, [input_path]) as writer:
        messages = _write_records(writer, records)
    print(f"wrote {messages} messages to {path}", file=sys.stderr)


def _write_records(writer, records: Iterator[Dissected | Event]) -> int:
    """Write them all; the number of messages."""
    messages = 0
    for record in records:
        write_one(writer, record)
        messages += isinstance(record, Dissected)
    return messages


def _analyzer(args: argparse.Namespace, two_pass: bool) -> Analyzer:
    if args.timeout <= 0:
        raise UserError("--timeout must be positive")
    responses = None
    if two_pass:
        with CaptureReader(args.file) as first_pass:
            responses = find_responses(first_pass)
    return Analyzer(responses, SessionTracker(timeout=args.timeout, checkpoint_every=0))


def _stats(specs: list[str], analyzer: Analyzer) -> list:
    from .stats import parse_stat
    try:
        return [parse_stat(spec, analyzer) for spec in specs]
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _tapped(packets: Iterator[Dissected | Event], stats: list) -> Iterator[Dissected | Event]:
    """Every packet and event goes to the statistics, whether or not it is shown."""
    for p in packets:
        for stat in stats:
            if isinstance(p, Dissected):
                stat.packet(p)
            elif hasattr(stat, "event"):
                stat.event(p)
        yield p


def _drain(packets: Iterator[Dissected]) -> None:
    for _ in packets:
        pass


def _report_damage(path: str, reader: CaptureReader) -> None:
    if reader.damage:
        print(f"vfu-inspect: warning: {path}: {reader.damage}", file=sys.stderr)


# --- check ---------------------------------------------------------------------

def _check_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="list protocol violations; exit 1 on any error (for CI)",
                       description="Analyze a capture in two passes and print every expert "
                                   "item, then the expert table. Exit 0 when no item has "
                                   "error severity (or the --fail-on one), 1 when one has, "
                                   "2 when the file cannot be read.")
    p.add_argument("file", nargs="?", help="capture file")
    p.add_argument("--list", action="store_true",
                   help="list every check: id, severity, meaning, where the rule comes from")
    p.add_argument("--markdown", action="store_true",
                   help="with --list: as the Markdown table README.md holds")
    p.add_argument("--fail-on", choices=("error", "warning"), default="error",
                   help="lowest severity that fails the check (default %(default)s)")
    p.add_argument("-q", dest="quiet", action="store_true", help="print only the table")
    _add_timeout(p)
    p.set_defaults(run=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    from .fields import EXPERTS, SEVERITIES, expert_table
    from .stats import ExpertStats
    if args.list and args.markdown:
        print(expert_table(), end="")
        return EXIT_OK
    if args.list:
        for d in sorted(EXPERTS.values(), key=lambda d: (d.group, d.id)):
            print(f"{d.id:<28} {d.severity:<8} {d.summary}  ({d.section})")
        return EXIT_OK
    if args.file is None:
        raise UserError("give a capture FILE (or --list)")
    if not os.path.isfile(args.file):
        raise UserError(f"{args.file}: no such file")
    table = ExpertStats()
    with CaptureReader(args.file) as reader:
        for p in _analyzer(args, two_pass=True).run(reader):
            table.packet(p)
            if not args.quiet:
                for e in p.tree.experts:
                    print(f"{p.number:>7} {e.severity:<7} {e.id:<26} {e.message}")
        _report_damage(args.file, reader)
    table.render(sys.stdout)
    worst = table.worst()
    failed = worst is not None and SEVERITIES.index(worst) <= SEVERITIES.index(args.fail_on)
    return EXIT_FAIL if failed else EXIT_OK


def _compile(text: str):
    from .dfilter import FilterError, compile_filter
    try:
        return compile_filter(text)
    except FilterError as exc:
        raise UserError(f"invalid display filter: {exc}\n  {text}\n  {' ' * exc.position}^") from None


def _check_fields(names: list[str]) -> None:
    from .fields import lookup
    unknown = [n for n in names if lookup(n) is None and not n.startswith("expert")]
    if unknown:
        raise UserError(f"unknown field(s): {', '.join(unknown)}")


def _select(packets: Iterator[Dissected], display, count: int | None,
            events: bool = False) -> Iterator[Dissected]:
    """The messages to show, and with `events` the events (those the filter
    matches, where it names interrupt, doorbell or fault fields)."""
    from .events import event_values
    shown = 0
    for p in packets:
        if count is not None and shown >= count:
            return
        if isinstance(p, Event):
            values = event_values(p) if display is not None else None
            if events and (display is None or values is not None and display.matches(values)):
                yield p
        elif display is None or display.matches(p.tree.values(display.fields)):
            shown += 1
            yield p


def _print_packets(args: argparse.Namespace, packets: Iterator[Dissected], out: TextIO) -> int:
    color = use_color(args.color)
    render: Callable[[Dissected], str]
    if args.format == "json":
        return _print_json(packets, out)
    if args.format == "fields":
        render = lambda p: "\t".join(field_values(p, args.fields))  # noqa: E731
        # no open/close/note rows (a message's values are taken once, by render)
        packets = (p for p in packets if not isinstance(p, Event) or filter_values(p))
    else:
        render = lambda p: _text(p, args, color)  # noqa: E731
        if not args.verbose and out.isatty():
            print(SUMMARY_HEADER, file=out)
    shown = 0
    write = out.write
    for p in packets:
        write(render(p) + "\n")
        shown += 1
    return shown


def _text(p: Dissected | Event, args: argparse.Namespace, color: bool) -> str:
    if isinstance(p, Event):
        from .events import describe_event
        return describe_event(p)
    parts = [detail_text(p) if args.verbose else summary_line(p, color)]
    if args.hex:
        parts.append(hex_dump(p.msg.data))
    if args.verbose or args.hex:
        parts.append("")
    return "\n".join(parts)


def _print_json(packets: Iterator[Dissected], out: TextIO) -> int:
    shown = 0
    out.write("[")
    for p in packets:
        out.write(",\n" if shown else "\n")
        out.write(json.dumps(json_event(p) if isinstance(p, Event) else json_packet(p)))
        shown += 1
    out.write("\n]\n")
    return shown


# --- proxy ---------------------------------------------------------------------

def _proxy_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("proxy", help="relay a vfio-user client to its server and record it",
                       description="Listen for vfio-user clients and relay each one to a "
                                   "new connection to the server, byte for byte, with its "
                                   "file descriptors.")
    p.add_argument("--listen", required=True, metavar="PATH",
                   help="socket the client connects to (created by the proxy)")
    p.add_argument("--server", required=True, metavar="PATH", help="the real server's socket")
    from .addons import add_options
    add_options(p)
    p.add_argument("--mode", type=lambda v: int(v, 8), default=0o600,
                   help="permissions of the created sockets, octal (default 600)")
    p.add_argument("--tui", action="store_true", help="show the session in the terminal UI")
    p.add_argument("--trace-irqs", action="store_true",
                   help="pass the proxy's own eventfds for interrupts (SET_IRQS) and doorbells "
                        "(REGION_IO_FDS), relay and record every signal")
    _add_faults(p)
    p.set_defaults(run=cmd_proxy)


def _add_faults(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fault", action="append", default=[], metavar="'FILTER: ACTION'",
                   help="inject a fault into the messages FILTER selects (repeatable): "
                        "errno E, delay D, drop, close before|after, rewrite FIELD=VALUE, "
                        "truncate N, duplicate; then nth=N, every=N or p=P [seed=S]")
    p.add_argument("--fault-file", action="append", default=[], metavar="FILE",
                   help="fault rules, one a line (# comments)")


def _injector(args: argparse.Namespace):
    """The --fault rules, or None when there are none."""
    from .faults import FaultError, FaultInjector, load_rules
    try:
        rules = load_rules(args.fault, args.fault_file)
    except FaultError as exc:
        raise UserError(str(exc)) from None
    return FaultInjector(rules) if rules else None


def cmd_proxy(args: argparse.Namespace) -> int:
    from .addons import AddonContext, load_addons
    from .proxy import Proxy
    source = f"proxy {args.listen} -> {args.server}"
    faults = _injector(args)
    addons: list = []
    if args.tui and args.print:
        raise UserError("--tui and --print both want the terminal: choose one")
    if args.tui and not args.monitor:       # the UI attaches to the monitor stream
        args.monitor = os.path.join(tempfile.mkdtemp(prefix="vfu-tui-"), "monitor.sock")
    try:
        addons = load_addons(args, AddonContext(source, sys.stdout, args.mode))
        proxy = Proxy(args.listen, args.server, addons, args.mode, log=_log, faults=faults,
                      trace_irqs=args.trace_irqs)
        proxy.start()
    except (ListenError, OSError) as exc:
        for addon in addons:
            addon.done()
        raise UserError(str(exc)) from None
    if args.tui:
        from .tui import run_with_proxy
        return run_with_proxy(proxy, args.monitor)
    proxy.install_signal_handlers()
    _log(f"listening on {args.listen}, relaying to {args.server}"
         + (f", writing {args.write}" if args.write else ""))
    proxy.run()
    return EXIT_OK


def _log(text: str) -> None:
    print(f"vfu-inspect: {text}", file=sys.stderr, flush=True)


# --- import --------------------------------------------------------------------

def _import_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="convert a JSON Lines trace or strace log to a capture",
                       description="Build a capture file from a JSON Lines message trace "
                                   "or from strace logs of the client and/or server.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="trace file (.jsonl) or strace log(s) (strace -f -yy -xx ...)")
    p.add_argument("-o", "--output", required=True, help="capture file to write")
    p.add_argument("--format", choices=("auto", "jsonl", "strace", "pcapng"), default="auto")
    p.set_defaults(run=cmd_import)


def cmd_import(args: argparse.Namespace) -> int:
    for path in args.inputs:
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such file")
    fmt = args.format if args.format != "auto" else _detect_format(args.inputs[0])
    if fmt in ("pcapng", "jsonl") and len(args.inputs) != 1:
        raise UserError(f"a {fmt} file is imported one file at a time")
    records, problems = _imported(fmt, args.inputs)
    messages = 0
    with _output(CaptureWriter, args.output, f"import {fmt}: {' '.join(args.inputs)}",
                 args.inputs, autoflush=False) as writer:
        for record in records:          # streamed: a big pcapng is never held whole
            writer.write(record)
            messages += isinstance(record, Message)
    for problem in problems:
        print(f"vfu-inspect: warning: {problem}", file=sys.stderr)
    if not messages:
        os.unlink(args.output)
        raise UserError(f"no vfio-user message found in {', '.join(args.inputs)}")
    print(f"wrote {messages} messages to {args.output}", file=sys.stderr)
    return EXIT_OK


def _imported(fmt: str, inputs: list[str]) -> tuple[Iterable[Record], list[str]]:
    """The records of the inputs, and a list of problems filled as they are read."""
    if fmt == "pcapng":
        from .pcapng import iter_pcapng
        problems: list[str] = []
        return iter_pcapng(inputs[0], problems), problems
    if fmt == "jsonl":
        from .importers.trace_jsonl import import_trace
        result = import_trace(inputs[0])
    else:
        from .importers.strace import import_strace
        result = import_strace(inputs)
    return result.records, result.problems


def _detect_format(path: str) -> str:
    from .pcapng import is_pcapng
    if is_pcapng(path):
        return "pcapng"
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    return "jsonl" if line.lstrip().startswith("{") else "strace"
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror}") from None
    raise UserError(f"{path} is empty")


# --- export and the Wireshark plugin ----------------------------------------------

def _export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a capture as pcapng for Wireshark",
                       description="Write a capture as a pcapng file that Wireshark and "
                                   "tshark open with the vfio_user Lua plugin: one packet per "
                                   "message, a comment listing its fds and expert items.")
    p.add_argument("file", help="capture file")
    p.add_argument("-o", "--output", required=True, help="pcapng file to write")
    p.add_argument("-Y", dest="filter", metavar="FILTER",
                   help="only the messages this display filter selects (as read -Y)")
    _add_timeout(p)
    p.set_defaults(run=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from .pcapng import PcapngFileWriter
    display = _compile(args.filter) if args.filter else None
    analyzer = _analyzer(args, two_pass=True)
    with CaptureReader(args.file) as reader, \
            _output(PcapngFileWriter, args.output, f"export of {args.file}", [args.file]) as writer:
        messages = _write_records(writer, _select(analyzer.run(reader, events=True), display,
                                                  None, events=True))
        _report_damage(args.file, reader)
    print(f"wrote {messages} messages to {args.output}", file=sys.stderr)
    return EXIT_OK


def _output(factory, path: str, source: str, inputs: list[str], **options):
    """The writer of `path`, refusing to overwrite an input it is made from."""
    for name in inputs:
        if os.path.exists(path) and os.path.samefile(path, name):
            raise UserError(f"{path} is also the input: choose another output")
    try:
        return factory(path, source, **options)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}") from None


def _wireshark_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("wireshark-plugin", help="the Wireshark Lua dissector: path, install",
                       description="Print the path of the vfio_user Lua plugin, copy it to "
                                   "Wireshark's personal plugins folder, or regenerate it "
                                   "from the field registry.")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--install", nargs="?", const="", metavar="DIR",
                        help="copy the plugin to DIR (default: Wireshark's personal "
                             "plugins folder, ~/.config/wireshark/plugins)")
    action.add_argument("--generate", action="store_true",
                        help="rewrite dissectors/vfio_user.lua from the registry (developers)")
    p.set_defaults(run=cmd_wireshark_plugin)


def cmd_wireshark_plugin(args: argparse.Namespace) -> int:
    from . import wireshark
    from pathlib import Path
    try:
        if args.generate:
            wireshark.PLUGIN.write_text(wireshark.generate())
            print(wireshark.PLUGIN)
        elif args.install is not None:
            print(wireshark.install(Path(args.install) if args.install else None))
        else:
            print(wireshark.PLUGIN)
    except OSError as exc:
        raise UserError(f"{exc.filename or wireshark.PLUGIN}: {exc.strerror}") from None
    return EXIT_OK


# --- replay --------------------------------------------------------------------

def _replay_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="be the client of a recorded session against a server",
                       description="Send a recorded connection's client commands to a live "
                                   "server and report where its answers diverge. Exit 0 when "
                                   "they match, 1 when they diverge, 2 when the replay cannot run.")
    p.add_argument("file", help="capture file")
    p.add_argument("--server", required=True, metavar="PATH")
    p.add_argument("--conn", type=int, help="connection to replay (default: the first)")
    p.add_argument("--ignore", action="append", default=[], metavar="FIELD",
                   help="a field (or prefix ending in '.') that may differ, e.g. region_read.data")
    p.add_argument("-w", dest="write", metavar="FILE", help="record the replayed session")
    _add_faults(p)
    p.set_defaults(run=cmd_replay)


def cmd_replay(args: argparse.Namespace) -> int:
    from .endpoints.common import Recorder
    from .replay import Replayer, ReplayError, load_connection
    faults = _injector(args)
    recorder = Recorder(args.write, f"replay {args.file}") if args.write else None
    try:
        recording = load_connection(args.file, args.conn)
        outcome = Replayer(recording, args.server, args.ignore, sys.stdout, recorder,
                           faults).run()
    except ReplayError as exc:
        raise UserError(f"replay failed: {exc}") from None
    finally:
        if recorder:
            recorder.close()
    diverged = len(outcome.divergences)
    injected = f", {outcome.faults} faults injected" if faults else ""
    print(f"replay of connection {recording.conn}: {outcome.sent} requests sent, "
          f"{outcome.matched} answers matched, {diverged} diverged{injected}")
    return EXIT_FAIL if diverged else EXIT_OK


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="be the server of a recorded session",
                       description="Answer clients with the recorded replies of matching "
                                   "recorded requests. Exit 1 if a request had no recorded answer.")
    p.add_argument("file", help="capture file")
    p.add_argument("--listen", required=True, metavar="PATH")
    p.add_argument("--conn", type=int, help="recorded connection to serve to every client "
                   "(default: the n-th client gets connection n)")
    p.add_argument("--ignore", action="append", default=[], metavar="FIELD",
                   help="a request field (or prefix ending in '.') not compared when matching")
    p.add_argument("--close-on-unknown", action="store_true",
                   help="close the connection on a request with no recorded answer "
                        "(default: answer EINVAL)")
    p.add_argument("--clients", type=int, metavar="N", help="exit after serving N clients")
    p.set_defaults(run=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from .replay import ReplayError
    from .serve import serve_recording
    try:
        unknown = serve_recording(args.file, args.listen, args.conn, args.ignore,
                                  args.close_on_unknown, sys.stdout, args.clients)
    except ReplayError as exc:
        raise UserError(f"serve failed: {exc}") from None
    return EXIT_FAIL if unknown else EXIT_OK
