"""Writing a selection of messages: a capture file, or pcapng by its name.

`read -w`, `export -Y` and the TUI's `w` share this, so the three write the
same file for the same selection.
"""

from __future__ import annotations

from typing import Any

from .capture import CaptureWriter
from .output import packet_comment
from .packet import Dissected
from .pcapng import PcapngFileWriter
from .records import Event, Message

PCAPNG_SUFFIXES = (".pcapng", ".pcap")


def is_pcapng_name(path: str) -> bool:
    return path.lower().endswith(PCAPNG_SUFFIXES)


def open_writer(path: str, source: str) -> Any:
    """A pcapng writer for a *.pcapng name, a capture writer otherwise (OSError: caller reports)."""
    if is_pcapng_name(path):
        return PcapngFileWriter(path, source)
    return CaptureWriter(path, source, autoflush=False)


def write_one(writer: Any, record: Dissected | Message | Event) -> None:
    """A message (in pcapng, dissected ones get their fds and expert items as
    the comment) or an event."""
    if isinstance(record, Dissected):
        if isinstance(writer, PcapngFileWriter):
            writer.write(record.msg, packet_comment(record))
        else:
            writer.write(record.msg)
    else:
        writer.write(record)
