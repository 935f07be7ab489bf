"""Benchmark `vfu-inspect read` on a capture of a million messages.

Builds the capture by repeating the sample session (each repetition on its
own connection id, timestamps continuing), then prints: file size per
message, time to open the file and print the first screenful, and the
throughput of `read` (summary), `read -T json`, `read -V` and `read -Y` on a
header field and on a command field; with --against, each also with an
earlier checkout, right after, and the ratio (the issue's "against today's
figures, in one run": this machine's speed drifts too much between runs);
with --pairs N, N such pairs in turns, and the median ratio with its spread.

    python bench/read_bench.py [--messages N] [--keep FILE] [--against TREE [--pairs N]]
"""

from __future__ import annotations

import argparse
import os
import statistics
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
HEADER_FILTER = "vfio_user.cmd == DMA_MAP"
MODES = (("read (summary)", []), ("read -T json", ["-T", "json"]), ("read -V", ["-V"]),
         (f"read -Y '{HEADER_FILTER}'", ["-Y", HEADER_FILTER]),
         (f"read -Y '{FILTER}'", ["-Y", FILTER]))


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


def timed(args: list[str], tree: str | None = None) -> float:
    """Seconds `vfu-inspect ARGS` takes; with `tree`, the vfu_inspect of that
    checkout (a git worktree of an earlier commit) instead of this one."""
    env = dict(os.environ, PYTHONPATH=tree) if tree else None
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vfu_inspect", *args], check=True,
                   stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def main() -> None:
    registry.load()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--keep", help="write the capture here and keep it")
    parser.add_argument("--against", metavar="TREE",
                        help="also time a checkout of an earlier commit, each mode right "
                             "after this one's, and print this tree's speed-up")
    parser.add_argument("--pairs", type=int, default=1, metavar="N",
                        help="with --against, time each mode N times in both trees, "
                             "alternating which goes first; print the median speed-up")
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    tmp = tempfile.TemporaryDirectory()
    path = Path(args.keep or Path(tmp.name) / "bench.vfucap")
    start = time.perf_counter()
    n = build(path, args.messages)
    print(f"built {n} messages in {time.perf_counter() - start:.1f} s: {path}")
    print(f"file size per message: {os.path.getsize(path) / n:.1f} bytes")
    first = timed(["read", str(path), "-c", "50"])
    print(f"open + first screenful (50 lines): {first:.3f} s")
    for label, extra in MODES:
        if not args.against:
            seconds = timed(["read", str(path), *extra])
            print(f"{label}: {seconds:.1f} s, {n / seconds:,.0f} messages/s", flush=True)
            continue
        now, before = alternated(["read", str(path), *extra], args.against, args.pairs)
        ratios = [b / a for a, b in zip(now, before)]
        seconds, earlier = statistics.median(now), statistics.median(before)
        spread = f" (pairs {min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
        print(f"{label}: {seconds:.1f} s, {n / seconds:,.0f} messages/s; {args.against}: "
              f"{earlier:.1f} s, {n / earlier:,.0f} messages/s: "
              f"{statistics.median(ratios):.2f}x faster now{spread}", flush=True)


def alternated(args: list[str], tree: str, pairs: int) -> tuple[list[float], list[float]]:
    """Seconds of `args` here and in `tree`, `pairs` times each, the two back
    to back and in turns first: the machine's drift hits both alike."""
    now, before = [], []
    for pair in range(pairs):
        if pair % 2:
            before.append(timed(args, tree))
            now.append(timed(args))
        else:
            now.append(timed(args))
            before.append(timed(args, tree))
    return now, before


if __name__ == "__main__":
    main()
