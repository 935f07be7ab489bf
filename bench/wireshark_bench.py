"""Benchmark pcapng export, and tshark with the Lua plugin against `read`.

Over a capture of N messages (the libvfio-user sample repeated, as in
read_bench.py): `vfu-inspect export` throughput, then the same work done by
`tshark -X lua_script:dissectors/vfio_user.lua` on the export and by
`vfu-inspect read` on the capture: plain summary lines, a display filter,
and the full detail tree (-V).  Prints each time and the ratio
tshark time / read time (above 1: vfu-inspect is faster).

    python bench/wireshark_bench.py [--messages N]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

from read_bench import bench_capture

from vfu_inspect import registry
from vfu_inspect.wireshark import PLUGIN

OURS_FILTER = "vfio_user.cmd == DMA_MAP && dma_map.size >= 0x1000"
THEIR_FILTER = "vfio_user.cmd == 2 && dma_map.size >= 0x1000"


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def vfu(*args: str) -> list[str]:
    return [sys.executable, "-m", "vfu_inspect", *args]


def main() -> None:
    registry.load()
    tshark = shutil.which("tshark")
    if tshark is None:
        sys.exit("tshark is not installed (apt-get install tshark)")
    with bench_capture(__doc__) as (capture, n):
        pcap = capture.with_suffix(".pcapng")
        seconds = timed(vfu("export", str(capture), "-o", str(pcap)))
        print(f"{n} messages; export: {seconds:.1f} s = {n / seconds:,.0f} msg/s, "
              f"{pcap.stat().st_size / n:.0f} bytes/message in pcapng")
        plugin = ["-X", f"lua_script:{PLUGIN}"]
        for label, ours, theirs in (
                ("plain", [], []),
                ("-Y", ["-Y", OURS_FILTER], ["-Y", THEIR_FILTER]),
                ("-V", ["-V"], ["-V"])):
            mine = timed(vfu("read", str(capture), *ours))
            other = timed([tshark, *plugin, "-r", str(pcap), *theirs])
            print(f"{label:6} read {mine:7.1f} s ({n / mine:8,.0f} msg/s)   "
                  f"tshark+plugin {other:7.1f} s ({n / other:8,.0f} msg/s)   "
                  f"tshark/read = {other / mine:.2f}")


if __name__ == "__main__":
    main()
