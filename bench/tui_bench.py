"""The TUI on a capture of a million messages: first screen, live filter, session, memory.

Runs the app headless (textual's pilot) on a capture built like read_bench's
and prints: the time from start to the first painted screen of messages (also
from launch in a tmux pane, when tmux is there); a
filter applied at once, during the background read, and the time until it
has covered every message, with whether its matches equal `read -2 -Y`'s;
the time until the status line says done; the time the session screen takes
at the last message; and peak RSS.
Targets: first screen <= 1 s, session screen <= 1 s, peak RSS <= 600 MB.

    python bench/tui_bench.py [--messages N]
"""

from __future__ import annotations

import asyncio
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from read_bench import bench_capture

from vfu_inspect import registry
from vfu_inspect.tui.app import FilterBar, InspectApp
from vfu_inspect.tui.model import CaptureModel

LIVE_FILTER = "vfio_user.flags.error || vfio_user.cmd == DMA_UNMAP"
DEEP_FILTER = "dma_map.size >= 0x1000"


def read_matches(path: Path, text: str) -> list[int]:
    out = subprocess.run([sys.executable, "-m", "vfu_inspect", "read", str(path), "-2", "-Y", text,
                          "-T", "fields", "-e", "frame.number"], check=True,
                         capture_output=True, text=True).stdout
    return [int(n) for n in out.split()]


def status(app: InspectApp) -> str:
    return str(app.query_one("#status").render())


async def apply(pilot, app: InspectApp, text: str) -> None:
    await pilot.press("slash")
    app.query_one(FilterBar).value = text
    await pilot.press("enter")


def tmux_first_screen(path: Path, rows: int = 10, runs: int = 5) -> float | None:
    """Median seconds from launching `vfu-inspect tui` in a 160x48 tmux pane
    until it shows message `rows`, interpreter start and imports included; None
    without tmux.  Measured as an installed tool starts: with its bytecode
    cached, so a first unmeasured launch writes it, and PYTHONDONTWRITEBYTECODE
    (which makes every start compile the package again, ~0.15 s) is unset."""
    if shutil.which("tmux") is None:
        return None
    command = shlex.join(["env", "-u", "PYTHONDONTWRITEBYTECODE", sys.executable,
                          "-m", "vfu_inspect", "tui", str(path)])
    times = [_tmux_launch(command, rows) for _ in range(runs + 1)][1:]
    measured = [t for t in times if t is not None]
    return statistics.median(measured) if measured else None


def _tmux_launch(command: str, rows: int) -> float | None:
    session = f"tui-bench-{os.getpid()}"
    start = time.perf_counter()
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "48",
                    command], check=True)
    try:
        while time.perf_counter() - start < 30:
            pane = subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                  capture_output=True, text=True).stdout
            if any(line.split()[:1] == [str(rows)] for line in pane.splitlines()):
                return time.perf_counter() - start
            time.sleep(0.01)
        return None
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


async def measure(path: Path, count: int) -> None:
    start = time.perf_counter()
    model = CaptureModel(str(path), follow=True)
    painted: list[float] = []
    shown = model.shown                     # the app calls it once its first screen is painted
    model.shown = lambda: (painted.append(time.perf_counter()), shown())
    app = InspectApp(model)
    async with app.run_test(size=(160, 48)) as pilot:
        while not painted:
            await pilot.pause(0.01)
        print(f"first screen: {painted[0] - start:.2f} s in-process "
              f"({app.model.count:,} messages read so far)")
        await apply(pilot, app, LIVE_FILTER)
        print(f"filter {LIVE_FILTER!r} applied with {app.model.count:,} messages read, "
              f"status: {status(app)!r}")
        while not ("done" in status(app) and app.live[LIVE_FILTER].upto == count
                   and app.filter_text == LIVE_FILTER):
            await pilot.pause(0.2)
        live = list(app.matches)
        print(f"background pass and live filter done: {time.perf_counter() - start:.1f} s, "
              f"{app.model.count:,} messages, {len(live):,} matches; status: {status(app)!r}")
        began = time.perf_counter()
        await apply(pilot, app, DEEP_FILTER)
        while app.filter_text != DEEP_FILTER:
            await pilot.pause(0.05)
        print(f"filter {DEEP_FILTER!r}: {time.perf_counter() - began:.2f} s, "
              f"{len(app.matches):,} matches")
        await pilot.press("G")
        began = time.perf_counter()
        await pilot.press("i")
        while "after message" not in str(app.screen.query_one("#title").render()) or \
                "(" not in str(app.screen.query_one("#title").render()):
            await pilot.pause(0.01)
        print(f"session screen at message {app.messages.entry():,}: "
              f"{time.perf_counter() - began:.2f} s")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {rss:,.0f} MiB")
    same = live == read_matches(path, LIVE_FILTER)
    print(f"live filter's matches equal read -2 -Y's: {same}")


def main() -> None:
    registry.load()
    with bench_capture(__doc__) as (path, count):
        print(f"built {count:,} messages")
        tmux = tmux_first_screen(path)
        print("first screen in tmux (median of 5): "
              + (f"{tmux:.2f} s" if tmux is not None else "no tmux"))
        asyncio.run(measure(path, count))


if __name__ == "__main__":
    main()
