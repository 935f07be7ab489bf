"""Statistics over a stream of dissected messages (`read -z`, `check`).

Each statistic is a tap: it sees every packet as the reader goes, then
renders a table at the end, as tshark's `-z` does.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import TextIO

from .dissect import Analyzer, Dissected
from .fields import EXPERTS, SEVERITIES
from .session import ConnState


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


def parse_stat(spec: str, analyzer: Analyzer) -> ExpertStats | SessionStats:
    """`expert` or `session,N`; ValueError with the reason otherwise."""
    name, _, arg = spec.partition(",")
    if name == "expert" and not arg:
        return ExpertStats()
    if name == "session":
        try:
            number = int(arg)
        except ValueError:
            raise ValueError(f"-z session,N needs a message number, got {arg!r}") from None
        if number < 1:
            raise ValueError("-z session,N: message numbers start at 1")
        return SessionStats(analyzer, number)
    raise ValueError(f"unknown statistic {spec!r} (known: expert, session,N)")
