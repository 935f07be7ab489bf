"""Reference endpoints: a sample device server and a client that drives it."""

from __future__ import annotations

import argparse
import os

from ..errors import UserError


def add_commands(sub: argparse._SubParsersAction) -> None:
    server = sub.add_parser("sample-server", help="run the sample vfio-user device server",
                            description="Serve the sample PCI device on a UNIX socket.")
    server.add_argument("--listen", required=True, metavar="PATH")
    server.add_argument("--record", metavar="FILE", help="capture what the server sends and receives")
    server.add_argument("--id-value", type=lambda v: int(v, 0), metavar="N",
                        help="value of the ID register (to make replays diverge)")
    server.add_argument("--errno-for", action="append", default=[], metavar="CMD=ERRNO",
                        help="answer every CMD with ERRNO, e.g. DMA_MAP=EINVAL")
    server.add_argument("--accept-overlap", action="store_true",
                        help="accept overlapping DMA maps (the spec says EEXIST)")
    server.add_argument("--no-twin", action="store_true", help="never offer a twin socket")
    server.add_argument("--no-mmap", action="store_true",
                        help="offer no mmap-able region (QEMU then posts MMIO writes with "
                             "NO_REPLY); the sample client needs BAR2's mmap")
    server.add_argument("--caps-when-truncated", action="store_true",
                        help="set CAPS in a REGION_INFO reply cut to a small argsz, as Linux "
                             "VFIO does (QEMU refuses it)")
    server.add_argument("--dma-via-messages", action="store_true",
                        help="ignore DMA map fds: always use DMA_READ/DMA_WRITE messages")
    server.set_defaults(run=_run_server)
    client = sub.add_parser("sample-client", help="drive a server through every command",
                            description="Exercise every vfio-user command against a server "
                                        "and check each answer; exit 1 on any surprise.")
    client.add_argument("--server", required=True, metavar="PATH")
    client.add_argument("--record", metavar="FILE", help="capture what the client sends and receives")
    client.add_argument("--no-twin", action="store_true", help="do not offer a twin socket")
    client.add_argument("--id-value", type=lambda v: int(v, 0), metavar="N",
                        help="the ID register value to expect")
    client.add_argument("--protocol-only", action="store_true",
                        help="skip checks of mapped memory and interrupts, which no message "
                             "shows (for a recording served by vfu-inspect serve)")
    client.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                        help="fail when a reply takes longer (default %(default)s, QEMU's)")
    client.add_argument("--rounds", type=int, default=0, metavar="N",
                        help="benchmark: N REGION_READ round trips instead of the exercise")
    client.add_argument("--pipeline", type=int, default=1, metavar="K",
                        help="with --rounds: requests kept in flight")
    client.set_defaults(run=_run_client)


def _run_server(args: argparse.Namespace) -> int:
    from ..dissectors.vfio_user import CMD, ERRNO_NAMES
    from .sample_server import ServerOptions, serve
    by_name = {name: number for number, name in ERRNO_NAMES.items()}
    errno_for = {}
    for spec in args.errno_for:
        cmd, _, err = spec.partition("=")
        if cmd not in CMD or err not in by_name:
            raise UserError(f"--errno-for {spec!r}: want COMMAND=ERRNO, e.g. DMA_MAP=EINVAL")
        errno_for[CMD[cmd]] = by_name[err]
    options = ServerOptions(errno_for=errno_for, accept_overlap=args.accept_overlap,
                            no_twin=args.no_twin, dma_via_messages=args.dma_via_messages,
                            caps_when_truncated=args.caps_when_truncated, no_mmap=args.no_mmap,
                            record=args.record)
    if args.id_value is not None:
        options.id_value = args.id_value
    return serve(args.listen, options)


def _run_client(args: argparse.Namespace) -> int:
    from .sample_client import ClientOptions, run
    if not os.path.exists(args.server):
        raise UserError(f"{args.server}: no such socket")
    if not 0 < args.timeout <= 3600:
        raise UserError("--timeout: give 0 to 3600 seconds")
    options = ClientOptions(no_twin=args.no_twin, record=args.record, rounds=args.rounds,
                            pipeline=args.pipeline, protocol_only=args.protocol_only,
                            timeout=args.timeout)
    if args.id_value is not None:
        options.id_value = args.id_value
    return run(args.server, options)
