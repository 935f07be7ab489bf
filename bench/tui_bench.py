"""The TUI on a capture of a million messages: first screen, filters, memory.

Runs the app headless (textual's pilot) on a capture built like read_bench's,
and prints the time from start to the first painted screen of messages, the
time to apply a header-only filter, a deep one and one on expert ids (each
with progress shown), the time until the background pass has read
everything, and peak RSS.
Targets: first screen <= 2 s, a filter <= 10 s, under 1.5 GB.

    python bench/tui_bench.py [--messages N]
"""

from __future__ import annotations

import asyncio
import resource
import time
from pathlib import Path

from read_bench import bench_capture

from vfu_inspect.tui.app import FilterBar, InspectApp
from vfu_inspect.tui.model import CaptureModel

HEADER_FILTER = "vfio_user.cmd == DMA_MAP"
DEEP_FILTER = "dma_map.size >= 0x1000"
EXPERT_FILTER = 'expert.id == "argsz.truncated"'



async def measure(path: Path) -> None:
    start = time.perf_counter()
    app = InspectApp(CaptureModel(str(path)))
    async with app.run_test(size=(160, 48)) as pilot:
        while not app.model.count or app.messages.entry() is None:
            await pilot.pause(0.01)
        await pilot.pause()                           # the screen is painted
        print(f"first screen: {time.perf_counter() - start:.2f} s "
              f"({app.model.count:,} messages read so far)")
        while not app.model.done:
            await pilot.pause(0.2)
        print(f"background pass done: {time.perf_counter() - start:.1f} s, "
              f"{app.model.count:,} messages")
        for text in (HEADER_FILTER, DEEP_FILTER, EXPERT_FILTER):
            await pilot.press("slash")
            app.query_one(FilterBar).value = text
            began = time.perf_counter()
            await pilot.press("enter")
            while app.filter_text != text:
                await pilot.pause(0.05)
            print(f"filter {text!r}: {time.perf_counter() - began:.1f} s, "
                  f"{len(app.matches):,} matches")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {rss:,.0f} MiB")


def main() -> None:
    with bench_capture(__doc__) as (path, count):
        print(f"built {count:,} messages")
        asyncio.run(measure(path))


if __name__ == "__main__":
    main()
