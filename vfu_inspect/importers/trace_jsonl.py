"""Import JSON Lines message traces (schema: shared/traces/README.md).

Each line holds one whole message as hex with the kinds of its passed fds.
The traces carry no timestamps: messages are placed 1 µs apart, in file order,
so that ordering and deltas stay meaningful while latencies are not.
"""

from __future__ import annotations

import json
from typing import Any

from . import ImportResult
from ..records import DIRECTION_NUMBERS, MAIN, Message

SYNTHETIC_STEP_NS = 1000


def import_trace(path: str) -> ImportResult:
    result = ImportResult()
    with open(path, encoding="utf-8") as lines:
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                msg = _message(json.loads(line), len(result.records))
            except (ValueError, KeyError, TypeError) as exc:
                result.problems.append(f"line {lineno}: {exc}")
                continue
            result.records.append(msg)
    return result


def _message(row: Any, index: int) -> Message:
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    direction = DIRECTION_NUMBERS.get(row["dir"])
    if direction is None:
        raise ValueError(f"dir must be c2s or s2c, not {row['dir']!r}")
    data = bytes.fromhex(row["hex"])
    fds = [{"kind": str(kind)} for kind in row.get("fds", [])]
    return Message(index * SYNTHETIC_STEP_NS, int(row["conn"]), MAIN, direction, data, fds)
