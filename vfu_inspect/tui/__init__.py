"""`vfu-inspect tui`: the terminal UI (see app.py), and how other commands start it."""

from __future__ import annotations

import argparse
import os


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tui", help="browse a capture or a live proxy in a terminal UI",
                       description="Wireshark's three panes in a terminal: message list, "
                                   "detail tree, hex. Press ? for the keys.")
    p.add_argument("file", nargs="?", help="capture file (followed while it grows)")
    p.add_argument("--attach", metavar="MONITOR",
                   help="a running proxy's --monitor socket")
    p.set_defaults(run=_run_tui)


def _run_tui(args: argparse.Namespace) -> int:
    from ..cli import UserError
    if (args.file is None) == (args.attach is None):
        raise UserError("give a capture FILE or --attach MONITOR")
    path = args.file or args.attach
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or socket")
    return run_tui(path, follow=True)


def run_tui(path: str, follow: bool) -> int:
    """Open the UI on a capture or monitor socket until the user quits."""
    from .app import InspectApp
    from .model import CaptureModel
    app = InspectApp(CaptureModel(path, follow=follow), follow=False)
    app.run()
    return 0
