"""A dissected message: what dissection gives every view, check and statistic."""

from __future__ import annotations

from dataclasses import dataclass

from .dissectors import vfio_user as proto
from .records import DIRECTIONS, Message
from .tree import Tree


@dataclass(slots=True)
class Dissected:
    number: int
    msg: Message
    header: proto.HeaderInfo | None
    tree: Tree
    time_relative: float
    time_delta: float
    request_in: int | None = None     # for a reply: its request's number
    response_in: int | None = None    # for a request: its reply's number
    latency: float | None = None      # reply time minus request time

    @property
    def direction(self) -> str:
        return DIRECTIONS[self.msg.direction]
