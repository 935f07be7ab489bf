"""What expert analysis costs: `read -T json` with and without the session tracker.

Dissects and renders as JSON every message of a capture built like
read_bench's (the sample session repeated), twice: with the full session
tracker (stateful checks, device layers, state), and with a tracker that only
pairs replies with requests, which the analyzer needs anyway.  Prints both
throughputs and the cost of the analysis as a share of the JSON throughput
(target: at most 25%).

    python bench/expert_bench.py [--messages N]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from read_bench import bench_capture

from vfu_inspect import registry
from vfu_inspect.capture import CaptureReader
from vfu_inspect.dissect import Analyzer, find_responses
from vfu_inspect.dissectors.vfio_user.state import Pending
from vfu_inspect.output import json_packet
from vfu_inspect.session import REQUEST_KEPT, SessionTracker


class PairingOnly(SessionTracker):
    """Pairs replies with requests and does nothing else."""

    def feed(self, p, request) -> None:
        state = self.connection(p.msg.conn)
        h = p.header
        if h is not None and not h.is_reply and not h.no_reply:
            state.send(Pending(p.number, h.cmd, h.msg_id, p.msg.direction, p.msg.channel,
                               p.msg.ts_ns, p.msg.data[:REQUEST_KEPT], p.msg.fds))


def json_rate(path: Path, tracker: SessionTracker) -> float:
    with CaptureReader(path) as first_pass:
        responses = find_responses(first_pass)
    start = time.perf_counter()
    count = 0
    with CaptureReader(path) as reader:
        for p in Analyzer(responses, tracker).run(reader):
            json.dumps(json_packet(p))
            count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    registry.load()
    with bench_capture(__doc__) as (path, n):
        plain = json_rate(path, PairingOnly(checkpoint_every=0))
        full = json_rate(path, SessionTracker(checkpoint_every=0))
    cost = 1 - full / plain
    print(f"{n} messages, read -T json")
    print(f"  pairing only:        {plain:,.0f} msg/s")
    print(f"  with expert analysis: {full:,.0f} msg/s")
    print(f"  analysis cost: {cost:.1%} of throughput (target <= 25%)")


if __name__ == "__main__":
    main()
