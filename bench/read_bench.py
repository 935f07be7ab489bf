"""Benchmark `vfu-inspect read` on a capture of a million messages.

Builds the capture by repeating the sample session (each repetition on its
own connection id, timestamps continuing), then prints: file size per
message, time to open the file and print the first screenful, and the
throughput of `read` (summary), `read -T json` and `read -Y`.

    python bench/read_bench.py [--messages N] [--keep FILE]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from vfu_inspect import registry
from vfu_inspect.capture import CaptureWriter, read_all
from vfu_inspect.records import Message

SAMPLE = Path(__file__).resolve().parent.parent / "captures" / "libvfio-user-samples.vfucap"
FILTER = "vfio_user.cmd == DMA_MAP && dma_map.size >= 0x1000"


def build(path: Path, count: int) -> int:
    records, _ = read_all(SAMPLE)
    session = [r for r in records if isinstance(r, Message)]
    span = session[-1].ts_ns - session[0].ts_ns + 1000
    written = 0
    with CaptureWriter(path, source="bench", autoflush=False) as writer:
        rep = 0
        while written < count:
            chunk = session[:count - written]
            for m in chunk:
                writer.write(Message(m.ts_ns + rep * span, m.conn + 2 * rep, m.channel,
                                     m.direction, m.data, m.fds, m.size))
            written += len(chunk)
            rep += 1
    return written


@contextmanager
def bench_capture(doc: str) -> Iterator[tuple[Path, int]]:
    """For the other benchmarks: parse --messages N, build that capture in a
    temporary directory, yield its path and size."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.vfucap"
        yield path, build(path, args.messages)


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vfu_inspect", *args], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    registry.load()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--keep", help="write the capture here and keep it")
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory()
    path = Path(args.keep or Path(tmp.name) / "bench.vfucap")
    start = time.perf_counter()
    n = build(path, args.messages)
    print(f"built {n} messages in {time.perf_counter() - start:.1f} s: {path}")
    print(f"file size per message: {os.path.getsize(path) / n:.1f} bytes")
    first = timed(["read", str(path), "-c", "50"])
    print(f"open + first screenful (50 lines): {first:.3f} s")
    for label, extra in (("read (summary)", []), ("read -T json", ["-T", "json"]),
                         (f"read -Y '{FILTER}'", ["-Y", FILTER])):
        seconds = timed(["read", str(path), *extra])
        print(f"{label}: {seconds:.1f} s, {n / seconds:,.0f} messages/s")


if __name__ == "__main__":
    main()
