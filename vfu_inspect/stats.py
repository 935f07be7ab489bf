"""Statistics over a stream of dissected messages (`read -z`, `check`).

Each statistic is a tap: it sees every packet as the reader goes, then
renders a table at the end, as tshark's `-z` does.
"""

from __future__ import annotations

import copy
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import TextIO

from .dissect import Analyzer
from .dissectors import vfio_user as proto
from .dissectors.vfio_user.state import ConnState
from .events import describe, irq_name
from .fields import EXPERTS, SEVERITIES
from .packet import Dissected
from .records import C2S, DOORBELL, IRQ, Event


class ExpertStats:
    """tshark's `-z expert`: items by severity, group and kind."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.first: dict[str, int] = {}

    def packet(self, p: Dissected) -> None:
        for e in p.tree.experts:
            self.counts[e.id] += 1
            self.first.setdefault(e.id, p.number)

    def worst(self) -> str | None:
        ranks = [SEVERITIES.index(EXPERTS[i].severity) for i in self.counts]
        return SEVERITIES[min(ranks)] if ranks else None

    def render(self, out: TextIO) -> None:
        print("=" * 78, file=out)
        print("Expert Information", file=out)
        for severity in SEVERITIES:
            rows = sorted((i for i in self.counts if EXPERTS[i].severity == severity),
                          key=lambda i: (EXPERTS[i].group, i))
            if not rows:
                continue
            total = sum(self.counts[i] for i in rows)
            print(f"\n{severity.capitalize()}s ({total})\n{'=' * (len(severity) + 4)}", file=out)
            print(f"{'Frequency':>9}  {'Group':<14} {'First':>6}  Summary", file=out)
            for i in rows:
                d = EXPERTS[i]
                print(f"{self.counts[i]:>9}  {d.group:<14} {self.first[i]:>6}  "
                      f"{d.summary} [{i}]", file=out)
        if not self.counts:
            print("\nNo expert items.", file=out)
        print("=" * 78, file=out)


class SessionStats:
    """`-z session,N`: every connection's state after message N."""

    def __init__(self, analyzer: Analyzer, number: int) -> None:
        self.analyzer = analyzer
        self.number = number
        self.state: dict[int, ConnState] | None = None
        self.ts_ns: int | None = None

    def packet(self, p: Dissected) -> None:
        if p.number == self.number:
            self.state = copy.deepcopy(self.analyzer.sessions.conns)
            self.ts_ns = p.msg.ts_ns

    def render(self, out: TextIO) -> None:
        print("=" * 78, file=out)
        if self.state is None:
            print(f"Session state: the capture has no message {self.number}", file=out)
        for conn, state in sorted((self.state or {}).items()):
            closed = " (closed)" if state.closed else ""
            print(f"Session state of connection {conn} after message {self.number}{closed}",
                  file=out)
            for title, lines in state.sections(self.ts_ns):
                print(f"  {title}", file=out)
                for line in lines:
                    print(f"    {line}", file=out)
        print("=" * 78, file=out)


@dataclass
class _Signals:
    events: int = 0
    signals: int = 0
    first_ns: int = 0
    last_ns: int = 0

    def add(self, event: Event) -> None:
        self.first_ns = self.first_ns or event.ts_ns
        self.last_ns = event.ts_ns
        self.events += 1
        self.signals += event.info.get("count") or 0

    def rate(self) -> str:
        span = (self.last_ns - self.first_ns) / 1e9
        return f"{(self.events - 1) / span:,.1f}/s" if self.events > 1 and span > 0 else "-"


class IrqStats:
    """`-z irq` (captures of proxy --trace-irqs): interrupts per vector and
    doorbells per register, and for each MMIO write (REGION_WRITE to a BAR) or
    doorbell the time to the next interrupt of the same connection."""

    def __init__(self) -> None:
        self.vectors: dict[tuple[int, int, int], _Signals] = {}
        self.doorbells: dict[tuple[int, str], _Signals] = {}
        self.waiting: dict[int, list[tuple[int, str]]] = {}    # writes awaiting an interrupt
        self.latencies: list[tuple[str, int, str, float]] = []
        self.first_ns: int | None = None

    def packet(self, p: Dissected) -> None:
        self.first_ns = self.first_ns or p.msg.ts_ns
        h, prefix = p.header, proto.MMIO_WRITES.get(p.header.cmd) if p.header else None
        if prefix is None or h.is_reply or p.msg.direction != C2S:
            return
        region = p.tree.first(f"{prefix}.region")
        if proto.REGIONS.get(region, "").startswith("BAR"):
            where = f"{proto.region_name(region)}+{p.tree.first(f'{prefix}.offset'):#x}"
            self.waiting.setdefault(p.msg.conn, []).append(
                (p.msg.ts_ns, f"frame {p.number} {h.command_name} {where}"))

    def event(self, e: Event) -> None:
        if e.kind == DOORBELL:
            self.doorbells.setdefault((e.conn, describe(e).rsplit(",", 1)[0]), _Signals()).add(e)
            where = f"{proto.region_name(e.info.get('region', -1))}+{e.info.get('offset', 0):#x}"
            self.waiting.setdefault(e.conn, []).append((e.ts_ns, f"doorbell {where}"))
        elif e.kind == IRQ:
            info = e.info
            self.vectors.setdefault((e.conn, info.get("index"), info.get("vector")),
                                    _Signals()).add(e)
            what = f"{irq_name(info.get('index'))} vector {info.get('vector')}"
            for ts, cause in self.waiting.pop(e.conn, []):
                self.latencies.append((cause, e.conn, what, (e.ts_ns - ts) / 1e3))

    def render(self, out: TextIO) -> None:
        print("=" * 78, file=out)
        print("Interrupts and doorbells (proxy --trace-irqs)", file=out)
        if not self.vectors and not self.doorbells:
            print("\nNo interrupt or doorbell: was the capture made with --trace-irqs?", file=out)
        for title, rows in (("Interrupts", [(f"{irq_name(i)} vector {v}", c, s)
                                            for (c, i, v), s in sorted(self.vectors.items())]),
                            ("Doorbells", [(name, c, s)
                                           for (c, name), s in sorted(self.doorbells.items())])):
            if rows:
                print(f"\n{title}\n{'Conn':>4}  {'What':<44} {'Events':>7} {'Signals':>8} "
                      f"{'Rate':>10}", file=out)
            for name, conn, signals in rows:
                print(f"{conn:>4}  {name:<44} {signals.events:>7} {signals.signals:>8} "
                      f"{signals.rate():>10}", file=out)
        if self.latencies:
            print("\nMMIO write or doorbell -> next interrupt of its connection\n"
                  f"{'Conn':>4}  {'Cause':<44} {'Interrupt':<18} {'Latency':>12}", file=out)
            for cause, conn, what, us in self.latencies:
                print(f"{conn:>4}  {cause:<44} {what:<18} {us:>9.1f} µs", file=out)
            values = [us for *_, us in self.latencies]
            print(f"  {len(values)} causes: min {min(values):.1f} µs, median "
                  f"{statistics.median(values):.1f} µs, max {max(values):.1f} µs", file=out)
        print("=" * 78, file=out)


def parse_stat(spec: str, analyzer: Analyzer) -> ExpertStats | SessionStats | IrqStats:
    """`expert`, `session,N` or `irq`; ValueError with the reason otherwise."""
    name, _, arg = spec.partition(",")
    if name == "expert" and not arg:
        return ExpertStats()
    if name == "irq" and not arg:
        return IrqStats()
    if name == "session":
        try:
            number = int(arg)
        except ValueError:
            raise ValueError(f"-z session,N needs a message number, got {arg!r}") from None
        if number < 1:
            raise ValueError("-z session,N: message numbers start at 1")
        return SessionStats(analyzer, number)
    raise ValueError(f"unknown statistic {spec!r} (known: expert, session,N, irq)")
