"""`vfu-inspect tui`: the terminal UI (see app.py), and how other commands start it."""

from __future__ import annotations

import argparse
import os
import sys
import threading
from typing import Any, Callable

from ..errors import CaptureError, UserError


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tui", help="browse a capture or a live proxy in a terminal UI",
                       description="Wireshark's three panes in a terminal: message list, "
                                   "detail tree, hex. Press ? for the keys.")
    p.add_argument("file", nargs="?", help="capture file (followed while it grows)")
    p.add_argument("--attach", metavar="MONITOR",
                   help="a running proxy's --monitor socket")
    p.set_defaults(run=_run_tui)


def _run_tui(args: argparse.Namespace) -> int:
    if (args.file is None) == (args.attach is None):
        raise UserError("give a capture FILE or --attach MONITOR")
    path = args.file or args.attach
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or socket")
    run_tui(path, follow=True)
    return 0


def run_tui(path: str, follow: bool, then: Callable[[], Any] = lambda: None,
            live_proxy: bool = False) -> str | None:
    """Open the UI on a capture or monitor socket until the user quits; `then`
    runs once the UI is reading (so that a live stream misses nothing).  With
    `live_proxy`, quitting asks whether to detach or stop: the answer is returned."""
    from .app import InspectApp
    from .model import CaptureModel
    try:
        model = CaptureModel(path, follow=follow)
    except CaptureError as exc:
        raise UserError(str(exc)) from None
    then()
    return InspectApp(model, follow=model.live, live_proxy=live_proxy).run()


def run_with_proxy(proxy: Any, monitor: str, then: Callable[[], Any] = lambda: None) -> int:
    """Relay on a thread while the UI, attached to the proxy's monitor, runs
    here; when the user detaches, relay on without it until a signal stops it."""
    from .app import DETACH
    relay = threading.Thread(target=proxy.run, daemon=True)
    relay.start()
    try:
        if run_tui(monitor, follow=True, then=then, live_proxy=True) == DETACH:
            proxy.install_signal_handlers()
            print("vfu-inspect: detached from the UI, still relaying: Ctrl-C or SIGTERM "
                  "stops the proxy", file=sys.stderr, flush=True)
            while relay.is_alive():
                relay.join(0.5)
        return 0
    finally:
        proxy.stop()
        relay.join(timeout=5)
